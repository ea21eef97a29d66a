"""Per-job CPU in the cyclic garbage collector: an upstream call leaves no reference cycle
behind (workers/executor.py `_unlink`), and a role process freezes what it holds after
start-up and collects less often (ratefleet/runtime/gctune.py)."""

from __future__ import annotations

import gc
import socket

import httpx
import pytest
from aiohttp import web

from ratefleet.runtime.gctune import YOUNG_THRESHOLD, quiet_gc
from ratefleet.schemas import Job, UpstreamConfig
from ratefleet.workers.executor import UpstreamExecutor, build_client

JOB = Job.model_validate({"request": {"path": "/v1/chat/completions", "json": {"model": "m", "messages": []}}})


def _cyclic_garbage_of(kind: type) -> int:
    """How many objects of `kind` the collector found unreachable (kept in gc.garbage)."""
    gc.collect()
    return sum(isinstance(o, kind) for o in gc.garbage)


async def _calls_leave_cycles(executor: UpstreamExecutor, upstream: UpstreamConfig, calls: int) -> int:
    await executor.call(JOB, upstream, "sk-secret")  # connections and caches are made before counting
    gc.collect()
    gc.disable()
    gc.set_debug(gc.DEBUG_SAVEALL)
    try:
        for _ in range(calls):
            result = await executor.call(JOB, upstream, "sk-secret")
            assert result.kind == "ok" and result.response.json_body == {"ok": True}
        return _cyclic_garbage_of(httpx.Response)
    finally:
        gc.set_debug(0)
        gc.garbage.clear()
        gc.enable()


@pytest.mark.anyio
async def test_an_upstream_call_over_the_aiohttp_transport_leaves_no_cycle_for_the_collector():
    async def answer(request: web.Request) -> web.Response:
        return web.json_response({"ok": True})

    app = web.Application()
    app.router.add_post("/v1/chat/completions", answer)
    runner = web.AppRunner(app)
    await runner.setup()
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    site = web.TCPSite(runner, "127.0.0.1", port)
    await site.start()
    client = build_client("aiohttp", 4, ["Authorization"])
    try:
        executor = UpstreamExecutor(client)
        assert await _calls_leave_cycles(executor, UpstreamConfig(base_url=f"http://127.0.0.1:{port}"), 20) == 0
    finally:
        await client.aclose()
        await runner.cleanup()


@pytest.mark.anyio
async def test_an_upstream_call_over_a_mock_transport_leaves_no_cycle_for_the_collector():
    transport = httpx.MockTransport(lambda request: httpx.Response(200, json={"ok": True}))
    async with httpx.AsyncClient(transport=transport) as client:
        executor = UpstreamExecutor(client)
        assert await _calls_leave_cycles(executor, UpstreamConfig(base_url="https://api.example.test"), 20) == 0


def test_quiet_gc_freezes_what_the_process_holds_and_raises_the_young_threshold():
    before = gc.get_threshold()
    try:
        assert quiet_gc() == before
        assert gc.get_threshold()[0] == YOUNG_THRESHOLD > before[0]
        assert gc.get_freeze_count() > 0
    finally:
        gc.unfreeze()
        gc.set_threshold(*before)
