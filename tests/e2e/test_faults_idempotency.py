"""The same job id twice is one job: one result, one upstream call (Client.submit twice, raw
publishes with one Nats-Msg-Id, request/reply twice); a second Result for a job is refused
for good, inside the dedup window and after it (max_msgs_per_subject=1, discard new)."""

from __future__ import annotations

import asyncio
import json
import time

import nats
import pytest
from faultkit import (
    SUBJECTS,
    Tracker,
    assert_exactly_once,
    assert_only_host,
    calls,
    chat,
    fast_keys,
    figure,
    until,
    upstream,
    wait_workers,
)
from fleetkit import FleetKit

from ratefleet import Client
from ratefleet.runtime.store import store_result
from ratefleet.schemas import ErrorInfo, Result

pytestmark = [pytest.mark.timeout(60), pytest.mark.anyio]


async def test_same_job_id_twice_is_one_job(tmp_path, nats_server):
    with upstream(latency_ms=100) as mock:
        kit = FleetKit(tmp_path, nats_server.url, mock.url, keys=fast_keys())
        raw = await nats.connect(nats_server.url)
        try:
            kit.dispatcher("d1")
            kit.worker("w1")
            kit.worker("w2")
            js = raw.jetstream()
            async with await Client.connect(nats_server.url) as client, Tracker(nats_server.url) as tracker:
                await wait_workers(client, {"w1", "w2"})
                first = await client.submit(chat(1, id="dup-1"), "normal", batch="dup")
                second = await client.submit(chat(1, id="dup-1"), "normal", batch="dup")
                assert first == second == "dup-1"
                acks = [await js.publish("ratefleet.jobs.normal", json.dumps(chat(2, id="dup-2", batch="dup")).encode(),
                                         headers={"Nats-Msg-Id": "dup-2"}) for _ in range(3)]
                assert [a.duplicate for a in acks] == [None, True, True] or [bool(a.duplicate) for a in acks] == \
                    [False, True, True]
                many = await client.submit_many([chat(3, id="dup-3"), chat(3, id="dup-3"), chat(4, id="dup-4")],
                                                "normal", batch="dup")
                assert many == ["dup-3", "dup-3", "dup-4"]
                # the same id on two tiers is still one job (dedup is per stream)
                await client.submit(chat(5, id="dup-5"), "vip", batch="dup")
                await client.submit(chat(5, id="dup-5"), "guest", batch="dup")
                # request/reply twice: the second caller gets the stored result
                one = await client.request(chat(6, id="dup-6", batch="dup"), "normal", timeout=20)
                two = await client.request(chat(6, id="dup-6", batch="dup"), "normal", timeout=20)
                assert one.job_id == two.job_id == "dup-6" and one.status == two.status == "succeeded"
                assert one.timings.total_ms == two.timings.total_ms, "the second request got a different result"
                # raw rpc twice with one id
                r1 = Result.from_json((await raw.request("ratefleet.rpc.premium",
                                                         json.dumps(chat(7, id="dup-7", batch="dup")).encode(),
                                                         timeout=20)).data)
                r2 = Result.from_json((await raw.request("ratefleet.rpc.premium",
                                                         json.dumps(chat(7, id="dup-7", batch="dup")).encode(),
                                                         timeout=20)).data)
                assert r1.job_id == r2.job_id == "dup-7" and r1.timings.total_ms == r2.timings.total_ms

                ids = [f"dup-{i}" for i in range(1, 8)]
                counts = await tracker.wait_stored("dup", ids, timeout=20)
                assert_exactly_once(counts, ids)
                # and once everything is done, the same ids again change nothing
                await client.submit(chat(1, id="dup-1"), "normal", batch="dup")
                await js.publish("ratefleet.jobs.normal", json.dumps(chat(2, id="dup-2", batch="dup")).encode(),
                                 headers={"Nats-Msg-Id": "dup-2"})
                await asyncio.sleep(2.0)
                assert_exactly_once(await tracker.stored("dup"), ids)
                upstream_calls = mock.stats()["requests"]
                figure("duplicate submissions", distinct_jobs=len(ids), submissions=15, upstream_calls=upstream_calls,
                       result_publishes=sum(tracker.publishes[i] for i in ids))
                assert upstream_calls == len(ids), f"{upstream_calls} upstream calls for {len(ids)} distinct jobs"
                assert_only_host(mock)
        finally:
            await raw.close()
            kit.stop()


async def _store(client, result: Result, within: float = 10.0):
    """store_result, which must answer promptly (a worker waits on it before acking the job)."""
    started = time.monotonic()
    try:
        return await asyncio.wait_for(store_result(client.js, SUBJECTS, result), within)
    except TimeoutError:
        raise AssertionError(f"store_result of a second result for {result.job_id} did not return within "
                             f"{within}s (it should answer False at once)") from None
    finally:
        figure("store_result", job=result.job_id, status=result.status, took_s=time.monotonic() - started)


