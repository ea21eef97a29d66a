"""Defence in depth on an open NATS server: a forged assignment that pairs a key with an
upstream none of its pools serves is refused by the worker (a real worker process, two real
HTTP upstreams): the key's secret never reaches the other host, nothing is stored, the JOBS
delivery is handed back (nak) and the refusal is logged without the secret."""

from __future__ import annotations

import asyncio
import json
import time

import nats
import pytest
from fleetkit import SECRETS, FleetKit, chat_job
from natsauth_kit import Upstream, serve

from ratefleet.runtime.streams import tier_consumer
from ratefleet.schemas import Subjects

pytestmark = [pytest.mark.timeout(120), pytest.mark.anyio]
S = Subjects()


@pytest.fixture
async def upstreams():
    mine, other = Upstream(), Upstream()
    runners = [await serve(mine), await serve(other)]
    yield mine, other
    for runner in runners:
        await runner.cleanup()


@pytest.fixture
def worker(tmp_path, nats_server, upstreams):
    mine, other = upstreams
    kit = FleetKit(tmp_path, nats_server.url, mine.url, overrides={
        "upstreams": {"other": {"base_url": other.url, "timeout_s": 10}},
        "pools": {"shared": {"upstream": "mock", "keys": [{"id": "k1", "secret": "env:RF_TEST_K1", "rps": 50}]},
                  "elsewhere": {"upstream": "other", "keys": [{"id": "k2", "secret": "env:RF_TEST_K2", "rps": 50}]}},
    })
    kit.worker("w1")
    yield kit
    kit.stop()


async def _worker_listening(nc, worker_id: str, timeout: float = 30.0) -> None:
    beats = await nc.subscribe(S.heartbeat)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            msg = await beats.next_msg(timeout=1.0)
        except TimeoutError:
            continue
        if json.loads(msg.data).get("worker") == worker_id:
            await beats.unsubscribe()
            return
    raise AssertionError(f"worker {worker_id} sent no heartbeat")


async def _deliver(js, sub, job: dict) -> nats.aio.msg.Msg:
    await js.publish(S.jobs("normal"), json.dumps(job).encode(), headers={"Nats-Msg-Id": job["id"]})
    return (await sub.fetch(1, timeout=10))[0]


def _assignment(msg, job: dict, key_id: str, upstream: str, pool: str) -> bytes:
    return json.dumps({"id": f"a-{job['id']}", "job": job, "job_id": job["id"], "tier": "normal",
                       "upstream": upstream, "key_id": key_id, "pool": pool, "ack": msg.reply, "attempt": 1,
                       "max_attempts": 5, "submitted_at": time.time(), "queued_ms": 0.0,
                       "seq": msg.metadata.sequence.stream}).encode()


async def test_a_forged_assignment_pairing_a_key_with_another_upstream_is_refused(worker, nats_server, upstreams):
    mine, other = upstreams
    nc = await nats.connect(nats_server.url)
    try:
        await _worker_listening(nc, "w1")
        js = nc.jetstream()
        # the tier's own consumer (the worker created it; no dispatcher runs): its ack_wait is 10 s
        sub = await js.pull_subscribe_bind(tier_consumer("normal"), S.jobs_stream)
        # k1 belongs to pool "shared" of upstream "mock"; the job and the assignment name "other"
        forged = {**chat_job(1), "id": "forged-1", "upstream": "other"}
        first = await _deliver(js, sub, forged)
        await nc.publish(S.assign("w1"), _assignment(first, forged, "k1", "other", "elsewhere"))
        again = (await sub.fetch(1, timeout=8))[0]  # handed back (nak 1 s), before ack_wait (10 s)
        assert again.metadata.num_delivered == 2 and json.loads(again.data)["id"] == "forged-1"
        assert other.calls == [] and mine.calls == []  # k1's secret went nowhere
        assert await _stored(js, "forged-1") is None  # nothing written in the job's name
        # the same job paired properly (k2 of "other") is called once, with k2
        await nc.publish(S.assign("w1"), _assignment(again, forged, "k2", "other", "elsewhere"))
        for _ in range(100):
            if await _stored(js, "forged-1") is not None:
                break
            await asyncio.sleep(0.1)
        assert [c[0] for c in other.calls] == ["k2"] and mine.calls == []
        assert (await _stored(js, "forged-1"))["status"] == "succeeded"
    finally:
        await nc.close()
    worker.stop()
    logs = worker.logs()
    assert "assignment refused" in logs and "'k1' belongs to pools of ['mock'], not of 'other'" in logs
    assert not any(secret in logs for secret in SECRETS.values())


async def _stored(js, job_id: str) -> dict | None:
    try:
        msg = await js.get_last_msg(S.results_stream, S.results("*", job_id))
    except Exception:  # noqa: BLE001 - none stored yet
        return None
    return json.loads(msg.data)
