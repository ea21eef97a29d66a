"""One key's state (dispatcher/core/key.py) at exact values: when it is ready (concurrency
cap, cost above the cost capacity, a priority reserve only where the burst can hold it), the
429 backoff (doubling, the cap, Retry-After as a floor, echoes), which 429s are the key's and
which one request's, the rate a key was sent at, what the provider's ratelimit headers change
(the limit hint, cooldowns on an empty bucket, the cost bucket), the burst held to
`first_burst` until the first answer, the actual cost charged back, and the reason a status
view gives for a key taken out. Each decides when and how often a key is called."""

from __future__ import annotations

import math

import pytest

from ratefleet.dispatcher.core import BreakerPolicy, CooldownPolicy, Outcome, RateLimitInfo
from ratefleet.dispatcher.core.adaptive import AdaptPolicy
from ratefleet.dispatcher.core.key import JOB_429_MEMORY, KeyState, key_error_reason
from ratefleet.dispatcher.core.types import KeySpec

OK = Outcome("ok", 200)
THROTTLED = Outcome("rate_limited", 429)
FIXED = AdaptPolicy(enabled=False)


def state(rps: float = 10.0, burst: float = 5.0, *, safety_s: float = 0.0, adapt: AdaptPolicy = FIXED,
          cooldown: CooldownPolicy = CooldownPolicy(1.0, 60.0), conservative: bool = False, now: float = 0.0,
          **kw) -> KeyState:
    spec = KeySpec(id="k1", pool="p", upstream="u", rps=rps, burst=burst, **kw)
    return KeyState(spec, safety_s=safety_s, breaker=BreakerPolicy(), cooldown=cooldown, now=now,
                    conservative=conservative, adapt=adapt)


def throttle(k: KeyState, now: float, **kw) -> None:
    k.observe(Outcome("rate_limited", 429, **kw), now)


# -- why a key was taken out -------------------------------------------------------------------

@pytest.mark.parametrize("outcome, reason", [
    (Outcome("key_error", 429, code="insufficient_quota"), "insufficient_quota (HTTP 429)"),
    (Outcome("key_error", None, code="invalid_api_key"), "invalid_api_key (no status)"),
    (Outcome("key_error", 402, code="credits"), "credits (HTTP 402)"),
    (Outcome("key_error", 402), "payment_required (HTTP 402)"),
    (Outcome("key_error", 401), "401/403: upstream answered 401"),
    (Outcome("key_error", 403, code=""), "401/403: upstream answered 403"),
])
def test_the_reason_a_key_was_taken_out(outcome, reason):
    assert key_error_reason(outcome) == reason
    k = state()
    assert k.observe(outcome, 1.0) is True
    assert k.disabled_reason == reason and k.ready_at(1.0, 1.0) == 1.0 + 60.0  # its probe


# -- the 429 backoff ---------------------------------------------------------------------------

def test_backoff_doubles_from_base_up_to_max():
    k = state(cooldown=CooldownPolicy(0.5, 3.0))
    waits = []
    for n in range(5):
        now = 10.0 * n
        throttle(k, now)
        waits.append(k.cooldown_until - now)
    assert waits == [0.5, 1.0, 2.0, 3.0, 3.0]


def test_a_long_streak_stays_at_max_without_overflow():
    k = state(cooldown=CooldownPolicy(1.0, 60.0))
    k.streak_429 = 5000  # 2**4999 would overflow a float
    throttle(k, 0.0)
    assert k.cooldown_until == 60.0


@pytest.mark.parametrize("retry_after, wait", [(None, 1.0), (0.0, 1.0), (0.5, 1.0), (7.0, 7.0)])
def test_retry_after_is_a_floor_under_the_backoff(retry_after, wait):
    k = state(cooldown=CooldownPolicy(1.0, 60.0))
    throttle(k, 2.0, retry_after_s=retry_after)
    assert k.cooldown_until == 2.0 + wait and k.ready_at(2.0, 1.0) == 2.0 + wait


def test_an_echo_honours_its_retry_after_but_neither_lengthens_nor_shortens_the_cooldown():
    k = state(cooldown=CooldownPolicy(4.0, 60.0))
    throttle(k, 1.0)  # fresh: 4 s, until 5
    k.observe(Outcome("rate_limited", 429, retry_after_s=2.0), 1.5, sent_at=0.5)  # sent before: an echo
    assert (k.streak_429, k.cooldown_until) == (1, 5.0)
    k.observe(Outcome("rate_limited", 429, retry_after_s=9.0), 2.0, sent_at=0.9)
    assert (k.streak_429, k.cooldown_until) == (1, 11.0)
    k.observe(Outcome("rate_limited", 429), 3.0, sent_at=0.9)  # no Retry-After: nothing more
    assert k.cooldown_until == 11.0
    k.observe(THROTTLED, 4.0, sent_at=1.0)  # sent at the instant of the last fresh one: fresh
    assert (k.streak_429, k.cooldown_until) == (2, 12.0)


def test_only_a_fresh_success_ends_the_streak():
    k = state(cooldown=CooldownPolicy(1.0, 60.0))
    throttle(k, 1.0)
    throttle(k, 2.0)
    k.observe(OK, 3.0, sent_at=1.5)  # sent before the last 429: says nothing about now
    assert k.streak_429 == 2
    k.observe(OK, 3.0, sent_at=2.0)
    assert k.streak_429 == 0


# -- whose 429 it is ---------------------------------------------------------------------------

def one_job_429_then_ok(k: KeyState, ok_at: float = 2.0) -> None:
    k.observe(THROTTLED, 1.0, job_id="a")  # fresh: the key's (cooldown 1 s)
    k.observe(OK, ok_at, job_id="b")