async def test_second_result_for_a_job_is_refused_forever(tmp_path, nats_server):
    """store_result twice -> stored once (second False), inside and after the dedup window."""
    window = 1.0
    with upstream() as mock:
        kit = FleetKit(tmp_path, nats_server.url, mock.url, keys=fast_keys(),
                       overrides={"streams": {"duplicate_window_s": window}})
        try:
            kit.dispatcher("d1")  # creates the streams
            async with await Client.connect(nats_server.url) as client, Tracker(nats_server.url) as tracker:
                await until(lambda: tracker.js.stream_info(SUBJECTS.results_stream), 20, 0.2, "RATEFLEET_RESULTS")
                ok = Result(job_id="manual-1", status="succeeded", batch="once", attempts=1)
                other = Result(job_id="manual-1", status="failed", batch="once", attempts=2,
                               error=ErrorInfo(code="upstream_error", message="a late second answer"))
                assert await _store(client, ok) is True
                assert await _store(client, ok) is False  # same again: dedup
                assert await _store(client, other) is False  # different body, same job
                await asyncio.sleep(window + 1.0)  # past the dedup window
                assert await _store(client, other) is False  # max_msgs_per_subject=1
                stored = await tracker.result("manual-1", "once")
                assert stored.status == "succeeded" and stored.attempts == 1
                assert (await tracker.stored("once")) == {"manual-1": 1}
        finally:
            kit.stop()


async def test_an_id_reused_by_another_batch_inside_the_dedup_window_gets_its_result(tmp_path, nats_server):
    """A job id already answered under batch A, called again under batch B (a NATS restart lost
    the JOBS message's dedup entry, so the reuse was not caught at submit): B's Result is stored
    too, once, and A's stays. Before, the Result publish was a dedup hit and taken for "already
    stored": the call was paid and `submit --wait` of B waited for ever (a break-it trial)."""
    with upstream() as mock:
        kit = FleetKit(tmp_path, nats_server.url, mock.url, keys=fast_keys())
        try:
            kit.dispatcher("d1")  # creates the streams
            async with await Client.connect(nats_server.url) as client, Tracker(nats_server.url) as tracker:
                await until(lambda: tracker.js.stream_info(SUBJECTS.results_stream), 20, 0.2, "RATEFLEET_RESULTS")
                first = Result(job_id="reused-1", status="succeeded", batch="wzA", attempts=1)
                again = Result(job_id="reused-1", status="succeeded", batch="wzC", attempts=1)
                assert await _store(client, first) is True
                assert await _store(client, again) is True  # inside the dedup window of "reused-1"
                assert await _store(client, again) is False  # its redelivery: stored once
                assert await _store(client, first) is False
                assert (await tracker.stored("wzA")) == {"reused-1": 1}
                assert (await tracker.stored("wzC")) == {"reused-1": 1}
        finally:
            kit.stop()


async def test_job_resubmitted_after_the_dedup_window_keeps_its_first_result(tmp_path, nats_server):
    """Past the JOBS dedup window the same id, sent by a producer that does not mark repeats
    (a raw JetStream publish: `Nats-Msg-Id` only), runs again; its second Result is refused
    (max_msgs_per_subject=1), the first one stays, and the job is still acked promptly."""
    window = 1.0
    with upstream() as mock:
        kit = FleetKit(tmp_path, nats_server.url, mock.url, keys=fast_keys(),
                       overrides={"streams": {"duplicate_window_s": window}})
        try:
            kit.dispatcher("d1")
            kit.worker("w1")
            async with await Client.connect(nats_server.url) as client, Tracker(nats_server.url) as tracker:
                await wait_workers(client, {"w1"})
                await client.submit(chat(1, id="again-1"), "normal", batch="once")
                await tracker.wait_stored("once", ["again-1"], timeout=15)
                first = await tracker.result("again-1", "once")
                await asyncio.sleep(window + 1.0)
                await client.js.publish(SUBJECTS.jobs("normal"), json.dumps({**chat(1, id="again-1"), "batch": "once"})
                                        .encode(), headers={"Nats-Msg-Id": "again-1"})
                # the second run's result publish shows up on the wire; then the job must be acked
                await until(lambda: tracker.publishes["again-1"] >= 2, 15, 0.1, "the second run's result publish")
                drained = await _until_or_none(lambda: _queue_empty(tracker), 8)
                info = await client.js.stream_info(SUBJECTS.jobs_stream)
                counts = await tracker.stored("once")
                again = await tracker.result("again-1", "once")
                figure("resubmitted after the dedup window", upstream_calls=mock.stats()["requests"],
                       result_publishes=tracker.publishes["again-1"], stored=counts,
                       jobs_left_in_queue=info.state.messages, acked=bool(drained))
                assert counts == {"again-1": 1}
                assert again.timings.total_ms == first.timings.total_ms, "the first result was replaced"
                assert info.state.messages == 0, "the resubmitted job was not acked (its finisher is stuck)"
        finally:
            kit.stop()


