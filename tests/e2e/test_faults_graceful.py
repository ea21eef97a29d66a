"""Graceful shutdown of a worker mid-batch: SIGTERM -> it finishes its calls in flight within
`workers.grace_s`, takes nothing new, exits 0; the other worker does the rest; no job is
called twice. (The leader dispatcher's SIGTERM is in test_faults_dispatcher.py.)"""

from __future__ import annotations

import time

import pytest

from faultkit import (Tracker, assert_exactly_once, assert_only_host, chat, fast_keys, figure, status_or_none, until,
                      upstream, wait_exit, wait_workers, worker_in_flight)
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

                async def w1_busy():
                    status = await status_or_none(client)
                    return tracker.seen(ids) >= 6 and worker_in_flight(status, "w1") >= 3 and status

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
                assert exit_s < grace_s + 3
                # its calls in flight were finished by w1 itself, not abandoned and redone (the
                # status snapshot is a little older than the SIGTERM, so some of those `in_flight`
                # may have finished before it; an abandoned call would show as one call too many)
                assert len(by_w1_after) >= 1
                assert all(r.attempts == 1 for r in by_w1_after)
                assert upstream_calls == n, f"{upstream_calls - n} calls more than jobs: a job was called twice"
                # and the leader stopped using it
                final = await wait_workers(client, {"w2"}, timeout=5)
                assert "w1" not in {w["id"] for w in final["workers"]} or \
                    all(w.get("draining") for w in final["workers"] if w["id"] == "w1")
                assert_only_host(mock)
        finally:
            kit.stop()
