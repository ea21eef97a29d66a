"""Adaptive key rates, 429 backoff with Retry-After as a floor, rate changes of a token
bucket, and the rate-limit header families: tables over named instants and properties."""

from __future__ import annotations

import math

import pytest
from core_helpers import dispatch, job, key, make, pool
from hypothesis import given, settings
from hypothesis import strategies as st

from ratefleet.dispatcher.core import CooldownPolicy, Outcome, RateLimitInfo, TokenBucket, WaitUntil, parse_ratelimit
from ratefleet.dispatcher.core.adaptive import AdaptiveRate, AdaptPolicy, header_rate

t0, t1, t2, t3, t4, t5, t6, t7, t8, t9 = 0.0, 0.5, 1.0, 2.0, 3.0, 5.0, 10.0, 20.0, 30.0, 100.0
OK = Outcome("ok", 200)
POLICY = AdaptPolicy(decrease=0.5, target_fraction=0.9, recover_s=5.0, probe_per_s=0.02, floor_fraction=0.01)


def throttled(retry_after_s=None, ratelimit=None):
    return Outcome("rate_limited", 429, retry_after_s=retry_after_s, ratelimit=ratelimit)


# -- AdaptiveRate ------------------------------------------------------------------------


def test_drop_below_what_was_sent_then_linear_return_then_slow_probe():
    r = AdaptiveRate(20.0, POLICY, t0)
    r.on_throttle(t0, sent_rate=4.0)  # configured 20, but 4/s were sent when the 429 came
    assert (r.rate, r.target) == (2.0, 3.6)
    r.on_success(t2)  # 1 s of 5 s of return: 1/5 of the way from 2.0 to 3.6
    assert r.rate == pytest.approx(2.32)
    for at in (t3, t4, t5):
        r.on_success(at)
    assert r.rate == pytest.approx(3.6)  # the target, reached after recover_s
    r.on_success(t5 + 1.0)  # above it: +2 % of the target per second
    assert r.rate == pytest.approx(3.6 * 1.02)


def test_rate_stays_between_floor_and_configured():
    r = AdaptiveRate(10.0, POLICY, t0)
    for i in range(50):
        r.on_throttle(i * 0.1, sent_rate=None)
    assert r.rate == pytest.approx(0.1)  # floor_fraction 1 % of 10
    for i in range(1, 10000):
        r.on_success(i * 1.0)
    assert r.rate == 10.0


def test_idle_time_does_not_count_as_climbing():
    r = AdaptiveRate(20.0, POLICY, t0)
    r.on_throttle(t0, sent_rate=4.0)
    r.on_success(t9)  # 100 s idle, then one success: at most 2 s of climb
    assert r.rate == pytest.approx(2.0 + 1.6 * 2 / 5)


def test_header_hint_caps_rate_and_target():
    r = AdaptiveRate(20.0, POLICY, t0)
    r.on_hint(t0, 2.0)
    assert (r.rate, r.target) == (2.0, 2.0)
    r.on_hint(t1, 50.0)  # a hint above the rate does not raise it
    assert r.rate == 2.0
    r.on_hint(t1, None)
    assert r.rate == 2.0


def test_disabled_policy_keeps_the_configured_rate():
    r = AdaptiveRate(20.0, AdaptPolicy(enabled=False), t0)
    r.on_throttle(t0, 1.0)
    r.on_hint(t0, 1.0)
    assert r.rate == 20.0


@pytest.mark.parametrize(
    "limit, remaining, reset, expected",
    [
        (2, 0, 1.0, 2.0),  # token bucket at 2/s, empty: full again in 1 s
        (2, 1, 0.5, 2.0),
        (60, 59, 59.0, 59 / 59),  # fixed window of 60/min just opened: remaining/reset
        (60, 0, 30.0, 2.0),
        (10, 10, 0.0, None),  # full: nothing to learn
        (None, 1, 1.0, None),
        (5, 1, None, None),
    ],
)
def test_header_rate(limit, remaining, reset, expected):
    assert header_rate(limit, remaining, reset) == expected


# -- KeyState / Scheduler: backoff and rates -----------------------------------------------


