"""Graceful shutdown of a worker mid-batch: SIGTERM -> it finishes its calls in flight within
`workers.grace_s`, takes nothing new, exits 0; the other worker does the rest; no job is
called twice. (The leader dispatcher's SIGTERM is in test_faults_dispatcher.py.)"""

from __future__ import annotations

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
    wait_workers,
    worker_in_flight,
)
from fleetkit import FleetKit

from ratefleet import Client

pytestmark = [pytest.mark.timeout(60), pytest.mark.anyio]


async def test_sigterm_worker_finishes_its_calls_and_exits(tmp_path, nats_server):
    n = 60
    latency_ms = 1200
    grace_s = 5
    with upstream(latency_ms=latency_ms) as mock:
        kit = FleetKit(tmp_path, nats_server.url, mock.url, keys=fast_keys(),
                       overrides={"workers": {"grace_s": grace_s}})
        try:
            kit.dispatcher("d1")
            w1 = kit.worker("w1", slots=6)
            kit.worker("w2", slots=6)
            async with await Client.connect(nats_server.url) as client, Tracker(nats_server.url) as tracker:
                await wait_workers(client, {"w1", "w2"})
                ids = await client.submit_many([chat(i) for i in range(n)], "normal", batch="drain")

                asked: list[float] = []

                async def w1_busy():
                    # the leader's in-flight count can be a moment older than the Results: calls
                    # whose Results arrived since the ask are finished, not in flight (without
                    # this, a SIGTERM sent just after w1's wave ended found it idle)
                    asked.append(time.monotonic())
                    status = await status_or_none(client)
                    finished_since = sum(1 for job_id, seen in tracker.first_seen.items()
                                         if seen >= asked[-1] - 0.1 and tracker.worker_of.get(job_id) == "w1")
                    return (tracker.seen(ids) >= 6 and worker_in_flight(status, "w1") - finished_since >= 3
                            and status)

                status = await until(w1_busy, 20, 0.05, "w1 with calls in flight, mid-batch")
                in_flight = worker_in_flight(status, "w1")
                done_before = tracker.seen(ids)
                w1.terminate()
                termed_at = time.monotonic()
                rc = await wait_exit(w1, grace_s + 8)
                exit_s = time.monotonic() - termed_at

                counts = await tracker.wait_stored("drain", ids, timeout=40)
                assert_exactly_once(counts, ids)
                results = await tracker.results(ids, "drain")
                assert all(r.status == "succeeded" for r in results.values())
                by_w1_after = [r for r in results.values()
                               if r.worker == "w1" and tracker.first_seen[r.job_id] >= termed_at]
                stats = mock.stats()
                upstream_calls = sum(k["calls"] for k in stats["keys"].values())
                figure("worker SIGTERM", jobs=n, latency_ms=latency_ms, grace_s=grace_s, w1_in_flight=in_flight,
                       results_before_sigterm=done_before, w1_exit_code=rc, w1_exit_s=exit_s,
                       w1_finished_after_sigterm=len(by_w1_after),
                       by_worker={w: sum(1 for r in results.values() if r.worker == w) for w in ("w1", "w2")},
                       retried=sum(1 for r in results.values() if r.attempts > 1), upstream_calls=upstream_calls)
                assert rc == 0, f"w1 exited with {rc} (None: still running {grace_s + 8}s after SIGTERM)"
                assert exit_s < grace_s + 5, f"w1 exited {exit_s:.1f}s after SIGTERM (grace {grace_s}s)"
                # its calls in flight were finished by w1 itself, not abandoned and redone (the
                # status snapshot is a little older than the SIGTERM, so some of those `in_flight`
                # may have finished before it; an abandoned call would show as one call too many)
                # every call w1 had in flight was finished by w1: those the snapshot listed, less
                # the w1 results seen from a moment before it was asked for until the SIGTERM (at
                # most one assignment may have reached w1 only after the SIGTERM and been handed back)
                finished_before = sum(1 for r in results.values() if r.worker == "w1"
                                      and asked[-1] - 0.1 <= tracker.first_seen[r.job_id] < termed_at)
                assert len(by_w1_after) >= in_flight - finished_before - 1 and len(by_w1_after) >= 1, \
                    (len(by_w1_after), in_flight, finished_before)
                assert all(r.attempts == 1 for r in by_w1_after)
                assert upstream_calls == n, f"{upstream_calls - n} calls more than jobs: a job was called twice"
                # and the leader stopped using it
                final = await wait_workers(client, {"w2"}, timeout=5)
                assert "w1" not in {w["id"] for w in final["workers"]} or \
                    all(w.get("draining") for w in final["workers"] if w["id"] == "w1")
                assert_only_host(mock)
        finally:
            kit.stop()


