"""The upstream call's HTTP span (workers/http_spans.py) with request headers captured: the
usual credential headers, the upstream's own auth header and the environment's sanitize
list are redacted, a header merely like a secret one's name is not; closing the transport
closes the instrumented one (and through it the worker's own).

The tracer provider is process-global and set once, so these tests never set it: the
instrumented transport gets a tracer of the test's own provider (in-memory exporter)."""

from __future__ import annotations

import re

import httpx
import pytest
from opentelemetry import context, trace
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind

from ratefleet.workers.http_spans import ALWAYS_REDACTED, TracedWhenRecording, traced_transport

pytestmark = pytest.mark.anyio
CAPTURE = "OTEL_INSTRUMENTATION_HTTP_CAPTURE_HEADERS_CLIENT_REQUEST"
SANITIZE = "OTEL_INSTRUMENTATION_HTTP_CAPTURE_HEADERS_SANITIZE_FIELDS"
REDACTED = ("[REDACTED]",)


class Upstream(httpx.AsyncBaseTransport):
    """Answers 200 and remembers whether it was closed."""

    def __init__(self) -> None:
        self.calls, self.closed = 0, False

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        self.calls += 1
        return httpx.Response(200, json={"ok": True})

    async def aclose(self) -> None:
        self.closed = True


async def client_span_headers(headers: dict[str, str], secret_headers=()) -> dict[str, tuple[str, ...]]:
    """Send one request under a recording `ratefleet.run` span; the HTTP span's captured headers."""
    memory = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(memory))
    upstream = Upstream()
    transport = traced_transport(upstream, secret_headers)
    assert isinstance(transport, TracedWhenRecording)
    transport.traced._tracer = provider.get_tracer("httpx")  # the instrumentation's, on our provider
    run = provider.get_tracer("ratefleet").start_span("ratefleet.run")
    token = context.attach(trace.set_span_in_context(run))
    try:
        async with httpx.AsyncClient(transport=transport) as client:
            assert (await client.post("http://upstream.test/v1/x", json={}, headers=headers)).status_code == 200
    finally:
        context.detach(token)
        run.end()
    assert upstream.calls == 1
    (http,) = [span for span in memory.get_finished_spans() if span.kind is SpanKind.CLIENT]
    prefix = "http.request.header."
    return {name[len(prefix):]: tuple(value) for name, value in http.attributes.items() if name.startswith(prefix)}


async def test_credential_headers_never_reach_the_span(monkeypatch):
    monkeypatch.setenv(CAPTURE, ".*")
    sent = {name: f"sk-{i}-secret" for i, name in enumerate(ALWAYS_REDACTED)}
    got = await client_span_headers({**sent, "X-Request-Id": "r-1"})
    for name in ALWAYS_REDACTED:
        assert got[name.replace("-", "_")] == REDACTED, name
    assert got["x_request_id"] == ("r-1",)
    assert "secret" not in repr(got)


async def test_the_upstreams_own_auth_header_is_redacted_as_its_name_reads(monkeypatch):
    monkeypatch.setenv(CAPTURE, ".*")
    got = await client_span_headers({"X-Team.Token": "sk-team", "X-Team-Token": "visible"},
                                    secret_headers=["X-Team.Token"])
    assert got["x_team.token"] == REDACTED
    assert got["x_team_token"] == ("visible",)  # the name is a literal, not a pattern


async def test_the_environments_sanitize_list_still_applies(monkeypatch):
    monkeypatch.setenv(CAPTURE, ".*")
    monkeypatch.setenv(SANITIZE, "x-session")
    got = await client_span_headers({"X-Session": "s-1", "X-Custom-Auth": "sk-c"}, secret_headers=["x-custom-auth"])
    assert got["x_session"] == REDACTED and got["x_custom_auth"] == REDACTED


async def test_closing_the_transport_closes_the_workers_own():
    upstream = Upstream()
    transport = traced_transport(upstream)
    await transport.aclose()
    assert upstream.closed


def test_an_instrumentation_without_a_sanitize_list_still_gets_ours(monkeypatch):
    """A release of the instrumentation that keeps no `_sensitive_headers` of its own: the
    redacted names become the whole list instead of failing the worker's start."""
    import opentelemetry.instrumentation.httpx as instrumentation

    class Older(instrumentation.AsyncOpenTelemetryTransport):
        def __init__(self, transport: httpx.AsyncBaseTransport) -> None:
            super().__init__(transport)
            del self._sensitive_headers

    monkeypatch.setattr(instrumentation, "AsyncOpenTelemetryTransport", Older)
    transport = traced_transport(Upstream(), ["X-Team.Token"])
    # matched without case by the instrumentation
    assert [name.lower() for name in transport.traced._sensitive_headers] == \
        [re.escape(name) for name in (*ALWAYS_REDACTED, "x-team.token")]