async def test_job_resubmitted_with_the_client_after_the_dedup_window_is_answered_from_its_result(
        tmp_path, nats_server):
    """`Client.submit` of an own id marks the message `Ratefleet-Repeat`: past the dedup window
    the leader finds the job's Result and acks the message without a second call."""
    with upstream() as mock:
        kit = FleetKit(tmp_path, nats_server.url, mock.url, keys=fast_keys(),
                       overrides={"streams": {"duplicate_window_s": 1.0}})
        try:
            kit.dispatcher("d1")
            kit.worker("w1")
            async with await Client.connect(nats_server.url) as client, Tracker(nats_server.url) as tracker:
                await wait_workers(client, {"w1"})
                await client.submit(chat(1, id="again-2"), "normal", batch="once")
                await tracker.wait_stored("once", ["again-2"], timeout=15)
                await asyncio.sleep(2.0)  # past the dedup window
                await client.submit(chat(1, id="again-2"), "normal", batch="once")
                await until(lambda: _queue_empty(tracker), 15, 0.1, "the resubmitted message acked")
                assert mock.stats()["requests"] == 1, "the resubmitted job was called (paid) again"
                assert tracker.publishes["again-2"] == 1 and await tracker.stored("once") == {"again-2": 1}
        finally:
            kit.stop()


async def _queue_empty(tracker) -> bool:
    return await tracker.jobs_in_stream() == 0


async def _until_or_none(predicate, timeout: float):
    try:
        return await until(predicate, timeout, 0.2)
    except AssertionError:
        return None


async def test_redelivered_job_with_a_stored_result_is_not_called_again(tmp_path, nats_server):
    """A worker that stored a job's Result and died before the ack leaves the JOBS message to
    be redelivered. The next delivery must be answered and acked from the store: no second
    upstream call, the first Result unchanged, the waiter on the reply subject answered."""
    with upstream() as mock:
        kit = FleetKit(tmp_path, nats_server.url, mock.url, keys=fast_keys())
        raw = await nats.connect(nats_server.url)
        try:
            first = kit.dispatcher("d1")  # no worker yet: d1 holds the job in its window
            async with await Client.connect(nats_server.url) as client:
                await until(lambda: _leader_is(client, "d1", pending=0), 20, 0.1, "d1 leading")
                replies = asyncio.Queue()
                inbox = raw.new_inbox()
                await raw.subscribe(inbox, cb=replies.put)
                await raw.flush()
                await raw.jetstream().publish(SUBJECTS.jobs("normal"), json.dumps(chat(1, id="done-1", batch="pre")).encode(),
                                              headers={"Nats-Msg-Id": "done-1", "Ratefleet-Reply-To": inbox})
                await until(lambda: _leader_is(client, "d1", pending=1), 20, 0.1, "d1 holding the job")
                # what the dead worker got done: the Result is stored, the ack never sent
                earlier = Result(job_id="done-1", status="succeeded", batch="pre", attempts=1, worker="w-dead",
                                 metadata={"marker": "stored-before-the-crash"})
                assert await _store(client, earlier) is True
                first.terminate()  # hands the job back: it is delivered again to the next leader
                kit.dispatcher("d2")
                kit.worker("w1")
                reply = Result.from_json((await asyncio.wait_for(replies.get(), 20)).data)
                assert reply.worker == "w-dead" and reply.metadata == {"marker": "stored-before-the-crash"}
                await until(lambda: _consumer_empty(client), 10, 0.1, "the JOBS message acked")
                await asyncio.sleep(0.5)  # a wrongly dispatched call would reach the mock by now
                assert calls(mock) == 0, "the job was called again although its Result was stored"
                assert "already has its result" in kit.logs()
                figure("redelivered job with a stored result", upstream_calls=calls(mock), replied_from_store=True)
        finally:
            await raw.close()
            kit.stop()


async def _leader_is(client, name: str, pending: int) -> bool:
    try:
        status = await client.status(timeout=1)
    except Exception:  # noqa: BLE001 - no leader yet
        return False
    return status.get("leader") == name and status["tiers"]["normal"].get("pending") == pending


async def _consumer_empty(client) -> bool:
    info = await client.js.consumer_info(SUBJECTS.jobs_stream, "tier-normal")
    return info.num_pending == 0 and info.num_ack_pending == 0
