"""The upstream call as an HTTP client span: opentelemetry-instrumentation-httpx's
transport wrapped around the worker's own (httpx-aiohttp or httpcore), when that package
is installed (the `[otel]` extra). The span follows the HTTP semantic conventions
(`http.request.method`, `url.full`, `server.address`, `http.response.status_code`, ...)
and is a child of the job's `ratefleet.run` span; the upstream gets its `traceparent`.

Request headers are recorded only when OTEL_INSTRUMENTATION_HTTP_CAPTURE_HEADERS_CLIENT_REQUEST
asks for them; even then the upstreams' auth headers and the usual credential headers are
redacted ("[REDACTED]"), so a key never reaches a span.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

import httpx
from opentelemetry import trace

from ratefleet.runtime.tracing import inject

# always redacted when headers are captured (regular expressions, matched without case)
ALWAYS_REDACTED = ("authorization", "proxy-authorization", "x-api-key", "api-key", "x-goog-api-key",
                   "ocp-apim-subscription-key", "cookie", "set-cookie")


class TracedWhenRecording(httpx.AsyncBaseTransport):
    """The instrumented transport while the job's span records (an SDK is set up); else
    `inner` directly, with the job's `traceparent` written into the request as the
    instrumentation would (a no-op span propagates its parent's context). The
    instrumentation costs about 10 % of a worker's CPU per call when nothing is recorded."""

    def __init__(self, inner: httpx.AsyncBaseTransport, traced: httpx.AsyncBaseTransport) -> None:
        self.inner, self.traced = inner, traced

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        if trace.get_current_span().is_recording():
            return await self.traced.handle_async_request(request)
        inject(request.headers)
        return await self.inner.handle_async_request(request)

    async def aclose(self) -> None:
        await self.traced.aclose()  # closes `inner` too


def traced_transport(inner: httpx.AsyncBaseTransport, secret_headers: Iterable[str] = ()) -> httpx.AsyncBaseTransport:
    """`inner` wrapped in the instrumentation's transport (used while spans record, see
    TracedWhenRecording), or `inner` itself when the instrumentation is not installed."""
    try:
        from opentelemetry.instrumentation.httpx import AsyncOpenTelemetryTransport
    except ImportError:
        return inner
    traced = AsyncOpenTelemetryTransport(inner)
    redacted = [re.escape(name.lower()) for name in (*ALWAYS_REDACTED, *secret_headers)]
    # the instrumentation reads the fields to redact from the environment only; ours are added to them
    traced._sensitive_headers = [*getattr(traced, "_sensitive_headers", []), *redacted]
    return TracedWhenRecording(inner, traced)
