"""Cost bucket, 429 cooldowns, ratelimit resync and key disabling, over named instants."""

from __future__ import annotations

import pytest
from core_helpers import dispatch, job, key, make, pool

from ratefleet.dispatcher.core import (
    CooldownPolicy,
    Dispatch,
    Idle,
    Outcome,
    RateLimitInfo,
    Reject,
    WaitUntil,
)

t0, t1, t2, t3, t4, t5, t6, t7, t8, t9 = 0.0, 1.0, 2.0, 3.0, 5.0, 10.0, 20.0, 30.0, 40.0, 100.0
OK = Outcome("ok", 200)


def test_cost_bucket_limits_and_refills():
    s = make(pool("p", key("k1", rps=100, burst=10, cost_per_minute=60)))  # 1 cost unit / s
    for _ in range(3):
        s.add(job(cost=30), t0)
    dispatch(s, t0)
    dispatch(s, t0)
    assert s.next(t0) == WaitUntil(t7)
    assert s.snapshot(t0)["keys"]["k1"]["cost_tokens"] == 0
    dispatch(s, t7)


@pytest.mark.parametrize(
    "actual, wait_s",
    [
        (None, 30.0),  # no report: the estimate stands
        (30.0, 30.0),  # exact estimate
        (10.0, 10.0),  # 20 units given back: 30 needed, 20 there
        (50.0, 50.0),  # 20 units of debt
    ],
)
def test_actual_cost_corrects_the_bucket(actual, wait_s):
    s = make(pool("p", key("k1", rps=100, burst=10, cost_per_minute=60)))  # 1 unit / s
    for _ in range(3):
        s.add(job(cost=30), t0)
    first = dispatch(s, t0)
    dispatch(s, t0)
    s.complete(first.reservation, Outcome("ok", 200, actual_cost=actual), t0)
    assert s.next(t0) == WaitUntil(t0 + wait_s)
    assert isinstance(s.next(t0 + wait_s), Dispatch)


def test_retry_after_cools_the_key_down():
    s = make(pool("p", key("k1")))
    for _ in range(3):
        s.add(job(), t0)
    d = dispatch(s, t0)
    s.complete(d.reservation, Outcome("rate_limited", 429, retry_after_s=4.0), t1)
    assert s.next(t1) == WaitUntil(t4)
    assert s.snapshot(t1)["keys"]["k1"]["cooldown_s"] == 4.0
    assert isinstance(s.next(t4), Dispatch)


def test_exponential_backoff_and_reset_on_ok():
    s = make(pool("p", key("k1", rps=1000, burst=10)), cooldown=CooldownPolicy(base_s=1.0, max_s=8.0))
    for _ in range(10):
        s.add(job(), t0)
    now = t0
    for expected in (1.0, 2.0, 4.0, 8.0, 8.0):  # base * 2**(n-1), capped at max_s
        d = dispatch(s, now)
        s.complete(d.reservation, Outcome("rate_limited", 429), now)
        assert s.next(now) == WaitUntil(now + expected)
        now += expected
    d = dispatch(s, now)
    s.complete(d.reservation, OK, now)
    now += 1.0  # the effective rate fell with the 429s: the bucket needs a moment
    d = dispatch(s, now)
    s.complete(d.reservation, Outcome("rate_limited", 429), now)
    assert s.next(now) == WaitUntil(now + 1.0)  # the streak restarted after ok
    assert s.snapshot(now)["keys"]["k1"]["rate_limited"] == 6


def test_rate_limited_is_not_a_breaker_failure():
    s = make(pool("p", key("k1", rps=1000, burst=10)), fail_max=2)
    for _ in range(5):
        s.add(job(), t0)
    for d in (dispatch(s, t0), dispatch(s, t0), dispatch(s, t0)):
        s.complete(d.reservation, Outcome("rate_limited", 429, retry_after_s=0.0), t0)
    assert s.snapshot(t0)["keys"]["k1"]["breaker"] == "closed"


@pytest.mark.parametrize(
    "info, tokens, wait",
    [
        (RateLimitInfo(remaining_requests=2), 2.0, None),
        (RateLimitInfo(remaining_requests=9), 4.0, None),  # never raises the level
        (RateLimitInfo(remaining_requests=0, reset_requests_s=6.0), 0.0, t0 + 6.0),
        (RateLimitInfo(remaining_tokens=0, reset_tokens_s=3.0), 4.0, t0 + 3.0),
    ],
)
def test_ratelimit_headers_resync(info, tokens, wait):
    s = make(pool("p", key("k1", rps=1, burst=5)))
    for _ in range(3):
        s.add(job(), t0)
    d = dispatch(s, t0)  # 4 left
    s.complete(d.reservation, Outcome("ok", 200, ratelimit=info), t0)
    assert s.snapshot(t0)["keys"]["k1"]["tokens"] == tokens
    if wait is not None:
        assert s.next(t1) == WaitUntil(wait)


