"""One job = one trace: producer -> dispatcher -> worker -> upstream, over a real
nats-server and a real HTTP upstream, with a dispatcher and a worker running in this
process so one in-memory span exporter sees every span (tests/e2e/test_tracing_otlp.py
does the same over real processes exporting OTLP)."""

from __future__ import annotations

import asyncio
import inspect
import json
import time

import anyio
import pytest
from fleetkit import chat_job, wait_for_leader
from opentelemetry import trace
from opentelemetry.trace import SpanKind
from tracekit import HeaderKeepingUpstream, by_name, recording_spans

from ratefleet import Client
from ratefleet.dispatcher.shell.service import Dispatcher
from ratefleet.runtime.connect import connect
from ratefleet.runtime.streams import ensure_topology
from ratefleet.schemas import Config
from ratefleet.workers.service import Worker

pytestmark = [pytest.mark.timeout(120), pytest.mark.anyio]
SECRET = "sk-trace-SECRET-0123456789"


def fleet_config(nats_url: str, upstream_url: str) -> Config:
    return Config.model_validate({
        "nats": {"url": nats_url},
        "upstreams": {"mock": {"base_url": upstream_url, "timeout_s": 10}},
        "pools": {"shared": {"keys": [{"id": "k1", "secret": "env:RF_TRACE_K1", "rps": 50, "burst": 5}]}},
        "workers": {"slots": 4, "heartbeat_s": 0.5},
        "dispatcher": {"lease_ttl_s": 2.0, "worker_timeout_s": 2.0},
    })


async def _until(check, timeout: float = 20.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = check()
        if inspect.isawaitable(value):
            value = await value
        if value:
            return value
        await asyncio.sleep(0.1)
    raise AssertionError(f"not within {timeout}s")


async def _run_fleet(config: Config, body) -> None:
    """A dispatcher and a worker in this process (as `ratefleet dispatcher|worker` run them)
    while `body()` runs."""
    nc_d, nc_w = await connect(config.nats.url, name="d"), await connect(config.nats.url, name="w")
    stop = anyio.Event()
    try:
        await ensure_topology(nc_w.jetstream(), config)
        async with anyio.create_task_group() as tg:
            tg.start_soon(Dispatcher(config, nc_d, dispatcher_id="d1").run, stop)
            tg.start_soon(Worker(config, nc_w, worker_id="w1").run, stop)
            try:
                await body()
            finally:
                stop.set()
    finally:
        await nc_d.drain()
        await nc_w.drain()


async def test_one_job_is_one_trace_from_producer_to_upstream(nats_server, monkeypatch):
    monkeypatch.setenv("RF_TRACE_K1", SECRET)
    # record every request header on the HTTP span: the key must still not be there
    monkeypatch.setenv("OTEL_INSTRUMENTATION_HTTP_CAPTURE_HEADERS_CLIENT_REQUEST", ".*")
    got: dict[str, object] = {}
    with recording_spans() as exporter:
        async with HeaderKeepingUpstream() as upstream:
            config = fleet_config(nats_server.url, upstream.url)

            async def body():
                async with await Client.connect(nats_server.url) as client:
                    await wait_for_leader(client)
                    with trace.get_tracer("test-producer").start_as_current_span("producer") as producer:
                        got["result"] = await client.request(chat_job(1, id="traced-1"), "normal", timeout=30)
                    got["producer"] = producer.get_span_context()
                    # a plain NATS publisher sends no traceparent: the job gets a trace of its own
                    await client.js.publish("ratefleet.jobs.normal", json.dumps(chat_job(2, id="bare-1")).encode(),
                                            headers={"Nats-Msg-Id": "bare-1"})
                    got["bare"] = await _until(lambda: client.stored_result("bare-1"))
                    await _until(lambda: len(exporter.get_finished_spans()) >= 7)  # 3 + 1 HTTP each, less the producer

            await _run_fleet(config, body)
        spans = exporter.get_finished_spans()

    result, bare, producer = got["result"], got["bare"], got["producer"]
    assert result.ok and bare.ok
    # one trace, named by the producer's span, and the Result says which
    assert result.trace_id == format(producer.trace_id, "032x")
    job = by_name(spans, producer.trace_id)
    queued, dispatched, run, http = job["ratefleet.queued"][0], job["ratefleet.dispatched"][0], \
        job["ratefleet.run"][0], job["POST"][0]
    assert len(job["ratefleet.run"]) == len(job["POST"]) == 1
    # parent links: producer <- queued, producer <- dispatched <- run <- HTTP call
    assert queued.parent.span_id == producer.span_id and dispatched.parent.span_id == producer.span_id
    assert run.parent.span_id == dispatched.context.span_id
    assert http.parent.span_id == run.context.span_id
    assert (queued.kind, dispatched.kind, run.kind, http.kind) == (
        SpanKind.CONSUMER, SpanKind.PRODUCER, SpanKind.CONSUMER, SpanKind.CLIENT)
    # in order: queued (submit -> dispatch), then the hand-out, the worker, the upstream call inside it
    assert queued.start_time <= queued.end_time <= dispatched.start_time <= run.start_time
    assert run.start_time <= http.start_time <= http.end_time <= run.end_time
    assert dispatched.attributes["ratefleet.key_id"] == "k1" and dispatched.attributes["ratefleet.worker"] == "w1"
    assert run.attributes["ratefleet.job_id"] == "traced-1" and run.attributes["ratefleet.status"] == "succeeded"
    # the upstream got the HTTP span's traceparent
    sent = [h for h in upstream.requests if h.get("traceparent", "").split("-")[1:2] == [result.trace_id]]
    assert len(sent) == 1 and sent[0]["traceparent"].split("-")[2] == format(http.context.span_id, "016x")

    # the bare job: a fresh trace, the whole chain in it, the Result naming it
    assert bare.trace_id and bare.trace_id != result.trace_id
    fresh = by_name(spans, int(bare.trace_id, 16))
    assert {"ratefleet.queued", "ratefleet.dispatched", "ratefleet.run", "POST"} <= set(fresh)
    assert fresh["ratefleet.run"][0].parent.span_id == fresh["ratefleet.dispatched"][0].context.span_id

    # headers were captured (capture was on), the key was not: never in any span attribute
    assert any(k.startswith("http.request.header.") for k in http.attributes)
    for span in spans:
        for value in span.attributes.values():
            assert SECRET not in str(value), (span.name, value)
