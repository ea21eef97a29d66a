"""SIGTERM while a worker stores a large paid answer: the call is done, so the drain lets the
store finish (bounded) instead of naking the job; the upstream is called once, not twice."""

from __future__ import annotations

import asyncio
import json
import time

import pytest
from aiohttp import web
from faultkit import until, wait_exit
from fleetkit import FleetKit, collect, wait_for_leader

from ratefleet import Client

pytestmark = [pytest.mark.timeout(120), pytest.mark.anyio]

BODY = b"a" * (60 << 20)  # stored through the Object Store: seconds of upload


class DebugKit(FleetKit):
    def env(self) -> dict[str, str]:
        return {**super().env(), "RATEFLEET_LOG_LEVEL": "DEBUG"}  # "call done" marks the end of the call


async def big_answer_upstream(calls: list[float]):
    async def handle(request: web.Request) -> web.Response:
        await request.read()
        calls.append(time.monotonic())
        return web.Response(body=BODY, content_type="text/plain")

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", handle)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    return runner, "http://127.0.0.1:%d" % site._server.sockets[0].getsockname()[1]


def call_done(kit: FleetKit, worker: str) -> bool:
    for line in (kit.tmp / f"{worker}.log").read_text(errors="replace").splitlines():
        try:
            entry = json.loads(line)
        except ValueError:
            continue
        if entry.get("event") == "call done" and entry.get("job_id") == "j1":
            return True
    return False


async def test_sigterm_during_the_result_store_keeps_the_paid_answer(tmp_path, nats_server):
    calls: list[float] = []
    runner, url = await big_answer_upstream(calls)
    kit = DebugKit(tmp_path, nats_server.url, url, keys=[{"id": "k1", "rps": 50, "burst": 5}],
                   overrides={"workers": {"slots": 4, "heartbeat_s": 0.5, "grace_s": 0},
                              "dispatcher": {"worker_timeout_s": 15}})
    try:
        kit.dispatcher("d1")
        w1 = kit.worker("w1")
        async with await Client.connect(nats_server.url) as client:
            await wait_for_leader(client)
            await client.submit({"id": "j1", "batch": "b", "request": {"path": "/v1/audio", "json": {}}}, tier="normal")
            await until(lambda: calls, 30, 0.02, "the upstream call")
            kit.worker("w2")  # would take the job if w1 gave it back
            await until(lambda: call_done(kit, "w1"), 30, 0.02, "w1's call done")
            w1.terminate()  # grace_s = 0: a call still running would be cut at once
            rc = await wait_exit(w1, 40)
            results = await collect(client, "b", 1, timeout=60)
            await asyncio.sleep(2)  # a redelivery would have reached w2 and the upstream by now
        result = results.get("j1")
        assert result is not None and result.status == "succeeded", result
        assert result.worker == "w1" and result.response.body_ref.size == len(BODY)
        assert len(calls) == 1, f"the paid call was made {len(calls)} times"
        assert rc == 0
        assert "call abandoned at shutdown" not in kit.logs()
    finally:
        kit.stop()
        await runner.cleanup()
