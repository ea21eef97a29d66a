"""Client.request waits on one wildcard reply subscription (runtime/replies.py), not a
subscription per request: concurrent requests each get their own Result, a second or late
reply is dropped, a streamed chunk (`<reply>.s`) never resolves a request, and the
connection sends one SUB for any number of requests (real nats-server; a stand-in worker
answers the JOBS messages' reply header)."""

from __future__ import annotations

import asyncio
import json

import nats
import pytest

from ratefleet import Client
from ratefleet.runtime.replies import ReplyInbox
from ratefleet.runtime.store import REPLY_HEADER
from ratefleet.schemas import Subjects

pytestmark = [pytest.mark.anyio, pytest.mark.timeout(60)]
SUBJECTS = Subjects("ratefleet")


def result_json(job_id: str, status: str = "succeeded") -> bytes:
    return json.dumps({"job_id": job_id, "status": status, "tier": "normal", "attempts": 1}).encode()


async def stand_in_worker(nc, answers: int = 1, chunk: bool = False):
    """Answers each JOBS message on its reply header `answers` times (after an optional
    chunk to `<reply>.s`), in reverse arrival order per burst."""
    async def on_job(msg):
        reply = msg.headers[REPLY_HEADER]
        job_id = json.loads(msg.data)["id"]
        await asyncio.sleep(0.01 if int(job_id[-1], 16) % 2 else 0.05)  # answers out of order
        if chunk:
            await nc.publish(reply + ".s", b'{"chunk": "not a Result"}')
        for _ in range(answers):
            await nc.publish(reply, result_json(job_id))

    return await nc.subscribe(SUBJECTS.jobs("*"), cb=on_job)


async def jobs_stream(nc) -> None:
    await nc.jetstream().add_stream(name=SUBJECTS.jobs_stream, subjects=[SUBJECTS.jobs(">")])


def count_subs(nc) -> list[int]:
    """Count the SUB and UNSUB protocol messages the connection writes from now on."""
    counts = [0, 0]
    transport = nc._transport
    original = transport.writelines

    def counting(payload):
        data = b"".join(payload)
        counts[0] += data.count(b"\r\nSUB ") + data.startswith(b"SUB ")
        counts[1] += data.count(b"\r\nUNSUB ") + data.startswith(b"UNSUB ")
        return original(payload)

    transport.writelines = counting
    return counts


def job(i: int) -> dict:
    return {"request": {"path": "/v1/x", "json": {"i": i}}}


async def test_concurrent_requests_each_get_their_own_result_over_one_subscription(nats_server):
    worker_nc = await nats.connect(nats_server.url)
    await jobs_stream(worker_nc)
    await stand_in_worker(worker_nc, answers=2, chunk=True)  # a second answer and a chunk each
    async with await Client.connect(nats_server.url) as client:
        await client.request(job(-1), "normal", timeout=10)  # the one subscription is made here
        subs = count_subs(client.nc)
        results = await asyncio.gather(*(client.request(job(i), "normal", timeout=10) for i in range(20)))
        await asyncio.sleep(0.2)  # the second answers arrive: nobody waits for them
        waiting, subs = client.replies.waiting, list(subs)  # (closing unsubscribes everything)
    await worker_nc.close()
    assert len({r.job_id for r in results}) == 20
    assert all(r.status == "succeeded" for r in results)
    assert subs == [0, 0], f"{subs[0]} SUB and {subs[1]} UNSUB for 20 requests; want none after the first"
    assert waiting == 0


async def test_a_reply_inbox_resolves_only_its_own_future_and_drops_late_replies(nats_server):
    nc = await nats.connect(nats_server.url)
    try:
        inbox = ReplyInbox(nc)
        first, first_future = await inbox.expect()
        second, second_future = await inbox.expect()
        assert first != second and first.rsplit(".", 1)[0] == second.rsplit(".", 1)[0] == inbox.prefix
        await nc.publish(second + ".s", b"chunk")  # one token deeper: not a reply
        await nc.publish(second, b"two")
        await nc.publish(second, b"two again")
        assert (await asyncio.wait_for(second_future, 5)).data == b"two"
        assert not first_future.done()
        inbox.discard(first)
        assert first_future.cancelled() and inbox.waiting == 0
        await nc.publish(first, b"late")  # nobody waits: dropped, nothing raised
        await nc.flush()
        third, third_future = await inbox.expect()
        await nc.publish(third, b"three")
        assert (await asyncio.wait_for(third_future, 5)).data == b"three"
    finally:
        await nc.close()


async def test_a_request_that_times_out_stops_waiting(nats_server):
    nc = await nats.connect(nats_server.url)
    await jobs_stream(nc)  # stored, never answered
    try:
        async with await Client.connect(nats_server.url) as client:
            with pytest.raises(Exception, match="no result for job"):
                await client.request(job(1), "normal", timeout=0.5)
            assert client.replies.waiting == 0
    finally:
        await nc.close()