@pytest.mark.parametrize(
    "retry_after, expected",
    [
        (None, (1.0, 2.0, 4.0, 8.0, 8.0)),
        (0.0, (1.0, 2.0, 4.0, 8.0, 8.0)),  # Retry-After: 0 cannot shortcut the backoff
        (3.0, (3.0, 3.0, 4.0, 8.0, 8.0)),  # a floor under it
        (20.0, (20.0, 20.0, 20.0, 20.0, 20.0)),  # honoured even above max_s
    ],
)
def test_consecutive_429s_back_off_exponentially_with_retry_after_as_floor(retry_after, expected):
    s = make(pool("p", key("k1", rps=1000, burst=10)), cooldown=CooldownPolicy(base_s=1.0, max_s=8.0))
    for _ in range(10):
        s.add(job(), t0)
    now = t0
    for wait in expected:
        d = dispatch(s, now)
        s.complete(d.reservation, throttled(retry_after), now + 0.01)
        decision = s.next(now + 0.01)
        assert decision == WaitUntil(pytest.approx(now + 0.01 + wait))
        now = decision.at


def test_429s_of_calls_sent_before_the_first_one_came_back_are_one_event():
    s = make(pool("p", key("k1", rps=20, burst=5)), cooldown=CooldownPolicy(base_s=1.0, max_s=60.0))
    for _ in range(10):
        s.add(job(), t0)
    burst = [dispatch(s, t0) for _ in range(5)]
    for d in burst[2:]:  # three calls of one burst refused
        s.complete(d.reservation, throttled(0.0), t1)
    view = s.snapshot(t1)["keys"]["k1"]
    assert view["cooldown_s"] == 1.0  # one backoff step, not 1 + 2 + 4
    assert view["effective_rps"] == pytest.approx(0.5 * 5 / 2)  # one halving of 5 calls in 2 s
    assert view["rate_limited"] == 3


def test_an_ok_sent_before_the_429_does_not_reset_the_backoff():
    s = make(pool("p", key("k1", rps=20, burst=5)), cooldown=CooldownPolicy(base_s=1.0, max_s=60.0))
    for _ in range(10):
        s.add(job(), t0)
    early, late = dispatch(s, t0), dispatch(s, t0)
    s.complete(late.reservation, throttled(), t1)
    s.complete(early.reservation, OK, t1)  # was on the wire before the 429: no evidence of recovery
    d = dispatch(s, t1 + 1.0)
    s.complete(d.reservation, throttled(), t1 + 1.0)
    assert s.snapshot(t1 + 1.0)["keys"]["k1"]["cooldown_s"] == 2.0


def test_headers_on_successes_set_rate_and_burst():
    s = make(pool("p", key("k1", rps=20, burst=5)))
    for _ in range(10):
        s.add(job(), t0)
    d = dispatch(s, t0)
    info = RateLimitInfo(limit_requests=2, remaining_requests=1, reset_requests_s=0.5)
    s.complete(d.reservation, Outcome("ok", 200, ratelimit=info), t0)
    view = s.snapshot(t0)["keys"]["k1"]
    assert view["rps"] == 20 and view["effective_rps"] == 2.0 and view["burst"] == 1.0
    assert view["tokens"] == 1.0
    dispatch(s, t0)
    assert s.next(t0) == WaitUntil(t1)  # one token every 0.5 s from now on


def test_tokens_headers_adapt_the_cost_bucket():
    s = make(pool("p", key("k1", rps=100, burst=10, cost_per_minute=6000)))  # 100 units/s configured
    s.add(job(cost=10), t0)
    d = dispatch(s, t0)
    info = RateLimitInfo(limit_tokens=600, remaining_tokens=0, reset_tokens_s=60.0)  # 10 units/s really
    s.complete(d.reservation, Outcome("ok", 200, ratelimit=info), t0)
    view = s.snapshot(t0)["keys"]["k1"]
    assert view["effective_cost_per_minute"] == 600.0 and view["effective_rps"] == 100


