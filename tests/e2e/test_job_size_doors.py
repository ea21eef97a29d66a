"""Jobs near the 1 MiB limit over real processes: one whose assignment to a worker would not
fit in a NATS message ends `invalid` with a clear error (no call, leader session intact, the
other jobs run); an rpc job of UTF-8 text without an id is stored and answered."""

from __future__ import annotations

import json

import nats
import pytest
from aiohttp import web
from faultkit import Tracker
from fleetkit import FleetKit, collect, wait_for_leader

from ratefleet import Client
from ratefleet.runtime.store import MSG_ID
from ratefleet.schemas import Subjects

pytestmark = [pytest.mark.timeout(120), pytest.mark.anyio]
SUBJECTS = Subjects("ratefleet")


async def ok_upstream(calls: list[int]):
    async def handle(request: web.Request) -> web.Response:
        calls.append(len(await request.read()))
        return web.json_response({"ok": True, "usage": {"total_tokens": 1}})

    app = web.Application(client_max_size=8 << 20)
    app.router.add_route("*", "/{tail:.*}", handle)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    return runner, "http://127.0.0.1:%d" % site._server.sockets[0].getsockname()[1]


def sized_job(job_id: str, size: int) -> bytes:
    base = {"id": job_id, "batch": "b", "request": {"path": "/v1/embeddings", "json": {"model": "e", "input": ""}}}
    base["request"]["json"]["input"] = "x" * (size - len(json.dumps(base, separators=(",", ":"))))
    return json.dumps(base, separators=(",", ":")).encode()


def growing_job(job_id: str) -> bytes:
    """~300 KB as sent, ~1.1 MB once re-serialised for a worker (1e15 becomes 1000000000000000.0)."""
    return (f'{{"id":"{job_id}","batch":"b","request":{{"path":"/v1/x","json":{{"v":['
            + ",".join(["1e15"] * 60_000) + "]}}}").encode()


async def test_jobs_a_worker_cannot_be_sent_end_invalid_and_the_rest_run(tmp_path, nats_server):
    calls: list[int] = []
    runner, url = await ok_upstream(calls)
    kit = FleetKit(tmp_path, nats_server.url, url)
    try:
        kit.dispatcher("d1")
        kit.worker("w1")
        async with await Client.connect(nats_server.url) as client, Tracker(nats_server.url) as tracker:
            await wait_for_leader(client)
            js = client.nc.jetstream()
            big = sized_job("big", client.nc.max_payload - 200)  # under max_job_bytes (1 MiB + 0)
            for job_id, raw in (("big", big), ("grows", growing_job("grows"))):
                await js.publish(SUBJECTS.jobs("normal"), raw, headers={MSG_ID: job_id})  # any NATS client
            for i in range(5):
                await client.submit({"id": f"small{i}", "batch": "b",
                                     "request": {"path": "/v1/x", "json": {"i": i}}}, tier="normal")
            results = await collect(client, "b", 7, timeout=60)
            letters = await tracker.letters_of(["big", "grows"])
        assert {f"small{i}" for i in range(5)} | {"big", "grows"} == set(results)
        assert all(results[f"small{i}"].status == "succeeded" for i in range(5))
        for job_id, says in (("big", "max_payload"), ("grows", "max_payload")):
            result = results[job_id]
            assert (result.status, result.error.code) == ("invalid", "invalid_job"), result
            assert says in result.error.message and result.attempts == 0  # never called
            assert job_id in letters, f"{job_id}: no dead letter within 15 s of its Result"
            assert letters[job_id]["reason"]["code"] == "invalid_job"
        assert len(calls) == 5, "a job too large for a worker reached the upstream"
        assert "leader session failed" not in kit.logs()
    finally:
        kit.stop()
        await runner.cleanup()


@pytest.mark.parametrize("text", ["\U0001F600" * 150_000, "日" * 200_000], ids=["emoji", "cjk"])
async def test_an_rpc_job_of_utf8_text_without_an_id_is_answered(tmp_path, nats_server, text):
    calls: list[int] = []
    runner, url = await ok_upstream(calls)
    kit = FleetKit(tmp_path, nats_server.url, url)
    try:
        kit.dispatcher("d1")
        kit.worker("w1")
        async with await Client.connect(nats_server.url) as client:
            await wait_for_leader(client)
        nc = await nats.connect(nats_server.url)
        try:
            job = {"request": {"path": "/v1/chat/completions",
                               "json": {"model": "m", "messages": [{"role": "user", "content": text}]}}}
            raw = json.dumps(job, ensure_ascii=False).encode()
            assert 590_000 < len(raw) < 610_000
            reply = json.loads((await nc.request("ratefleet.rpc.normal", raw, timeout=30)).data)
        finally:
            await nc.close()
        assert reply["status"] == "succeeded", reply.get("error")
        assert len(calls) == 1 and calls[0] > 590_000
    finally:
        kit.stop()
        await runner.cleanup()
