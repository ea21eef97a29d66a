"""The upstream call skips the HTTP-span instrumentation while nothing records (no SDK set
up) and still sends the job's `traceparent`, as the instrumentation would (workers/http_spans.py)."""

from __future__ import annotations

import httpx
import pytest
from opentelemetry import context, trace
from opentelemetry.instrumentation.httpx import AsyncOpenTelemetryTransport
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.trace import NoOpTracerProvider

from ratefleet.runtime.tracing import parent_context
from ratefleet.workers.http_spans import TracedWhenRecording, traced_transport

pytestmark = pytest.mark.anyio
GOOD = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"


class Recording(httpx.AsyncBaseTransport):
    """An upstream that keeps the headers of each request and answers 200."""

    def __init__(self) -> None:
        self.seen: list[httpx.Headers] = []

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        self.seen.append(request.headers)
        return httpx.Response(200, json={"ok": True})


async def post_under(transport: httpx.AsyncBaseTransport, ctx) -> httpx.Response:
    token = context.attach(ctx)
    try:
        async with httpx.AsyncClient(transport=transport) as client:
            return await client.post("http://upstream.test/v1/x", json={})
    finally:
        context.detach(token)


async def test_not_recording_the_inner_transport_is_called_with_the_jobs_traceparent():
    inner, instrumented = Recording(), Recording()
    response = await post_under(TracedWhenRecording(inner, instrumented), parent_context(GOOD))
    assert response.status_code == 200
    assert [h.get("traceparent") for h in inner.seen] == [GOOD] and instrumented.seen == []


async def test_not_recording_the_upstream_gets_what_the_instrumentation_would_send():
    bypassed, direct = Recording(), Recording()
    await post_under(traced_transport(bypassed), parent_context(GOOD))
    # the instrumentation alone, with no SDK set up (a no-op tracer provider: another test of the
    # session may have installed the SDK's as the global one, which would start a real client span)
    instrumentation = AsyncOpenTelemetryTransport(direct, tracer_provider=NoOpTracerProvider())
    await post_under(instrumentation, parent_context(GOOD))
    assert bypassed.seen[0].get("traceparent") == direct.seen[0].get("traceparent") == GOOD


async def test_a_recording_span_goes_through_the_instrumentation():
    inner, instrumented = Recording(), Recording()
    span = TracerProvider().get_tracer("test").start_span("ratefleet.run")
    await post_under(TracedWhenRecording(inner, instrumented), trace.set_span_in_context(span))
    span.end()
    assert len(instrumented.seen) == 1 and inner.seen == []