def test_successes_lift_the_rate_back_toward_configured():
    s = make(pool("p", key("k1", rps=10, burst=1)))
    s.add(job(), t0)
    s.complete(dispatch(s, t0).reservation, throttled(), t0)
    low = s.snapshot(t0)["keys"]["k1"]["effective_rps"]
    now = t0 + 1.0
    for _ in range(1000):
        s.add(job(), now)
        decision = s.next(now)
        if isinstance(decision, WaitUntil):
            now = max(now, decision.at)
            decision = dispatch(s, now)
        s.complete(decision.reservation, OK, now)
    assert low == 5.0  # one call in the window is no rate: halved from the effective 10
    assert s.snapshot(now)["keys"]["k1"]["effective_rps"] == 10.0


# -- TokenBucket.set_rate ------------------------------------------------------------------


def test_set_rate_keeps_accrued_tokens_and_applies_from_now():
    b = TokenBucket(rate=1.0, capacity=10.0, tokens=0.0, now=t0)
    b.set_rate(t3, 4.0)  # 2 tokens accrued at 1/s
    assert b.advance(t3) == 2.0
    assert b.advance(t4) == 6.0  # then 4/s
    b.set_rate(t4, 0.5, capacity=3.0)  # a smaller capacity cuts the level
    assert b.advance(t4) == 3.0 and b.advance(t9) == 3.0


def test_refund_after_a_capacity_change_gives_back_only_what_was_never_clamped():
    b = TokenBucket(rate=1.0, capacity=5.0, tokens=5.0, now=t0)
    mark = b.take(t0, 3.0)  # 2 left
    b.set_rate(t0, 1.0, capacity=2.0)  # now full: nothing could be given back
    assert b.refund(t0, 3.0, mark) == 0.0
    b2 = TokenBucket(rate=1.0, capacity=5.0, tokens=5.0, now=t0)
    mark = b2.take(t0, 3.0)
    b2.set_rate(t0, 1.0, capacity=8.0)  # headroom only grew: all 3 come back
    assert b2.refund(t0, 3.0, mark) == 3.0


# -- properties ----------------------------------------------------------------------------

events = st.lists(
    st.tuples(
        st.floats(0, 3),  # time step
        st.sampled_from(["ok", "ok", "ok", "429", "hint", "send"]),
        st.floats(0.01, 100),  # sent rate or hinted rate
    ),
    max_size=80,
)


@settings(max_examples=300, deadline=None)
@given(st.floats(0.1, 1000), events)
def test_effective_rate_stays_within_floor_and_configured(configured, script):
    r = AdaptiveRate(configured, POLICY, t0)
    now = t0
    for step, what, value in script:
        now += step
        if what == "ok":
            r.on_success(now)
        elif what == "429":
            r.on_throttle(now, value)
        elif what == "hint":
            r.on_hint(now, value)
        assert r.floor - 1e-9 <= r.rate <= configured + 1e-9
        assert r.floor - 1e-9 <= r.target <= configured + 1e-9


@settings(max_examples=200, deadline=None)
@given(st.floats(0.5, 50), st.floats(1, 20), st.lists(st.tuples(st.floats(0, 2), st.floats(0.01, 100),
                                                                  st.floats(1, 30), st.booleans()), max_size=40))
def test_rate_changes_never_grant_more_than_the_configured_bucket(rate, capacity, changes):
    """Rates and capacities only ever at or below the configured ones: over any run, the
    tokens taken are at most capacity + configured rate x elapsed time."""
    b = TokenBucket(rate, capacity, capacity, t0)
    now, taken = t0, 0.0
    for step, new_rate, new_capacity, take in changes:
        now += step
        b.set_rate(now, min(rate, new_rate), min(capacity, new_capacity))
        if take and b.ready_at(now, 1.0) <= now:
            b.take(now, 1.0)
            taken += 1.0
        assert taken <= capacity + rate * (now - t0) + 1e-6


@settings(max_examples=100, deadline=None)
@given(st.lists(st.tuples(st.floats(0.01, 1.0), st.sampled_from(["ok", "429", "hint"]), st.floats(0.1, 50)),
                max_size=60))
