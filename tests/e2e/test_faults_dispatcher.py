"""Nothing lost when the leader dispatcher goes away: SIGKILL (the lease lapses) and SIGTERM
(the lease is released at once), both in the middle of a batch, with a standby running."""

from __future__ import annotations

import asyncio
import time

import pytest
from faultkit import (
    Tracker,
    assert_exactly_once,
    assert_only_host,
    calls,
    chat,
    fast_keys,
    figure,
    status_or_none,
    until,
    upstream,
    wait_exit,
    wait_leader_is,
    wait_workers,
)
from fleetkit import FleetKit, collect

from ratefleet import Client

pytestmark = [pytest.mark.timeout(60), pytest.mark.anyio]


async def _two_dispatchers(kit: FleetKit, client) -> tuple[str, str, dict]:
    kit.dispatcher("d1")
    kit.worker("w1", slots=12)
    kit.worker("w2", slots=12)
    await asyncio.sleep(0.3)
    kit.dispatcher("d2")
    status = await wait_workers(client, {"w1", "w2"})
    leader = status["leader"]
    assert leader in ("d1", "d2")
    standby = "d2" if leader == "d1" else "d1"
    # the standby is up too: its own status answer names the leader
    await until(lambda: _standby_answers(client, standby), 15, 0.2, f"{standby} answering status")
    return leader, standby, status


async def _standby_answers(client, standby: str) -> bool:
    for _ in range(6):  # status is a queue group: ask until the standby is the one answering
        status = await client.status(timeout=1)
        if status.get("dispatcher") == standby:
            return True
    return False


def _proc(kit: FleetKit, name: str):
    return next(p for p in kit.processes if p.name == name)


async def test_sigkill_leader_mid_batch_standby_takes_over(tmp_path, nats_server):
    n = 300
    with upstream(latency_ms=300) as mock:
        kit = FleetKit(tmp_path, nats_server.url, mock.url, keys=fast_keys(rps=80, burst=10))
        try:
            async with await Client.connect(nats_server.url) as client, Tracker(nats_server.url) as tracker:
                leader, standby, _ = await _two_dispatchers(kit, client)
                ids = await client.submit_many([chat(i) for i in range(n)], "normal", batch="failover")
                await until(lambda: tracker.seen(ids) >= 50, 20, 0.05, "50 results before the kill")
                done_before = tracker.seen(ids)
                _proc(kit, leader).kill()
                killed_at = time.monotonic()
                # jobs submitted right after the kill can only be dispatched by the new leader
                after = await client.submit_many([chat(1000 + i) for i in range(10)], "vip", batch="after")
                status = await wait_leader_is(client, lambda who: who == standby, timeout=10)
                new_leader_s = time.monotonic() - killed_at
                # and jobs submitted once status names the new leader
                later = await client.submit_many([chat(2000 + i) for i in range(10)], "vip", batch="later")
                later_at = time.monotonic()
                await until(lambda: tracker.seen(later) >= 1, 15, 0.02, "first result of a job sent to the new leader")
                first_later_s = min(tracker.first_seen[i] for i in later if i in tracker.first_seen) - later_at
                await until(lambda: tracker.seen(after) >= 1, 15, 0.02, "first result of a job sent after the kill")
                first_after_s = min(tracker.first_seen[i] for i in after if i in tracker.first_seen) - killed_at
                # the first batch result the new leader dispatched: the old leader's assignments
                # (300 ms calls) are all done 1 s after the kill
                await until(lambda: any(t > killed_at + 1.0 for t in tracker.first_seen.values()), 15, 0.02,
                            "a result dispatched by the new leader")
                resumed_s = min(t for t in tracker.first_seen.values() if t > killed_at + 1.0) - killed_at

                counts = await tracker.wait_stored("failover", ids, timeout=35)
                all_done_s = time.monotonic() - killed_at
                assert_exactly_once(counts, ids)
                assert_exactly_once(await tracker.wait_stored("after", after, timeout=15), after)
                assert_exactly_once(await tracker.wait_stored("later", later, timeout=10), later)
                results = await tracker.results(ids, "failover")
                assert all(r.status == "succeeded" for r in results.values())
                upstream_calls = sum(k["calls"] for k in mock.stats()["keys"].values())
                figure("leader SIGKILL", jobs=n, done_before_kill=done_before, killed=leader,
                       status_names_new_leader_s=new_leader_s, kill_to_first_new_dispatch_s=resumed_s,
                       kill_to_first_result_of_job_sent_after_kill_s=first_after_s,
                       first_result_of_job_sent_to_new_leader_s=first_later_s,
                       kill_to_all_results_s=all_done_s, upstream_calls=upstream_calls,
                       extra_calls=upstream_calls - n - 2 * len(after))
                assert status["leader"] == standby, status
                final = await wait_workers(client, {"w1", "w2"}, timeout=5)
                assert final["leader"] == standby and final["dispatcher"] == standby, final
                # lease TTL 2 s, ack_wait 10 s: a takeover that waited for redeliveries would take
                # >= 10 s; the bounds leave a loaded 2-core machine room below that
                assert new_leader_s < 8.0, f"status named the new leader only after {new_leader_s:.1f}s"
                assert resumed_s < 8.0, f"the standby dispatched its first job {resumed_s:.1f}s after the kill"
                assert first_later_s < 4.0, f"a job sent to the new leader waited {first_later_s:.1f}s (300 ms calls)"
                # not asserted: jobs the dead leader held (and jobs published in the instant after
                # the kill, which its pull requests still took) come back only after ack_wait
                # each job called once: the old leader's assignments finish on the workers
                assert upstream_calls == n + 2 * len(after)
                assert_only_host(mock)
        finally:
            kit.stop()


