"""Nothing lost when a worker dies: SIGKILL mid-batch, and slow calls kept alive past ack_wait.

Real `python -m ratefleet dispatcher|worker` processes, a real nats-server and the real
mock upstream. Every test checks N submitted -> N stored results, each job id once.
"""

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
    embed_job,
    fast_keys,
    figure,
    upstream,
    wait_workers,
    worker_in_flight,
)
from fleetkit import FleetKit

from ratefleet import Client

pytestmark = [pytest.mark.timeout(60), pytest.mark.anyio]


async def test_sigkill_worker_mid_batch_loses_nothing(tmp_path, nats_server):
    n = 240
    with upstream(latency_ms=300) as mock:
        # ack_wait 20 s: orphaned calls must come back through the missed heartbeat (2 s),
        # and the bound below leaves a loaded machine room without reaching ack_wait
        kit = FleetKit(tmp_path, nats_server.url, mock.url, keys=fast_keys(rps=120, burst=20),
                       overrides={"streams": {"ack_wait_s": 20}})
        try:
            kit.dispatcher("d1")
            w1 = kit.worker("w1", slots=12)
            kit.worker("w2", slots=12)
            async with await Client.connect(nats_server.url) as client, Tracker(nats_server.url) as tracker:
                await wait_workers(client, {"w1", "w2"})
                ids = await client.submit_many([chat(i) for i in range(n)], "normal", batch="crash")

                # wait until w1 has calls in flight, well into the batch
                deadline = time.monotonic() + 20
                status = None
                while time.monotonic() < deadline:
                    asked = time.monotonic()
                    status = await client.status(timeout=2)
                    # the leader's count can be a moment older than the Results seen meanwhile
                    finished_since = sum(1 for job_id, seen in tracker.first_seen.items()
                                         if seen >= asked - 0.1 and tracker.worker_of.get(job_id) == "w1")
                    if tracker.seen(ids) >= 40 and worker_in_flight(status, "w1") - finished_since >= 4:
                        break
                    await _sleep(0.05)
                in_flight_w1 = worker_in_flight(status, "w1")
                done_before = tracker.seen(ids)
                assert done_before < n, "the batch finished before the crash; make it longer"
                w1.kill()
                killed_at = time.monotonic()
                w1.wait(5)

                counts = await tracker.wait_stored("crash", ids, timeout=40)
                all_done = time.monotonic()
                assert_exactly_once(counts, ids)

                # recovery: the jobs w1 had in flight get a result from w2 soon after the
                # dispatcher misses w1's heartbeat (worker_timeout_s=2), not after ack_wait (10 s)
                results = await tracker.results(ids, "crash")
                assert all(r.status == "succeeded" for r in results.values()), \
                    {r.status for r in results.values()}
                retried = [r for r in results.values() if r.attempts > 1]
                assert retried, "no job was retried: the crash hit no call in flight"
                assert all(r.worker == "w2" for r in retried)
                recovered = max(tracker.first_seen[r.job_id] for r in retried) - killed_at
                stats = mock.stats()
                upstream_calls = sum(k["calls"] for k in stats["keys"].values())
                figure("worker SIGKILL", jobs=n, done_before_kill=done_before, w1_in_flight_at_kill=in_flight_w1,
                       retried_jobs=len(retried), recovery_s=recovered, kill_to_all_results_s=all_done - killed_at,
                       upstream_calls=upstream_calls, extra_calls=upstream_calls - n,
                       slowest_retried=sorted((round(tracker.first_seen[r.job_id] - killed_at, 2), r.attempts)
                                              for r in retried)[-3:])
                assert recovered < 12.0, f"orphaned jobs took {recovered:.1f}s to recover (ack_wait is 20 s)"
                # calls repeated only for what the crash interrupted
                assert n <= upstream_calls <= n + in_flight_w1 + 12
                assert_only_host(mock)
        finally:
            kit.stop()


async def test_slow_call_longer_than_ack_wait_runs_exactly_once(tmp_path, nats_server):
    ack_wait = 3
    sleep_ms = 8000  # > 2x ack_wait: only in-progress acks keep the JOBS message from redelivery
    with upstream() as mock:
        kit = FleetKit(tmp_path, nats_server.url, mock.url, keys=fast_keys(),
                       overrides={"streams": {"ack_wait_s": ack_wait}})
        try:
            kit.dispatcher("d1")
            kit.worker("w1")
            kit.worker("w2")
            async with await Client.connect(nats_server.url) as client, Tracker(nats_server.url) as tracker:
                await wait_workers(client, {"w1", "w2"})
                started = time.monotonic()
                slow = await client.submit(embed_job(0, id="slow-1", mock={"sleep_ms": sleep_ms}), "normal",
                                           batch="slow")
                others = await client.submit_many([chat(i) for i in range(20)], "normal", batch="slow")
                ids = [slow, *others]
                counts = await tracker.wait_stored("slow", ids, timeout=30)
                assert_exactly_once(counts, ids)
                result = await tracker.result(slow, "slow")
                took = tracker.first_seen[slow] - started
                # without in-progress acks the message is redelivered every ack_wait while the
                # call runs, and each redelivery starts another call: count calls as they arrive
                # (not as they end), and wait past one more ack_wait so a late one shows too
                await asyncio.sleep(ack_wait + 1)
                arrived = sum(k["calls"] for k in mock.stats()["keys"].values())
                figure("slow call", sleep_ms=sleep_ms, ack_wait_s=ack_wait, result_after_s=took,
                       attempts=result.attempts, slow_calls=calls(mock, path="/v1/embeddings"))
                assert result.status == "succeeded" and result.attempts == 1
                assert result.timings.upstream_ms >= sleep_ms * 0.95
                assert calls(mock, path="/v1/embeddings") == 1, "the slow job was called more than once"
                assert arrived == 21, f"{arrived} calls reached the upstream for 21 jobs: the slow job was dispatched again"
                assert tracker.publishes[slow] == 1, "a second Result was published for the slow job"
                assert calls(mock, path="/v1/chat/completions") == 20
                assert_only_host(mock)
        finally:
            kit.stop()


async def _sleep(seconds: float) -> None:
    await asyncio.sleep(seconds)
