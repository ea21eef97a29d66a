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

# always redacted when headers are captured (regular expressions, matched without case)
ALWAYS_REDACTED = ("authorization", "proxy-authorization", "x-api-key", "api-key", "x-goog-api-key",
                   "ocp-apim-subscription-key", "cookie", "set-cookie")


def traced_transport(inner: httpx.AsyncBaseTransport, secret_headers: Iterable[str] = ()) -> httpx.AsyncBaseTransport:
    """`inner` wrapped in the instrumentation's transport, or `inner` itself when the
    instrumentation is not installed."""
    try:
        from opentelemetry.instrumentation.httpx import AsyncOpenTelemetryTransport
    except ImportError:
        return inner
    traced = AsyncOpenTelemetryTransport(inner)
    redacted = [re.escape(name.lower()) for name in (*ALWAYS_REDACTED, *secret_headers)]
    # the instrumentation reads the fields to redact from the environment only; ours are added to them
    traced._sensitive_headers = [*getattr(traced, "_sensitive_headers", []), *redacted]
    return traced