def test_ratelimit_remaining_tokens_resyncs_cost_bucket():
    s = make(pool("p", key("k1", rps=100, burst=10, cost_per_minute=600)))
    s.add(job(cost=5), t0)
    d = dispatch(s, t0)
    s.complete(d.reservation, Outcome("ok", 200, ratelimit=RateLimitInfo(remaining_tokens=50)), t0)
    assert s.snapshot(t0)["keys"]["k1"]["cost_tokens"] == 50


@pytest.mark.parametrize("usage, cooldown", [(60.0, 0.0), (None, 60.0)])
def test_a_spent_token_budget_waits_for_the_refill_when_usage_is_reported(usage, cooldown):
    # OpenAI's x-ratelimit-reset-tokens is the time until the budget is full again: 60 s for an
    # emptied 6,000 tokens/min, which refills 100 a second all along. Charged real usage, the key's
    # next 60-token job goes 0.6 s later (before: cooled for the 60 s, idle while its budget came
    # back). Without usage (no usage_path) the bucket holds only the jobs' estimates, which may be
    # low: waiting just for an estimate to refill drew 429s (56 in 300 jobs estimated at 10 tokens
    # that used 50, a simulation), so the provider's reset is waited out.
    s = make(pool("p", key("k1", rps=100, burst=10, cost_per_minute=6000)))
    for _ in range(2):
        s.add(job(cost=60), t0)
    d = dispatch(s, t0)
    spent = RateLimitInfo(limit_tokens=6000, remaining_tokens=0, reset_tokens_s=60.0)
    s.complete(d.reservation, Outcome("ok", 200, ratelimit=spent, actual_cost=usage), t0)
    assert s.snapshot(t0)["keys"]["k1"]["cooldown_s"] == pytest.approx(cooldown)
    if usage is not None:
        assert s.next(t0) == WaitUntil(pytest.approx(t0 + 0.6))
        dispatch(s, t0 + 0.6)


def test_key_error_disables_the_key_until_its_probe():
    # (was: "permanently"; a disabled key now gets a probe job after ProbePolicy.base_s = 60 s)
    s = make(pool("p", key("k1"), key("k2")))
    for _ in range(5):
        s.add(job(), t0)
    d = dispatch(s, t0)
    assert d.key_id == "k1"
    s.complete(d.reservation, Outcome("key_error", 401), t0)
    view = s.snapshot(t0)["keys"]["k1"]
    assert view["disabled"] is True and "401/403" in view["disabled_reason"]
    assert {dispatch(s, t).key_id for t in (t0, t5, t8)} == {"k2"}
    probe = dispatch(s, t9)
    assert probe.key_id == "k1" and probe.reservation.key_probe


def test_all_keys_disabled_rejects_with_advice():
    s = make(pool("p", key("k1")))
    s.add(job(), t0)
    s.add(job(), t0)
    d = dispatch(s, t0)
    s.complete(d.reservation, Outcome("key_error", 403), t0)
    assert s.next(t0) == WaitUntil(60.0)  # provider-disabled: the job waits for the key's probe
    s.disable_key("k1", "revoked", t0)  # an operator's decision is never probed: nothing to wait for
    reject = s.next(t0)
    assert isinstance(reject, Reject) and reject.code == "no_key_available"
    assert "disabled" in reject.message and "replace the keys" in reject.message
    assert "ratefleet keys enable" in reject.message
    assert s.next(t0) == Idle()


def test_complete_unknown_applies_key_signals_only():
    s = make(pool("p", key("k1", concurrency=1)))
    s.complete_unknown("k1", Outcome("rate_limited", 429, retry_after_s=5.0), t0)
    s.complete_unknown("nope", OK, t0)  # unknown keys are ignored
    view = s.snapshot(t0)["keys"]["k1"]
    assert view["cooldown_s"] == 5.0 and view["in_flight"] == 0
    s.add(job(), t0)
    assert s.next(t0) == WaitUntil(t4)
    s.complete_unknown("k1", Outcome("key_error", 401), t0)
    assert s.snapshot(t0)["keys"]["k1"]["disabled"] is True


def test_concurrency_cap_means_idle_not_wait():
    s = make(pool("p", key("k1", concurrency=2)))
    for _ in range(3):
        s.add(job(), t0)
    first = dispatch(s, t0)
    dispatch(s, t0)
    assert s.next(t0) == Idle()
    s.complete(first.reservation, OK, t1)
    assert isinstance(s.next(t1), Dispatch)