def test_scheduler_never_dispatches_a_key_above_its_configured_limits(script):
    s = make(pool("p", key("k1", rps=5, burst=3)))
    now, sent = t0, []
    for _ in range(len(script) + 1):
        s.add(job(), t0)
    for step, what, value in script:
        now += step
        decision = s.next(now)
        if not isinstance(decision, WaitUntil) and hasattr(decision, "reservation"):
            sent.append(now)
            info = RateLimitInfo(limit_requests=value, remaining_requests=0, reset_requests_s=1.0)
            outcome = {"ok": OK, "429": throttled(0.0), "hint": Outcome("ok", 200, ratelimit=info)}[what]
            s.complete(decision.reservation, outcome, now)
        effective = s.snapshot(now)["keys"]["k1"]["effective_rps"]
        assert 0.05 - 1e-9 <= effective <= 5.0
    for i, start in enumerate(sent):  # any window: at most burst + rps x its length
        in_window = [at for at in sent[i:] if at - start <= 2.0]
        assert len(in_window) <= 3 + 5 * 2.0 + 1e-9


# -- header families ---------------------------------------------------------------------------

NOW_EPOCH = 1_700_000_000.0


@pytest.mark.parametrize(
    "headers, expected",
    [
        ({"x-ratelimit-limit-requests": "5000", "x-ratelimit-remaining-requests": "4999",
          "x-ratelimit-reset-requests": "12ms", "x-ratelimit-limit-tokens": "160000",
          "x-ratelimit-remaining-tokens": "150000", "x-ratelimit-reset-tokens": "6m0s"},
         RateLimitInfo(limit_requests=5000, remaining_requests=4999, reset_requests_s=0.012,
                       limit_tokens=160000, remaining_tokens=150000, reset_tokens_s=360.0)),
        ({"anthropic-ratelimit-requests-limit": "50", "anthropic-ratelimit-requests-remaining": "0",
          "anthropic-ratelimit-requests-reset": "2023-11-14T22:13:50Z",
          "anthropic-ratelimit-tokens-limit": "40000", "anthropic-ratelimit-tokens-remaining": "39000",
          "anthropic-ratelimit-tokens-reset": "2023-11-14T22:13:21+00:00"},
         RateLimitInfo(limit_requests=50, remaining_requests=0, reset_requests_s=30.0,
                       limit_tokens=40000, remaining_tokens=39000, reset_tokens_s=1.0)),
        ({"X-RateLimit-Limit": "60", "X-RateLimit-Remaining": "12", "X-RateLimit-Reset": "1700000042"},
         RateLimitInfo(limit_requests=60, remaining_requests=12, reset_requests_s=42.0)),
        ({"x-ratelimit-limit": "10", "x-ratelimit-remaining": "3", "x-ratelimit-reset": "7"},
         RateLimitInfo(limit_requests=10, remaining_requests=3, reset_requests_s=7.0)),
        ({"RateLimit-Limit": "100, 100;w=60", "RateLimit-Remaining": "40", "RateLimit-Reset": "25"},
         RateLimitInfo(limit_requests=100, remaining_requests=40, reset_requests_s=25.0)),
        ({"RateLimit": '"default";r=50;t=30', "RateLimit-Policy": '"default";q=100;w=60'},
         RateLimitInfo(limit_requests=100, remaining_requests=50, reset_requests_s=30.0)),
        ({"RateLimit": "limit=100, remaining=50, reset=5"},
         RateLimitInfo(limit_requests=100, remaining_requests=50, reset_requests_s=5.0)),
        ({"x-ratelimit-reset": "2023-11-14 not a time"}, None),
        ({"content-type": "application/json"}, None),
    ],
)
def test_ratelimit_header_families(headers, expected):
    assert parse_ratelimit(headers, NOW_EPOCH) == expected


def test_absolute_resets_need_the_wall_clock():
    info = parse_ratelimit({"x-ratelimit-limit": "60", "x-ratelimit-reset": "1700000042"})
    assert info == RateLimitInfo(limit_requests=60)
    assert not math.isnan(info.limit_requests)


def test_first_burst_holds_a_key_until_its_first_answer():
    s = make(pool("p", key("k1", rps=20, burst=10)), adapt=AdaptPolicy(first_burst=2))
    for _ in range(20):
        s.add(job(), t0)
    first = [dispatch(s, t0), dispatch(s, t0)]
    assert s.next(t0) == WaitUntil(t0 + 1 / 20)  # the rate is not held back, only the burst
    s.complete(first[0].reservation, OK, t2)  # answered: the configured burst is back (refilling)
    assert s.snapshot(t2)["keys"]["k1"]["burst"] == 10.0
    assert s.snapshot(t2 + 1.0)["keys"]["k1"]["tokens"] == 10.0


