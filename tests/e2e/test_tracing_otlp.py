"""Tracing across real processes: `ratefleet dispatcher` and `ratefleet worker` turned on
by the standard OTEL_* variables export OTLP/HTTP to a collector in this test; the trace
starts at the producer (`ratefleet request` with $TRACEPARENT, and an rpc request's
`traceparent` header) and every log line of the job carries its trace id."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import time

import nats
import pytest
from aiohttp import web
from fleetkit import FleetKit, chat_job, wait_for_leader
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)
from tracekit import HeaderKeepingUpstream

from ratefleet import Client
from ratefleet.schemas import Result

pytestmark = [pytest.mark.timeout(150), pytest.mark.anyio]
PRODUCER_TRACE, PRODUCER_SPAN = "4bf92f3577b34da6a3ce929d0e0e4736", "00f067aa0ba902b7"
RPC_TRACE, RPC_SPAN = "0af7651916cd43dd8448eb211c80319c", "b7ad6b7169203331"


class Collector:
    """An OTLP/HTTP trace receiver (POST /v1/traces, protobuf): every span as a dict."""

    def __init__(self) -> None:
        self.spans: list[dict] = []
        self.url = ""

    async def _traces(self, request: web.Request) -> web.Response:
        message = ExportTraceServiceRequest.FromString(await request.read())
        for resource_spans in message.resource_spans:
            service = {a.key: a.value.string_value for a in resource_spans.resource.attributes}.get("service.name")
            for scope in resource_spans.scope_spans:
                for span in scope.spans:
                    self.spans.append({
                        "service": service, "name": span.name, "trace": span.trace_id.hex(),
                        "id": span.span_id.hex(), "parent": span.parent_span_id.hex(),
                        "start": span.start_time_unix_nano, "end": span.end_time_unix_nano,
                        "attributes": {a.key: str(a.value) for a in span.attributes}})
        return web.Response(body=ExportTraceServiceResponse().SerializeToString(),
                            content_type="application/x-protobuf")

    async def __aenter__(self) -> Collector:
        app = web.Application()
        app.router.add_post("/v1/traces", self._traces)
        self._runner = web.AppRunner(app)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        self.url = f"http://127.0.0.1:{site._server.sockets[0].getsockname()[1]}"
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self._runner.cleanup()

    def of(self, trace_id: str) -> dict[str, dict]:
        return {span["name"]: span for span in sorted(self.spans, key=lambda s: s["start"]) if span["trace"] == trace_id}


async def _wait_for(condition, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "not within the timeout"
        await asyncio.sleep(0.2)


async def test_real_processes_export_one_trace_per_job_and_log_its_id(tmp_path, nats_server, monkeypatch):
    async with Collector() as collector, HeaderKeepingUpstream() as upstream:
        monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", collector.url)
        monkeypatch.setenv("OTEL_EXPORTER_OTLP_PROTOCOL", "http/protobuf")
        monkeypatch.setenv("OTEL_BSP_SCHEDULE_DELAY", "200")
        kit = FleetKit(tmp_path, nats_server.url, upstream.url, keys=[{"id": "k1", "rps": 50, "burst": 5}])
        plain_env = kit.env
        kit.env = lambda: {**plain_env(), "RATEFLEET_LOG_LEVEL": "DEBUG"}
        kit.dispatcher("d1")
        kit.worker("w1")
        try:
            async with await Client.connect(nats_server.url) as client:
                await wait_for_leader(client)
            env = {**kit.env(), "TRACEPARENT": f"00-{PRODUCER_TRACE}-{PRODUCER_SPAN}-01"}
            for name in ("OTEL_EXPORTER_OTLP_ENDPOINT", "OTEL_EXPORTER_OTLP_PROTOCOL"):
                env.pop(name)  # the producer does not export; its traceparent still travels
            done = await asyncio.to_thread(
                subprocess.run, [sys.executable, "-m", "ratefleet", "request", "--tier", "normal",
                                 json.dumps(chat_job(1, id="cli-1")), "--config", str(kit.config_path)],
                env=env, capture_output=True, timeout=60)
            assert done.returncode == 0, done.stderr.decode()
            by_cli = Result.model_validate_json(done.stdout)
            raw = await nats.connect(nats_server.url)
            try:
                reply = await raw.request("ratefleet.rpc.normal", json.dumps(chat_job(2, id="rpc-1")).encode(),
                                          timeout=30, headers={"traceparent": f"00-{RPC_TRACE}-{RPC_SPAN}-01"})
            finally:
                await raw.close()
            by_rpc = Result.from_json(reply.data)
            await _wait_for(lambda: {"ratefleet.queued", "ratefleet.dispatched", "ratefleet.run", "POST"}
                            <= set(collector.of(RPC_TRACE)) and "POST" in collector.of(PRODUCER_TRACE))
        finally:
            kit.stop()

    assert by_cli.ok and by_cli.trace_id == PRODUCER_TRACE
    assert by_rpc.ok and by_rpc.trace_id == RPC_TRACE
    for trace_id, parent in ((PRODUCER_TRACE, PRODUCER_SPAN), (RPC_TRACE, RPC_SPAN)):
        spans = collector.of(trace_id)
        queued, dispatched, run, http = (spans[n] for n in ("ratefleet.queued", "ratefleet.dispatched",
                                                             "ratefleet.run", "POST"))
        assert queued["parent"] == dispatched["parent"] == parent
        assert run["parent"] == dispatched["id"] and http["parent"] == run["id"]
        assert queued["start"] <= queued["end"] <= dispatched["start"] <= run["start"] <= http["start"]
        assert http["end"] <= run["end"]
        assert (queued["service"], run["service"], http["service"]) == (
            "ratefleet-dispatcher", "ratefleet-worker", "ratefleet-worker")
    # the upstream was handed the trace too
    assert any(h.get("traceparent", "").startswith(f"00-{PRODUCER_TRACE}-") for h in upstream.requests)

    # every log line of the job carries its trace id
    lines = [json.loads(line) for line in (tmp_path / "w1.log").read_text().splitlines() if line.startswith("{")]
    job_lines = [line for line in lines if line.get("job_id") == "cli-1"]
    assert job_lines and all(line.get("trace_id") == PRODUCER_TRACE for line in job_lines), job_lines


async def test_the_gateways_incoming_traceparent_becomes_the_jobs_trace_without_the_sdk_too(tmp_path, nats_server, monkeypatch):
    from gatewaykit import CALLER_KEYS, caller_env, callers, start_gateway

    gateway_trace = "5af7651916cd43dd8448eb211c80319d"
    caller_env(monkeypatch)
    async with HeaderKeepingUpstream() as upstream:
        kit = FleetKit(tmp_path, nats_server.url, upstream.url, keys=[{"id": "k1", "rps": 50, "burst": 5}],
                       overrides={"callers": callers()})
        plain_env = kit.env
        kit.env = lambda: {**plain_env(), "RATEFLEET_LOG_LEVEL": "DEBUG"}  # no OTEL_*: no SDK, no export
        kit.dispatcher("d1")
        kit.worker("w1")
        try:
            url = await asyncio.to_thread(start_gateway, kit)
            async with await Client.connect(nats_server.url) as client:
                await wait_for_leader(client)
                import httpx

                async with httpx.AsyncClient(trust_env=False, timeout=30) as http:
                    answer = await http.post(url + "/v1/chat/completions", json={
                        "model": "mock", "messages": [{"role": "user", "content": "hi"}]}, headers={
                        "authorization": f"Bearer {CALLER_KEYS['alice']}",
                        "traceparent": f"00-{gateway_trace}-{RPC_SPAN}-01"})
                assert answer.status_code == 200, answer.text
                stored = await client.stored_result(answer.headers["x-ratefleet-job-id"])
        finally:
            kit.stop()
    assert stored is not None and stored.ok and stored.trace_id == gateway_trace
    # the upstream call carried the same trace (and the caller's own key never went upstream)
    sent = [h for h in upstream.requests if h.get("traceparent", "").startswith(f"00-{gateway_trace}-")]
    assert len(sent) == 1 and CALLER_KEYS["alice"] not in json.dumps(sent[0])
    # without the SDK (nothing exported) the job's log lines still carry its trace id
    lines = [json.loads(line) for line in (tmp_path / "w1.log").read_text().splitlines() if line.startswith("{")]
    job_lines = [line for line in lines if line.get("job_id") == stored.job_id]
    assert job_lines and all(line.get("trace_id") == gateway_trace for line in job_lines), job_lines
    assert "tracing on" not in (tmp_path / "w1.log").read_text()
