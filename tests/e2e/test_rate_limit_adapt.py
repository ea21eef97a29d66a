"""A 429 is a wait, not a failure, and a fleet adapts to what the provider really allows.

Real processes (nats-server, a dispatcher and a worker as `python -m ratefleet` children)
against the real mock upstream over HTTP:
- the provider allows 2 req/s per key while the config claims 20 (burst 20): every job
  succeeds with max_attempts = 2, few calls are 429s, and status shows each key's
  effective rate fallen to about the real one;
- a job refused with 429 more often than its max_attempts still succeeds once the keys
  have room, as attempt 1;
- `Retry-After: 0` on every answer does not make the fleet hammer the upstream: each key
  backs off exponentially, and the job ends `rate_limited` after the tier's
  max_rate_limited 429s (not after max_attempts), with a dead letter;
- the job's 429 count lives in JetStream, so it survives a leader failover;
- a cooldown ends with one call, not with the burst the bucket would have refilled to.
"""

from __future__ import annotations

import asyncio
import time

import pytest
from faultkit import Tracker, assert_exactly_once, chat, figure, upstream, wait_workers
from fleetkit import FleetKit, mock_keys

from ratefleet import Client

pytestmark = [pytest.mark.timeout(120), pytest.mark.anyio]


def _fleet(tmp_path, nats_url, mock, keys, **tier) -> FleetKit:
    kit = FleetKit(tmp_path, nats_url, mock.url, keys=keys,
                   overrides={"tiers": {"normal": {"max_attempts": 2, **tier}}})
    kit.dispatcher("d1")
    kit.worker("w1")
    return kit


def _most_calls_within(times: list[float], window_s: float) -> int:
    times = sorted(times)
    return max((sum(1 for t in times[i:] if t - start < window_s) for i, start in enumerate(times)), default=0)


async def test_fleet_adapts_to_a_provider_allowing_a_tenth_of_the_config(tmp_path, nats_server):
    n = 40
    real = mock_keys(rps=2, burst=2)
    claimed = [{"id": "k1", "rps": 20}, {"id": "k2", "rps": 20}]  # burst defaults to 20 as well
    with upstream(keys=real) as mock:
        kit = _fleet(tmp_path, nats_server.url, mock, claimed)
        try:
            async with await Client.connect(nats_server.url) as client, Tracker(nats_server.url) as tracker:
                await wait_workers(client, {"w1"})
                ids = await client.submit_many([chat(i) for i in range(n)], "normal", batch="adapt")
                counts = await tracker.wait_stored("adapt", ids, timeout=80)
                assert_exactly_once(counts, ids)
                results = await tracker.results(ids, "adapt")
                keys = (await client.status())["keys"]
        finally:
            kit.stop()
        stats = mock.stats()["keys"]
    calls = sum(stats[k]["calls"] for k in ("k1", "k2"))
    throttled = sum(stats[k]["rate_limited"] for k in ("k1", "k2"))
    figure("adapt to 2 req/s per key, config 20", jobs=n, calls=calls, calls_429=throttled,
           effective_rps={k: keys[k].get("effective_rps") for k in ("k1", "k2")},
           statuses=sorted({r.status for r in results.values()}))
    assert all(r.status == "succeeded" for r in results.values()), \
        sorted({(r.status, r.error.code if r.error else None) for r in results.values()})
    assert all(r.attempts == 1 for r in results.values()), "a 429 was counted as an attempt"
    assert throttled <= 0.25 * calls, f"{throttled} of {calls} calls were 429s"
    for key_id in ("k1", "k2"):
        assert keys[key_id]["rps"] == 20 and keys[key_id]["effective_rps"] <= 5, keys[key_id]


async def test_429s_are_waits_with_their_own_budget_and_retry_after_zero_makes_no_burst(tmp_path, nats_server):
    budget = 8
    with upstream(keys=mock_keys(rps=50, burst=5)) as mock:
        kit = _fleet(tmp_path, nats_server.url, mock, [{"id": "k1", "rps": 50, "burst": 5},
                                                       {"id": "k2", "rps": 50, "burst": 5}],
                     max_rate_limited=budget)
        try:
            async with await Client.connect(nats_server.url) as client, Tracker(nats_server.url) as tracker:
                await wait_workers(client, {"w1"})
                # (1) every key answers 429 until the job has seen more 429s than max_attempts (2)
                mock.configure(keys_status={"k1": 429, "k2": 429})
                patient = await client.submit(chat(0, id="patient"), "normal", batch="waits")
                deadline = time.monotonic() + 30
                while sum(k["rate_limited"] for k in mock.stats()["keys"].values()) < 3:
                    assert time.monotonic() < deadline, "the job was not tried three times"
                    await asyncio.sleep(0.05)
                mock.configure(keys_status={"k1": None, "k2": None})
                await tracker.wait_stored("waits", [patient], timeout=30)
                patient_calls = [row for row in mock.log(1000) if row["path"].startswith("/v1/")]
                mock.reset()
                # (2) this job is answered 429 with Retry-After: 0 every time
                hammer = await client.submit(chat(1, id="hammer", mock={"status": 429, "retry_after": 0}), "normal",
                                             batch="waits")
                await tracker.wait_stored("waits", [hammer], timeout=60)
                results = await tracker.results([patient, hammer], "waits")
                await tracker.letters_of([hammer])  # written after the Result is stored: waited for
                letters = [x for x in await tracker.dead_letters("normal") if x.get("job_id") == "hammer"]
                hammer_calls = [row for row in mock.log(1000) if row["path"].startswith("/v1/")]
        finally:
            kit.stop()
    times = [row["t"] for row in hammer_calls]
    figure("429 budget and Retry-After: 0", patient_429s=sum(1 for r in patient_calls if r["status"] == 429),
           hammer_calls=len(times), hammer_span_s=max(times) - min(times) if times else None,
           most_calls_in_0_5_s=_most_calls_within(times, 0.5))
    p = results[patient]
    assert p.status == "succeeded" and p.attempts == 1, p
    assert sum(1 for r in patient_calls if r["status"] == 429) >= 3 > p.attempts

    h = results[hammer]
    assert h.status == "failed" and h.error.code == "rate_limited", h
    assert h.attempts == 1, "429s used up attempts"
    assert len(times) == budget and all(row["status"] == 429 for row in hammer_calls)
    assert _most_calls_within(times, 0.5) <= 2, f"a burst: {sorted(round(t - min(times), 3) for t in times)}"
    assert max(times) - min(times) >= 3.0, "consecutive 429s did not back off exponentially"
    assert len(letters) == 1 and letters[0]["reason"]["code"] == "rate_limited"