async def test_draining_worker_hands_back_late_assignments_without_using_an_attempt(tmp_path, nats_server):
    """An assignment can reach a worker after its SIGTERM (sent before the leader read the
    draining heartbeat). The worker hands it back at once, recorded in ratefleet_handbacks,
    so the redelivery is not counted as an attempt; it is never called, never dropped."""
    import asyncio
    import json

    import nats

    from ratefleet.schemas import Subjects
    from ratefleet.schemas.internal import Assignment, Heartbeat

    subjects = Subjects()
    with upstream(latency_ms=3000) as mock:  # one slow call keeps w1 draining for a while
        kit = FleetKit(tmp_path, nats_server.url, mock.url, keys=fast_keys(), overrides={"workers": {"grace_s": 10}})
        nc = await nats.connect(nats_server.url)
        try:
            beats: asyncio.Queue = asyncio.Queue()

            async def on_beat(msg):
                await beats.put(Heartbeat.model_validate_json(msg.data))

            await nc.subscribe(subjects.heartbeat, cb=on_beat)
            w1 = kit.worker("w1", slots=4)
            await asyncio.wait_for(beats.get(), 15)  # w1 is up (and has created the streams)
            js = nc.jetstream()
            for i in (1, 2):
                await js.publish(subjects.jobs("normal"), json.dumps(chat(i, id=f"late-{i}", batch="late")).encode(),
                                 headers={"Nats-Msg-Id": f"late-{i}"})
            # take both off the tier consumer by hand, as the leader would
            pull = await js.pull_subscribe_bind("tier-normal", stream=subjects.jobs_stream)
            first, second = await pull.fetch(2, timeout=5)

            async def assign(msg, n: int) -> None:
                job = json.loads(msg.data)
                assignment = Assignment(id=f"d9.{n}", job=job, job_id=job["id"], tier="normal", upstream="mock",
                                        key_id="k1", pool="shared", ack=msg.reply, attempt=1, max_attempts=1,
                                        submitted_at=time.time(), queued_ms=0.0, seq=msg.metadata.sequence.stream)
                await nc.publish(subjects.assign("w1"), assignment.model_dump_json().encode())
                await nc.flush()

            await assign(first, 1)

            async def running() -> bool:
                beat = await asyncio.wait_for(beats.get(), 5)
                return any(item.assignment == "d9.1" for item in beat.in_flight)

            await until(running, 10, 0.0, "the first call running on w1")
            w1.terminate()

            async def draining() -> bool:
                beat = await asyncio.wait_for(beats.get(), 5)
                return beat.worker == "w1" and beat.draining

            await until(draining, 10, 0.0, "w1 draining")
            await assign(second, 2)  # late: sent before a leader would have read that heartbeat
            again = (await pull.fetch(1, timeout=5))[0]
            assert again.metadata.sequence.stream == second.metadata.sequence.stream
            assert again.metadata.num_delivered == 2
            entry = await (await js.key_value(subjects.handbacks_bucket)).get(f"s{second.metadata.sequence.stream}")
            assert int(entry.value) == 1, "the handback was not recorded: the redelivery would count as an attempt"
            assert await wait_exit(w1, 15) == 0
            assert calls(mock) == 1, "the late assignment was called by a draining worker"
            figure("late assignment to a draining worker", handed_back=1, handbacks_recorded=int(entry.value),
                   upstream_calls=calls(mock))
        finally:
            await nc.close()
            kit.stop()


@pytest.mark.parametrize("second", ["SIGTERM", "SIGINT"])
async def test_a_second_signal_does_not_cut_a_workers_drain_short(tmp_path, nats_server, second):
    """Ctrl-C in a terminal running `ratefleet up` sends SIGINT to every process of the fleet,
    and the supervisor then sends each child SIGTERM: a worker gets two signals within
    milliseconds. The second must not kill it while it finishes its paid calls (they would be
    abandoned and called again): it finishes them, stores each Result once and exits 0."""
    import signal

    n, latency_ms = 6, 1500
    with upstream(latency_ms=latency_ms) as mock:
        kit = FleetKit(tmp_path, nats_server.url, mock.url, keys=fast_keys(), overrides={"workers": {"grace_s": 10}})
        try:
            kit.dispatcher("d1")
            w1 = kit.worker("w1", slots=n)
            async with await Client.connect(nats_server.url) as client, Tracker(nats_server.url) as tracker:
                await wait_workers(client, {"w1"})
                ids = await client.submit_many([chat(i) for i in range(n)], "normal", batch="twice")

                async def all_in_flight():
                    status = await status_or_none(client)
                    # and none stored yet: the leader's count can be older than the Results
                    return worker_in_flight(status, "w1") == n and tracker.seen(ids) == 0 and status

                await until(all_in_flight, 20, 0.05, "every job in flight on w1")
                w1.send_signal(signal.SIGINT)
                time.sleep(0.05)
                w1.send_signal(getattr(signal, second))
                rc = await wait_exit(w1, 15)
                counts = await tracker.wait_stored("twice", ids, timeout=10)
                results = await tracker.results(ids, "twice")
                figure("second signal while draining", second=second, w1_exit_code=rc, stored=len(counts),
                       upstream_calls=calls(mock))
                assert rc == 0, f"w1 exited with {rc} after SIGINT + {second} (None: still running)"
                assert_exactly_once(counts, ids)
                assert all(r.status == "succeeded" and r.worker == "w1" and r.attempts == 1 for r in results.values())
                assert calls(mock) == n, f"{calls(mock) - n} calls more than jobs: a paid call was abandoned"
                assert "already stopping" in kit.logs()
        finally:
            kit.stop()
