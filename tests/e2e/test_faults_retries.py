"""Upstream failures: retryable 5xx until max_attempts (then `failed`, a dead letter, and a
replay once the upstream is healthy), a non-retryable 400 at once, a key stuck on 429 while
the other key serves, and random failures that still end in exactly one result per job."""

from __future__ import annotations

import json

import pytest
from faultkit import (
    Tracker,
    assert_exactly_once,
    assert_only_host,
    calls,
    chat,
    cli,
    fast_keys,
    figure,
    until,
    upstream,
    wait_workers,
)
from fleetkit import FleetKit

from ratefleet import Client

pytestmark = [pytest.mark.timeout(60), pytest.mark.anyio]


def _fleet(tmp_path, nats_url, mock, **overrides) -> FleetKit:
    kit = FleetKit(tmp_path, nats_url, mock.url, keys=fast_keys(), overrides=overrides)
    kit.dispatcher("d1")
    kit.worker("w1")
    kit.worker("w2")
    return kit


async def test_5xx_exhausts_attempts_400_fails_at_once_dead_letter_replays(tmp_path, nats_server):
    with upstream() as mock:
        # breaker_fail_max raised so the forced 5xx do not open a key's breaker for 30 s here
        kit = _fleet(tmp_path, nats_server.url, mock, dispatcher={"breaker_fail_max": 20})
        try:
            async with await Client.connect(nats_server.url) as client, Tracker(nats_server.url) as tracker:
                await wait_workers(client, {"w1", "w2"})
                good = [chat(i) for i in range(20)]
                ids = [await client.submit(chat(0, mock={"status": 503}, id="r503", max_attempts=3), "normal",
                                           batch="retry"),
                       await client.submit(chat(0, mock={"status": 400}, id="r400"), "normal", batch="retry"),
                       *await client.submit_many(good, "normal", batch="retry")]
                counts = await tracker.wait_stored("retry", ids, timeout=30)
                assert_exactly_once(counts, ids)
                results = await tracker.results(ids, "retry")

                r503 = results["r503"]
                assert r503.status == "failed" and r503.error.code == "attempts_exhausted", r503
                assert r503.attempts == 3
                assert r503.response is not None and r503.response.status == 503
                assert r503.response.json_body["error"]["message"]
                assert calls(mock, status=503) == 3, "the 503 job was not called exactly max_attempts times"

                r400 = results["r400"]
                assert r400.status == "failed" and r400.error.code == "upstream_error", r400
                assert r400.attempts == 1 and r400.response.status == 400
                assert calls(mock, status=400) == 1, "a 400 must not be retried"

                assert all(results[i].status == "succeeded" for i in ids[2:])

                await tracker.letters_of(["r503"])  # written after the Result
                letters = [x for x in await tracker.dead_letters("normal") if x.get("job_id") == "r503"]
                assert len(letters) == 1, letters
                letter = letters[0]
                assert letter["_subject"] == "ratefleet.dead.normal"
                assert letter["reason"]["code"] == "attempts_exhausted" and letter["attempts"] == 3
                assert letter["job"]["request"]["path"] == "/v1/chat/completions"
                assert (letter.get("last_error") or {}).get("status") == 503
                figure("retries", r503_attempts=r503.attempts, calls_503=calls(mock, status=503),
                       r400_attempts=r400.attempts, calls_400=calls(mock, status=400), dead_letters=len(letters))

                # a job that failed while the upstream was down is replayed once it is back
                mock.configure(fail_rate=1.0, fail_status=502)
                await client.submit(chat(7, id="heal-1", max_attempts=2), "normal", batch="heal")
                await tracker.wait_stored("heal", ["heal-1"], timeout=20)
                failed = await tracker.result("heal-1", "heal")
                assert failed.status == "failed" and failed.error.code == "attempts_exhausted" and failed.attempts == 2
                await until(lambda: _has_letter(tracker, "heal-1"), 10, 0.2, "dead letter of heal-1")
                mock.configure(fail_rate=0.0)

                listed = cli("dlq", "list", "--json", "--nats", nats_server.url)
                assert listed.returncode == 0, listed.stderr
                rows = [json.loads(line) for line in listed.stdout.splitlines() if line.strip()]
                assert {"r503", "heal-1"} <= {r["job_id"] for r in rows}
                replay = cli("dlq", "replay", "--id", "heal-1", "--nats", nats_server.url)
                assert replay.returncode == 0, replay.stderr
                assert "replayed 1" in replay.stdout, replay.stdout

                replayed = await until(lambda: _replay_result(tracker, "heal", "heal-1"), 20, 0.2, "replayed result")
                assert replayed.status == "succeeded" and replayed.job_id != "heal-1"
                assert replayed.metadata.get("replay_of") == "heal-1"
                # the original keeps its one result; the letter is gone (replay purges by default)
                assert (await tracker.result("heal-1", "heal")).status == "failed"
                assert not await _has_letter(tracker, "heal-1")
                assert await _has_letter(tracker, "r503")
                stored = await tracker.stored("heal")
                assert sorted(stored.values()) == [1, 1] and len(stored) == 2
                figure("dlq replay", replayed_as=replayed.job_id, status=replayed.status)
                assert_only_host(mock)
        finally:
            kit.stop()