def test_a_key_recovering_from_429s_returns_to_what_the_headers_allow():
    r = AdaptiveRate(20.0, POLICY, t0)
    for i in range(8):  # an outage of 429s: down to the floor (0.2)
        r.on_throttle(i * 1.0, sent_rate=0.5)
    assert r.rate == pytest.approx(0.2)
    now = 8.0
    for _ in range(12):  # then 6 s of successes whose headers say about 2/s is allowed
        now += 0.5
        r.on_success(now)
        r.on_hint(now, 2.0)
    assert 0.95 * 2.0 <= r.rate <= 2.0  # back within recover_s, not after a minutes-long probe


# -- a quiet key's lone 429, and the climb back without rate-limit headers ---------------------


def _run_until(s, now, done, stop, *, kind_at=lambda now: "ok", answer_after=0.0):
    """Feed the scheduler one job at a time, answering each call `answer_after` s later
    with `kind_at(sent)`, until `stop(now, calls)`; returns (now, calls, first ok time)."""
    calls, first_ok = 0, None
    while not stop(now, calls):
        s.add(job(), now)
        while True:
            d = s.next(now)
            if isinstance(d, WaitUntil):
                now = d.at
                continue
            kind = kind_at(now)
            outcome = OK if kind == "ok" else throttled()
            s.complete(d.reservation, outcome, now + answer_after)
            if kind == "ok" and first_ok is None:
                first_ok = now
            calls += 1
            break
    return now, calls, first_ok


def test_one_429_on_a_quiet_key_halves_its_rate_instead_of_dropping_to_the_floor():
    """1 call in the last 2 s says nothing about the rate that drew the 429 (0.5/s): the drop
    is decrease x effective, and 3000 jobs at 50/s take about a minute (before: 0.5 req/s
    after the 429, 240 s for the batch)."""
    s = make(pool("p", key("k1", rps=50, burst=10)))
    s.add(job(), t0)
    s.complete(dispatch(s, t0).reservation, throttled(), t0 + 0.1)
    assert s.snapshot(t0 + 0.1)["keys"]["k1"]["effective_rps"] == pytest.approx(25.0)
    start = 2.0
    now, calls, _ = _run_until(s, start, 0, lambda now, calls: calls >= 3000)
    assert s.snapshot(now)["keys"]["k1"]["effective_rps"] == 50.0
    assert now - start <= 3000 / 50 * 1.1  # within 10 % of the configured 60 s


def test_a_busy_key_still_drops_below_the_rate_it_really_sent():
    """With enough calls in the window the estimate is trusted: configured 20, sent 4/s."""
    s = make(pool("p", key("k1", rps=20, burst=1)))
    now = _run_until(s, t0, 0, lambda now, calls: now >= 3.0, kind_at=lambda _: "ok")[0]
    view = s.snapshot(now)["keys"]["k1"]
    assert view["effective_rps"] == 20.0
    base = now + 5.0  # earlier calls out of the window
    for _ in range(8):  # 4/s for 2 s, then a 429
        s.add(job(), base)
    sent = [dispatch(s, base + i * 0.25) for i in range(8)]
    for d in sent[:-1]:
        s.complete(d.reservation, OK, base + 1.8)
    s.complete(sent[-1].reservation, throttled(), base + 1.9)
    assert s.snapshot(base + 1.9)["keys"]["k1"]["effective_rps"] == pytest.approx(0.5 * 8 / 2.0)


