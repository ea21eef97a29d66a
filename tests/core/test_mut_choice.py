"""The Reject messages of jobs that can never run (dispatcher/core/choice.py), word for word:
they are what a producer reads in the failed Result, so each names the tier, the pools, every
key with why it is out (and when its next probe is), and what to change. Plus the cost
boundary: a job costing exactly the largest usable capacity runs."""

from __future__ import annotations

from core_helpers import job, key, make, pool

from ratefleet.dispatcher.core import Dispatch, Outcome, ProbePolicy, Reject

PROBE = ProbePolicy(base_s=60.0, max_s=3600.0)
INVALID_KEY = Outcome("key_error", 401, code="invalid_api_key")
t0 = 0.0


def reject(s, now: float = t0, code: str = "no_key_available") -> str:
    decision = s.next(now)
    assert isinstance(decision, Reject) and decision.code == code, decision
    return decision.message


def test_every_key_out_lists_each_key_with_its_reason_and_next_probe():
    s = make(pool("p", key("k1"), key("k2")), pool("q", key("k3", pool="q")), probe=PROBE)
    s.disable_key("k1", "leaked", t0)
    s.complete_unknown("k2", INVALID_KEY, t0)  # provider-disabled: probe in 60 s
    s.set_secret_missing({"k2": "LOCAL_KEY_2 not set", "k3": "file /run/k3 empty"})
    s.add(job(), t0)
    assert reject(s, 10.5) == (
        "every key of pool(s) p, q (upstream 'u') used by tier 'normal' is disabled or has no secret on "
        "any worker (k1: leaked; k2: invalid_api_key (HTTP 401); next probe in 49.5 s; k3: no worker has "
        "its secret (file /run/k3 empty)); enable an operator-disabled key (`ratefleet keys enable KEY`), "
        "set the secrets on the workers, replace the keys, or add a pool with working keys to "
        "tiers.normal.pools")


def test_a_job_costing_more_than_every_usable_key_says_the_largest():
    s = make(pool("p", key("k1", cost_per_minute=90.0), key("k2", cost_per_minute=120.5)))
    s.add(job(cost=130.25), t0)
    assert reject(s, code="request_too_large") == (  # the job's own fault: `dlq replay --given-up` leaves it
        "job cost 130.25 exceeds the cost capacity (cost_per_minute) of every usable key of pool(s) p "
        "for tier 'normal' (largest: 120.5); split the job or raise cost_per_minute")
    s.add(job(cost=120.5), t0)
    assert isinstance(s.next(t0), Dispatch)


def test_the_largest_cost_counts_usable_keys_only():
    s = make(pool("p", key("k1", cost_per_minute=90.0), key("k2", cost_per_minute=120.5)))
    s.disable_key("k2", "leaked", t0)
    s.add(job(cost=100.0), t0)
    assert "(largest: 90)" in reject(s)


def test_no_pool_for_the_jobs_upstream_names_the_tiers_pools():
    s = make(pool("p", key("k1")), pool("q", key("k2", pool="q")))
    s.add(job(upstream="v"), t0)
    assert reject(s) == ("tier 'normal' has no pool for upstream 'v' (its pools: p, q); "
                         "add a pool of upstream 'v' to tiers.normal.pools")
    s = make(pool("p", key("k1")), chains={"normal": ()})
    s.add(job(), t0)
    assert reject(s) == ("tier 'normal' has no pool for upstream 'u' (its pools: none); "
                         "add a pool of upstream 'u' to tiers.normal.pools")