async def test_sigterm_leader_hands_over_at_once(tmp_path, nats_server):
    n = 200
    ttl = 12.0  # a takeover that waited for the lease to lapse would take >= 12 s
    ack_wait = 30  # held jobs that waited for redelivery would take >= 30 s
    with upstream(latency_ms=300) as mock:
        kit = FleetKit(tmp_path, nats_server.url, mock.url, keys=fast_keys(rps=80, burst=10),
                       overrides={"dispatcher": {"lease_ttl_s": ttl}, "streams": {"ack_wait_s": ack_wait}})
        try:
            async with await Client.connect(nats_server.url) as client, Tracker(nats_server.url) as tracker:
                leader, standby, _ = await _two_dispatchers(kit, client)
                ids = await client.submit_many([chat(i) for i in range(n)], "normal", batch="handover")
                await until(lambda: tracker.seen(ids) >= 40, 20, 0.05, "40 results before SIGTERM")
                proc = _proc(kit, leader)
                proc.terminate()
                termed_at = time.monotonic()
                after = await client.submit_many([chat(1000 + i) for i in range(10)], "vip", batch="after")
                status = await wait_leader_is(client, lambda who: who == standby, timeout=10)
                new_leader_s = time.monotonic() - termed_at
                await until(lambda: tracker.seen(after) >= 1, 15, 0.02, "first result dispatched by the standby")
                first_after_s = min(tracker.first_seen[i] for i in after if i in tracker.first_seen) - termed_at
                rc = await wait_exit(proc, 10)
                counts = await tracker.wait_stored("handover", ids, timeout=30)
                all_done_s = time.monotonic() - termed_at
                assert_exactly_once(counts, ids)
                assert_exactly_once(await tracker.wait_stored("after", after, timeout=10), after)
                upstream_calls = sum(k["calls"] for k in mock.stats()["keys"].values())
                figure("leader SIGTERM", jobs=n, stopped=leader, exit_code=rc, lease_ttl_s=ttl,
                       status_names_new_leader_s=new_leader_s, first_result_by_new_leader_s=first_after_s,
                       sigterm_to_all_results_s=all_done_s, upstream_calls=upstream_calls)
                assert rc == 0, f"the leader exited with {rc} on SIGTERM"
                assert status["leader"] == standby
                assert new_leader_s < ttl / 2, f"handover took {new_leader_s:.1f}s (lease TTL {ttl}s): lease not released?"
                assert first_after_s < ttl / 2 + 1, f"first result by the new leader after {first_after_s:.1f}s"
                assert upstream_calls == n + len(after), "a job was called twice across the handover"
                # held jobs were given back at once (nak), not after ack_wait (30 s): the whole
                # remaining batch runs at the fleet's pace (about 2 s here)
                assert all_done_s < ack_wait / 2, f"the batch ended {all_done_s:.1f}s after SIGTERM"
                assert_only_host(mock)
        finally:
            kit.stop()