def test_after_a_minute_of_429s_without_headers_the_key_is_back_at_its_rate_in_tens_of_seconds():
    """10 req/s configured, a 60 s storm of header-less 429s, then a healthy provider:
    the key climbs from the floor to its configured rate within 40 s of its first success
    (before: 0.82 req/s at t=300 s, 10 only at t=600 s)."""
    s = make(pool("p", key("k1", rps=10, burst=10)), cooldown=CooldownPolicy(base_s=1.0, max_s=60.0))
    storm_end = 60.0
    now, _, _ = _run_until(s, t0, 0, lambda now, calls: now >= storm_end,
                           kind_at=lambda sent: "rate_limited", answer_after=0.2)
    assert s.snapshot(now)["keys"]["k1"]["effective_rps"] <= 0.2  # the storm took it to the floor
    end, _, first_ok = _run_until(s, now, 0, lambda t, calls: s.snapshot(t)["keys"]["k1"]["effective_rps"] >= 10.0
                                  or t > storm_end + 600, answer_after=0.2)
    assert first_ok is not None and end - first_ok <= 40.0


def test_additive_increase_is_a_fraction_of_the_configured_rate_per_second():
    r = AdaptiveRate(100.0, AdaptPolicy(increase_per_s=0.05), t0)
    for i in range(50):
        r.on_throttle(i * 0.1, sent_rate=None)
    assert r.rate == pytest.approx(1.0)  # the floor
    now = 10.0
    while r.rate < 100.0 and now < 100.0:  # calls at the key's own pace
        now += 1.0 / r.rate
        r.on_success(now)
    assert now - 10.0 <= 25.0  # 5 %/s of 100: from the floor in about 20 s


def test_rate_increase_per_s_reaches_the_policy_from_the_config(tmp_path):
    from ratefleet.dispatcher.spec import scheduler_spec
    from ratefleet.schemas import load_config

    path = tmp_path / "ratefleet.toml"
    path.write_text('[upstreams.u]\nbase_url = "http://127.0.0.1:1"\n'
                    '[pools.p]\nkeys = [{ id = "k1", secret = "env:K1", rps = 10 }]\n'
                    '[dispatcher]\nrate_increase_per_s = 0.2\n')
    assert scheduler_spec(load_config(path)).adapt.increase_per_s == 0.2
    assert AdaptPolicy().increase_per_s == 0.05


def test_a_key_whose_last_answer_was_a_429_says_throttled_after_its_cooldown():
    """`throttled` in the snapshot: the last counted answer was a 429. Between two cooldowns
    (Retry-After run out, no call yet) `cooldown_s` is 0 while the key still refuses; a client
    diagnosing a timeout read that as a key ready to take the job."""
    s = make(pool("p", key("k1", rps=20, burst=5)), cooldown=CooldownPolicy(base_s=1.0, max_s=60.0))
    for _ in range(3):
        s.add(job(), t0)
    assert s.snapshot(t0)["keys"]["k1"]["throttled"] is False  # never called
    d = dispatch(s, t0)
    s.complete(d.reservation, throttled(1.0), t1)
    after = s.snapshot(t1 + 5.0)["keys"]["k1"]
    assert after["cooldown_s"] == 0.0 and after["throttled"] is True
    d = dispatch(s, t1 + 5.0)
    s.complete(d.reservation, OK, t1 + 5.1)
    assert s.snapshot(t1 + 5.1)["keys"]["k1"]["throttled"] is False


def test_throttled_ends_with_any_fresh_answer_past_the_limiter_and_after_the_cooldown_cap():
    """Found in review: `throttled` read `throttled_at > ok_at`, so a 429 followed by 400s or
    500s stayed `throttled`, and one 429 an hour ago made an idle key look refusing forever."""
    s = make(pool("p", key("k1", rps=20, burst=5)), cooldown=CooldownPolicy(base_s=1.0, max_s=60.0))
    for _ in range(6):
        s.add(job(), t0)
    d = dispatch(s, t0)
    s.complete(d.reservation, throttled(1.0), t1)
    d = dispatch(s, t1 + 5.0)
    s.complete(d.reservation, Outcome("bad_request", 400), t1 + 5.1)  # got past the provider's limiter
    assert s.snapshot(t1 + 5.1)["keys"]["k1"]["throttled"] is False
    d = dispatch(s, t1 + 6.0)
    s.complete(d.reservation, throttled(1.0), t1 + 6.1)
    assert s.snapshot(t1 + 30.0)["keys"]["k1"]["throttled"] is True
    assert s.snapshot(t1 + 6.1 + 61.0)["keys"]["k1"]["throttled"] is False  # past cooldown max_s: tried again
