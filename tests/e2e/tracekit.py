"""Helpers for the tracing tests: an in-memory span exporter on the process's tracer
provider that records only while a test asks, and a small real HTTP upstream that keeps the
headers of every request it gets."""

from __future__ import annotations

import contextlib
import json

from aiohttp import web
from opentelemetry import trace
from opentelemetry.sdk.trace import ReadableSpan, SpanProcessor, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter


class _Switch(SpanProcessor):
    """Forwards ended spans to the in-memory exporter only while a test records, so the
    process-wide provider (set once) costs the rest of the suite nothing but no-op checks."""

    def __init__(self, exporter: InMemorySpanExporter) -> None:
        self.inner = SimpleSpanProcessor(exporter)
        self.on = False

    def on_end(self, span: ReadableSpan) -> None:
        if self.on:
            self.inner.on_end(span)


_state: dict[str, object] = {}


@contextlib.contextmanager
def recording_spans():
    """Yield an InMemorySpanExporter that holds the spans ended inside the block. The SDK
    provider is made the global one the first time (OpenTelemetry allows that once)."""
    if "switch" not in _state:
        exporter = InMemorySpanExporter()
        provider = TracerProvider()
        switch = _Switch(exporter)
        provider.add_span_processor(switch)
        trace.set_tracer_provider(provider)
        assert trace.get_tracer_provider() is provider, "another tracer provider was installed first"
        _state.update(switch=switch, exporter=exporter)
    switch, exporter = _state["switch"], _state["exporter"]
    exporter.clear()
    switch.on = True
    try:
        yield exporter
    finally:
        switch.on = False


class HeaderKeepingUpstream:
    """An OpenAI-style /v1/chat/completions on 127.0.0.1 that answers 200 and keeps each
    request's headers (lower-case names) in `requests`."""

    def __init__(self) -> None:
        self.requests: list[dict[str, str]] = []
        self.url = ""
        self._runner: web.AppRunner | None = None

    async def _chat(self, request: web.Request) -> web.Response:
        self.requests.append({k.lower(): v for k, v in request.headers.items()})
        body = {"id": "c1", "object": "chat.completion", "usage": {"total_tokens": 3},
                "choices": [{"index": 0, "message": {"role": "assistant", "content": "hi"}}]}
        return web.Response(text=json.dumps(body), content_type="application/json")

    async def __aenter__(self) -> HeaderKeepingUpstream:
        app = web.Application()
        app.router.add_post("/v1/chat/completions", self._chat)
        self._runner = web.AppRunner(app)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        self.url = f"http://127.0.0.1:{port}"
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._runner is not None
        await self._runner.cleanup()


def by_name(spans, trace_id: int) -> dict[str, list]:
    """The spans of one trace, by name, each list in start order."""
    out: dict[str, list] = {}
    for span in sorted((s for s in spans if s.context.trace_id == trace_id), key=lambda s: s.start_time):
        out.setdefault(span.name, []).append(span)
    return out