async def test_paused_leader_wakes_up_as_standby_without_double_calls(tmp_path, nats_server):
    """A leader frozen longer than its lease and ack_wait (VM pause, long GC, SIGSTOP) must not
    dispatch its stale window when it wakes up: the standby owns the lease and those jobs now."""
    import signal

    n = 200
    ack_wait = 4
    with upstream(latency_ms=300) as mock:
        kit = FleetKit(tmp_path, nats_server.url, mock.url, keys=fast_keys(rps=60, burst=10),
                       overrides={"streams": {"ack_wait_s": ack_wait}})
        try:
            async with await Client.connect(nats_server.url) as client, Tracker(nats_server.url) as tracker:
                leader, standby, _ = await _two_dispatchers(kit, client)
                ids = await client.submit_many([chat(i) for i in range(n)], "normal", batch="paused")
                await until(lambda: tracker.seen(ids) >= 30, 20, 0.05, "30 results before the pause")
                proc = _proc(kit, leader)
                proc.send_signal(signal.SIGSTOP)
                paused_at = time.monotonic()
                try:
                    await wait_leader_is(client, lambda who: who == standby, timeout=10)
                    new_leader_s = time.monotonic() - paused_at
                    # stay frozen past ack_wait: the jobs it held are redelivered to the new leader
                    await asyncio.sleep(max(0.0, ack_wait + 1.5 - (time.monotonic() - paused_at)))
                finally:
                    proc.send_signal(signal.SIGCONT)
                resumed_at = time.monotonic()
                counts = await tracker.wait_stored("paused", ids, timeout=30)
                assert_exactly_once(counts, ids)
                await asyncio.sleep(1.0)  # let a late duplicate call show up in the mock's counters
                status = await wait_leader_is(client, lambda who: who is not None, timeout=5)
                stats = mock.stats()
                upstream_calls = sum(k["calls"] for k in stats["keys"].values())
                figure("leader SIGSTOP/SIGCONT", jobs=n, paused=leader, pause_s=resumed_at - paused_at,
                       status_names_new_leader_s=new_leader_s, upstream_calls=upstream_calls,
                       double_calls=upstream_calls - n, upstream_429=sum(k["rate_limited"] for k in stats["keys"].values()),
                       leader_after=status.get("leader"), old_leader_alive=proc.poll() is None)
                assert status["leader"] == standby, "the woken leader took the lease back"
                assert upstream_calls == n, f"{upstream_calls - n} jobs were called twice after the old leader woke up"
                assert_only_host(mock)
        finally:
            kit.stop()