@pytest.mark.parametrize("scope, again_at, request_scoped", [
    (None, 3.0, True),  # the same job again after another job's success: its own
    ("request", 3.0, True),
    ("key", 3.0, False),  # the worker saw the key had no room
])
def test_a_job_refused_again_after_others_succeeded_does_not_throttle_the_key(scope, again_at, request_scoped):
    k = state()
    one_job_429_then_ok(k)
    k.observe(Outcome("rate_limited", 429, scope=scope), again_at, job_id="a")
    assert k.stats.request_scoped_429 == int(request_scoped) and k.stats.rate_limited == 2
    assert (k.streak_429, k.cooldown_until) == ((0, 2.0) if request_scoped else (1, again_at + 1.0))


def test_a_success_at_the_same_instant_as_the_429_is_not_a_success_since():
    k = state()
    one_job_429_then_ok(k, ok_at=1.0)
    k.observe(THROTTLED, 3.0, job_id="a")
    assert k.stats.request_scoped_429 == 0 and k.streak_429 == 1


@pytest.mark.parametrize("job_id", [None, "c"])
def test_a_429_of_an_unknown_or_other_job_is_the_keys(job_id):
    k = state()
    one_job_429_then_ok(k)
    k.observe(THROTTLED, 3.0, job_id=job_id)
    assert k.stats.request_scoped_429 == 0 and k.streak_429 == 1


def test_another_fresh_429_in_between_makes_it_the_keys_again():
    k = state()
    k.observe(THROTTLED, 1.0, job_id="a")
    k.observe(THROTTLED, 1.5, job_id="c")  # another job's 429 right after: fresh, the key's
    k.observe(OK, 2.0, job_id="b")
    k.observe(THROTTLED, 3.0, job_id="a")
    assert k.stats.request_scoped_429 == 0 and k.streak_429 == 1 and k.cooldown_until == 4.0


@pytest.mark.parametrize("scope", [None, "request"])
def test_back_to_back_429s_of_different_jobs_are_the_keys_whatever_the_headers_say(scope):
    k = state()
    one_job_429_then_ok(k)
    k.observe(Outcome("rate_limited", 429, scope="request"), 3.0, job_id="c")  # after a success: c's own
    assert k.stats.request_scoped_429 == 1
    k.observe(Outcome("rate_limited", 429, scope=scope), 3.5, job_id="d")  # c's just before, no success since
    assert k.stats.request_scoped_429 == 1 and k.streak_429 == 1 and k.cooldown_until == 4.5
    k.observe(Outcome("rate_limited", 429, scope="request"), 4.0, job_id="d")  # d's own again, no success
    assert k.stats.request_scoped_429 == 2


@pytest.mark.parametrize("others, remembered", [(JOB_429_MEMORY - 1, True), (JOB_429_MEMORY, False)])
def test_the_jobs_429s_are_remembered_for_the_last_JOB_429_MEMORY_jobs(others, remembered):
    k = state()
    k.observe(THROTTLED, 1.0, job_id="a")
    for n in range(others):  # echoes of the same overload: they move no time, only fill the memory
        k.observe(THROTTLED, 1.0, sent_at=0.5, job_id=f"o{n}")
    k.observe(OK, 2.0, job_id="b")
    k.observe(THROTTLED, 3.0, sent_at=2.5, job_id="a")
    assert k.stats.request_scoped_429 == int(remembered)


def test_a_job_refused_again_is_remembered_as_the_newest():
    k = state()
    k.observe(THROTTLED, 1.0, job_id="a")
    for n in range(JOB_429_MEMORY - 1):
        k.observe(THROTTLED, 1.0, sent_at=0.5, job_id=f"o{n}")
    k.observe(THROTTLED, 1.0, sent_at=0.5, job_id="a")  # the memory is full; a is the newest now
    k.observe(THROTTLED, 1.0, sent_at=0.5, job_id="o-last")  # the oldest other job is forgotten, not a
    k.observe(OK, 2.0, job_id="b")
    k.observe(THROTTLED, 3.0, sent_at=2.5, job_id="a")
    assert k.stats.request_scoped_429 == 1


# -- the rate a key was sent at ----------------------------------------------------------------

@pytest.mark.parametrize("times, now, rate", [
    ((0.1, 0.2, 0.3, 0.4, 0.5), 1.0, 2.5),  # 5 calls in 2 s
    ((0.1, 0.2, 0.3, 0.4), 1.0, None),  # 4 are too few to be a rate
    ((0.0, 0.1, 0.2, 0.3, 0.4, 0.5), 2.0, 2.5),  # the call exactly 2 s back is out of the window
    ((0.0, 0.1, 0.2, 0.3, 0.4, 0.5), 2.15, None),
])
def test_the_rate_sent_counts_the_calls_of_the_last_two_seconds(times, now, rate):
    k = state(rps=100.0, burst=100.0)
    for at in times:
        k.reserve(at, 1.0)
    assert k.sent_rate(now) == rate


def test_a_429_drops_the_rate_below_the_rate_actually_sent():
    k = state(rps=100.0, burst=100.0, adapt=AdaptPolicy())
    for n in range(10):
        k.reserve(0.1 * n, 1.0)  # 10 calls in 2 s: 5/s, far below the 100/s configured
    throttle(k, 1.0)
    assert k.request_rate.rate == pytest.approx(2.5)  # half the rate that drew it
    k2 = state(rps=100.0, burst=100.0, adapt=AdaptPolicy())
    k2.reserve(0.5, 1.0)  # one call measures nothing: the effective rate is halved
    throttle(k2, 1.0)
    assert k2.request_rate.rate == pytest.approx(50.0)