async def _has_letter(tracker: Tracker, job_id: str) -> bool:
    return any(x.get("job_id") == job_id for x in await tracker.dead_letters())


async def _replay_result(tracker: Tracker, batch: str, original: str):
    counts = await tracker.stored(batch)
    for job_id in counts:
        if job_id != original and job_id.startswith(original):
            return await tracker.result(job_id, batch)
    return None


async def test_key_answering_429_jobs_succeed_on_the_other_key(tmp_path, nats_server):
    n = 40
    with upstream() as mock:
        mock.configure(keys_status={"k1": 429})
        kit = _fleet(tmp_path, nats_server.url, mock)
        try:
            async with await Client.connect(nats_server.url) as client, Tracker(nats_server.url) as tracker:
                await wait_workers(client, {"w1", "w2"})
                ids = await client.submit_many([chat(i) for i in range(n)], "normal", batch="k429")
                counts = await tracker.wait_stored("k429", ids, timeout=30)
                assert_exactly_once(counts, ids)
                results = await tracker.results(ids, "k429")
                status = await client.status()
                stats = mock.stats()["keys"]
                figure("429 key", jobs=n, k1_calls=stats["k1"]["calls"], k1_429=stats["k1"]["rate_limited"],
                       k2_ok=stats["k2"]["ok"], retried=sum(1 for r in results.values() if r.attempts > 1),
                       max_attempts=max(r.attempts for r in results.values()),
                       k1_status={k: status["keys"]["k1"].get(k) for k in ("rate_limited", "cooldown_s", "breaker")})
                assert all(r.status == "succeeded" and r.key_id == "k2" for r in results.values()), \
                    sorted({(r.status, r.key_id) for r in results.values()})
                assert stats["k1"]["calls"] >= 1, "k1 was never tried: the test did not exercise a 429"
                assert stats["k1"]["ok"] == 0 and stats["k2"]["ok"] == n
                assert stats["k2"]["rate_limited"] == 0
                assert_only_host(mock)
        finally:
            kit.stop()


async def test_random_upstream_failures_every_job_finishes_once(tmp_path, nats_server):
    n = 80
    with upstream(fail_rate=0.3, fail_status=500, seed=7) as mock:
        kit = _fleet(tmp_path, nats_server.url, mock, dispatcher={"breaker_reset_s": 1.0})
        try:
            async with await Client.connect(nats_server.url) as client, Tracker(nats_server.url) as tracker:
                await wait_workers(client, {"w1", "w2"})
                ids = await client.submit_many([chat(i, max_attempts=10) for i in range(n)], "normal", batch="flaky")
                counts = await tracker.wait_stored("flaky", ids, timeout=40)
                assert_exactly_once(counts, ids)
                results = await tracker.results(ids, "flaky")
                total_calls = sum(k["calls"] for k in mock.stats()["keys"].values())
                figure("random 5xx", jobs=n, fail_rate=0.3, upstream_calls=total_calls,
                       failures=calls(mock, status=500), attempts_sum=sum(r.attempts for r in results.values()),
                       max_attempts=max(r.attempts for r in results.values()),
                       result_publishes=sum(tracker.publishes[i] for i in ids))
                assert all(r.status == "succeeded" for r in results.values()), \
                    sorted({(r.status, r.attempts) for r in results.values()})
                assert calls(mock, status=200) == n, "a job succeeded upstream more than once"
                # every call is one delivery of its job: attempts add up to the calls made
                assert sum(r.attempts for r in results.values()) == total_calls
                assert_only_host(mock)
        finally:
            kit.stop()