async def test_worker_drops_assignments_of_a_former_leader(tmp_path, nats_server):
    """The fencing epoch: an assignment still in a paused leader's send buffer reaches a worker
    after the new leader announced itself; the worker must drop it, not call the upstream.
    Epochs compare as (lease bucket created, lease revision): a bucket created anew (server
    state wiped) restarts the revisions and must still count as newer. A higher epoch not heard
    of for a while is forgotten, so a leader with a lower one is followed again, not ignored."""
    import nats

    from ratefleet.schemas import Subjects
    from ratefleet.schemas.internal import Assignment, LeaderAnnounce

    subjects = Subjects()
    with upstream() as mock:
        kit = FleetKit(tmp_path, nats_server.url, mock.url, keys=fast_keys())
        forget_s = 2 * kit.config()["dispatcher"]["lease_ttl_s"] + 2 * kit.config()["workers"]["heartbeat_s"]
        nc = await nats.connect(nats_server.url)
        try:
            beats = asyncio.Queue()
            await nc.subscribe(subjects.heartbeat, cb=beats.put)
            kit.worker("w1", slots=4)
            await asyncio.wait_for(beats.get(), 15)
            acks: dict[str, list[bytes]] = {}

            async def send(name: str, epoch: tuple[int, int]) -> None:
                inbox = nc.new_inbox()
                acks[name] = []

                async def on_ack(msg, name=name):
                    acks[name].append(msg.data)

                await nc.subscribe(inbox, cb=on_ack)
                assignment = Assignment(id=f"d9.{name}", job=chat(0, id=name, batch="fence"), job_id=name, tier="normal",
                                        upstream="mock", key_id="k1", pool="shared", ack=inbox, attempt=1, max_attempts=3,
                                        submitted_at=time.time(), queued_ms=0.0, epoch=epoch)
                await nc.publish(subjects.assign("w1"), assignment.model_dump_json().encode())
                await nc.flush()

            async def announce(epoch: tuple[int, int]) -> None:
                await nc.publish(subjects.leader_announce, LeaderAnnounce(leader="d9", epoch=epoch).model_dump_json().encode())
                await nc.flush()

            # assignments are read in order: once "current" is acked, the worker follows (5, 20)
            await send("current", (5, 20))
            await until(lambda: acks["current"], 15, 0.05, "the current assignment acked")
            await send("stale-revision", (5, 19))
            await send("stale-bucket", (4, 999))
            await send("newer-bucket", (6, 1))
            await until(lambda: acks["newer-bucket"], 15, 0.05, "the newer-bucket assignment acked")
            # a new leader's announce alone fences the worker against its predecessor too
            await announce((7, 3))
            # the announce and the assignments are read by different tasks: on once it is followed
            # (a fixed 1 s sleep here raced a worker late by more than that on a loaded machine)
            await until(lambda: '"epoch": "7.3", "event": "worker follows a new leader epoch"' in kit.logs(), 15, 0.05,
                        "the announce of (7, 3) followed")
            await send("before-announce", (6, 1))
            # nobody announces (7, 3) any more: after forget_s a lower leader is followed again
            await asyncio.sleep(forget_s + 0.5)
            await announce((3, 1))
            await until(lambda: '"epoch": "3.1", "event": "worker follows' in kit.logs(), 15, 0.05,
                        "the lower leader's announce followed")
            await send("lower-leader-after-forget", (3, 1))
            await until(lambda: acks["lower-leader-after-forget"], 15, 0.05, "the lower leader's assignment acked")
            await asyncio.sleep(0.5)  # time for a wrongly accepted stale call to show up
            dropped = ("stale-revision", "stale-bucket", "before-announce")
            assert {name: acks[name] for name in dropped} == {name: [] for name in dropped}
            assert calls(mock, path="/v1/chat/completions") == 3
            assert kit.logs().count("assignment from a former leader dropped") == 3
        finally:
            await nc.close()
            kit.stop()


async def test_rolling_dispatcher_restarts_do_not_use_up_attempts(tmp_path, nats_server):
    """Jobs in a leader's window are handed back at every graceful step-down. Those deliveries
    made no call, so they must not count as attempts: jobs with max_attempts=1 that went
    through two dispatcher restarts (no worker up yet) are still called, once each."""
    n = 5
    with upstream() as mock:
        kit = FleetKit(tmp_path, nats_server.url, mock.url, keys=fast_keys())
        try:
            async with await Client.connect(nats_server.url) as client:
                first = kit.dispatcher("d1")
                await wait_leader_is(client, lambda who: who == "d1", timeout=20)
                ids = await client.submit_many([chat(i, max_attempts=1) for i in range(n)], "normal", batch="rolling")

                async def holding(name: str) -> bool:
                    status = await status_or_none(client)
                    return bool(status and status.get("leader") == name
                                and status["tiers"]["normal"].get("pending") == n)

                for name in ("d1", "d2"):
                    proc = first if name == "d1" else kit.dispatcher(name)
                    await until(lambda name=name: holding(name), 20, 0.1, f"{name} holding the {n} jobs")
                    proc.terminate()
                    assert await wait_exit(proc, 15) == 0
                kit.dispatcher("d3")
                kit.worker("w1", slots=4)
                results = await collect(client, "rolling", n, timeout=30)
                assert sorted(results) == sorted(ids)
                assert {r.status for r in results.values()} == {"succeeded"}, \
                    {r.job_id: (r.status, r.error) for r in results.values()}
                assert [r.attempts for r in results.values()] == [1] * n
                assert calls(mock, path="/v1/chat/completions") == n
                figure("two rolling dispatcher restarts", jobs=n, max_attempts=1, succeeded=n,
                       upstream_calls=calls(mock, path="/v1/chat/completions"))
        finally:
            kit.stop()
