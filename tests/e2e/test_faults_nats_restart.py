"""NATS goes away mid-batch and comes back on the same port with the same store: the
dispatcher and the workers reconnect by themselves, and every job gets exactly one result."""

from __future__ import annotations

import asyncio
import time

import pytest
from faultkit import (
    Tracker,
    assert_exactly_once,
    assert_only_host,
    chat,
    fast_keys,
    figure,
    restartable_nats,
    until,
    upstream,
    wait_workers,
)
from fleetkit import FleetKit

from ratefleet import Client

pytestmark = [pytest.mark.timeout(75), pytest.mark.anyio]


@pytest.fixture
def bouncy_nats(tmp_path):
    """An embedded nats-server pinned to its port, so stop()/start() comes back at the same URL."""
    server = restartable_nats(tmp_path / "nats")
    try:
        yield server
    finally:
        server.stop()


@pytest.mark.parametrize("how", ["sigterm", "sigkill"])
async def test_nats_restart_mid_batch_loses_nothing(tmp_path, bouncy_nats, how):
    n = 200
    url = bouncy_nats.url
    with upstream(latency_ms=200) as mock:
        kit = FleetKit(tmp_path, url, mock.url, keys=fast_keys(rps=100, burst=10))
        try:
            kit.dispatcher("d1")
            kit.worker("w1", slots=12)
            kit.worker("w2", slots=12)
            async with Tracker(url) as tracker:
                async with await Client.connect(url) as client:
                    await wait_workers(client, {"w1", "w2"})
                    ids = await client.submit_many([chat(i) for i in range(n)], "normal", batch="bounce")
                await until(lambda: tracker.seen(ids) >= 40, 20, 0.05, "40 results before the bounce")
                done_before = tracker.seen(ids)
                down_at = time.monotonic()
                if how == "sigkill":
                    bouncy_nats.kill()
                else:
                    bouncy_nats.stop()
                await asyncio.sleep(1.0)
                bouncy_nats.start()
                up_at = time.monotonic()
                assert bouncy_nats.url == url

                counts = await tracker.wait_stored("bounce", ids, timeout=45)
                all_done_s = time.monotonic() - up_at
                after_restart = sorted(t for t in tracker.first_seen.values() if t > up_at)
                assert all(p.poll() is None for p in kit.processes), \
                    {p.name: p.returncode for p in kit.processes if p.poll() is not None}
                assert_exactly_once(counts, ids)
                results = await tracker.results(ids, "bounce")
                assert all(r.status == "succeeded" for r in results.values()), \
                    sorted({(r.status, r.error.code if r.error else None) for r in results.values()})
                upstream_calls = sum(k["calls"] for k in mock.stats()["keys"].values())
                figure(f"NATS restart ({how})", jobs=n, done_before=done_before, downtime_s=up_at - down_at,
                       restart_to_first_result_s=(after_restart[0] - up_at) if after_restart else None,
                       restart_to_all_results_s=all_done_s, upstream_calls=upstream_calls,
                       extra_calls=upstream_calls - n, retried=sum(1 for r in results.values() if r.attempts > 1))
                # the fleet serves new work after the bounce, too
                async with await Client.connect(url) as client:
                    status = await wait_workers(client, {"w1", "w2"}, timeout=15)
                    more = await client.submit_many([chat(500 + i) for i in range(10)], "vip", batch="more")
                    assert_exactly_once(await tracker.wait_stored("more", more, timeout=20), more)
                assert status["leader"] == "d1"
                assert upstream_calls <= n + 24, "more repeated calls than calls in flight at the bounce"
                assert_only_host(mock)
        finally:
            kit.stop()