async def test_the_429_count_survives_a_leader_failover(tmp_path, nats_server):
    """The leader is stopped after the job's third 429; its successor reads the count from
    JetStream and ends the job after exactly max_rate_limited 429s, not later, not sooner."""
    budget = 6
    with upstream(keys=mock_keys(rps=50, burst=5)) as mock:
        kit = FleetKit(tmp_path, nats_server.url, mock.url,
                       keys=[{"id": "k1", "rps": 50, "burst": 5}, {"id": "k2", "rps": 50, "burst": 5}],
                       overrides={"tiers": {"normal": {"max_attempts": 2, "max_rate_limited": budget}},
                                  "dispatcher": {"cooldown_max_s": 2.0}})
        first = kit.dispatcher("d1")
        kit.worker("w1")
        try:
            async with await Client.connect(nats_server.url) as client, Tracker(nats_server.url) as tracker:
                await wait_workers(client, {"w1"})
                kit.dispatcher("d2")
                hammer = await client.submit(chat(1, id="hammer", mock={"status": 429, "retry_after": 0}), "normal",
                                             batch="failover")
                deadline = time.monotonic() + 30
                while sum(k["rate_limited"] for k in mock.stats()["keys"].values()) < 3:
                    assert time.monotonic() < deadline, "the job was not tried three times"
                    await asyncio.sleep(0.05)
                first.terminate()  # the standby takes over
                await tracker.wait_stored("failover", [hammer], timeout=60)
                result = (await tracker.results([hammer], "failover"))[hammer]
                leader = (await client.status())["leader"]
        finally:
            kit.stop()
        rows = [row for row in mock.log(1000) if row["path"].startswith("/v1/")]
    figure("429 count across a failover", calls=len(rows), leader_after=leader, status=result.status,
           code=result.error.code if result.error else None, attempts=result.attempts)
    assert leader == "d2"
    assert result.status == "failed" and result.error.code == "rate_limited" and result.attempts == 1, result
    assert len(rows) == budget and all(row["status"] == 429 for row in rows)


async def test_each_cooldown_ends_with_one_call_not_the_refilled_burst(tmp_path, nats_server):
    """A provider refuses the key for a few seconds (429, Retry-After: 1) while jobs wait. At the
    end of each cooldown one call tests the key; the next would follow at the key's lowered rate,
    and the first one's 429 comes back before it. Before, the bucket refilled during the
    cooldown and its burst went out within a millisecond, every call of it refused again."""
    n = 20
    with upstream(keys=mock_keys(rps=1000, burst=200, ids=("k1",))) as mock:
        kit = FleetKit(tmp_path, nats_server.url, mock.url, keys=[{"id": "k1", "rps": 20, "burst": 10}],
                       overrides={"tiers": {"normal": {"max_attempts": 2, "max_rate_limited": 100}},
                                  "dispatcher": {"cooldown_max_s": 1.0}})
        kit.dispatcher("d1")
        kit.worker("w1")
        try:
            async with await Client.connect(nats_server.url) as client, Tracker(nats_server.url) as tracker:
                await wait_workers(client, {"w1"})
                mock.configure(keys_status={"k1": 429})
                ids = await client.submit_many([chat(i) for i in range(n)], "normal", batch="ends")
                await asyncio.sleep(4.5)  # several cooldowns of 1 s
                mock.configure(keys_status={"k1": None})
                counts = await tracker.wait_stored("ends", ids, timeout=60)
                results = await tracker.results(ids, "ends")
                rows = [row for row in mock.log(10_000) if row["path"].startswith("/v1/")]
        finally:
            kit.stop()
    assert_exactly_once(counts, ids)
    assert all(r.status == "succeeded" for r in results.values())
    refused = sorted(row["t"] for row in rows if row["status"] == 429)
    after_first = [t for t in refused if t > refused[0] + 0.5]  # past the first burst and its cooldown
    figure("calls at each cooldown's end", refused=len(refused), after_the_first_cooldown=len(after_first),
           most_within_50_ms=_most_calls_within(after_first, 0.05))
    assert len(after_first) >= 3, refused  # several cooldowns ended while the provider still refused
    assert _most_calls_within(after_first, 0.05) == 1, [round(t - refused[0], 3) for t in refused]
