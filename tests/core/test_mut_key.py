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
from ratefleet.dispatcher.core.key import JOB_429_MEMORY, ROOM_429_WINDOW_S, KeyState, key_error_reason
from ratefleet.dispatcher.core.types import KeySpec
from ratefleet.schemas.outcome import OutcomeKind

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


@pytest.mark.parametrize("retry_after, wait", [(99.0, 99.0), (100.0, 100.0), (101.0, 100.0), (1e6, 100.0)])
def test_a_provider_named_wait_counts_up_to_retry_after_max_s(retry_after, wait):
    # a Retry-After of 1,000,000 s cooled both keys of a pool for 11.5 days (a new user's trial)
    k = state(cooldown=CooldownPolicy(1.0, 60.0, retry_after_max_s=100.0))
    throttle(k, 2.0, retry_after_s=retry_after)
    assert k.cooldown_until == 2.0 + wait
    echo = state(cooldown=CooldownPolicy(1.0, 60.0, retry_after_max_s=100.0))
    echo.observe(Outcome("rate_limited", 429, retry_after_s=retry_after), 2.0, sent_at=-1.0)  # also as an echo
    assert echo.cooldown_until <= 2.0 + 100.0


def test_an_empty_bucket_s_reset_counts_up_to_retry_after_max_s():
    k = state(cooldown=CooldownPolicy(1.0, 60.0, retry_after_max_s=100.0))
    k.observe(Outcome("ok", 200, ratelimit=RateLimitInfo(remaining_requests=0, reset_requests_s=86400.0)), 5.0)
    assert k.cooldown_until == 105.0


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


def test_an_echo_without_retry_after_after_the_cooldown_does_not_cool_the_key_again():
    k = state(cooldown=CooldownPolicy(1.0, 60.0))
    throttle(k, 1.0)  # until 2
    k.observe(THROTTLED, 5.0, sent_at=0.5)  # a late echo of the same overload
    assert k.ready_at(5.0, 1.0) == 5.0 and k.snapshot(5.0)["cooldown_s"] == 0.0


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


def test_another_jobs_429_after_the_last_success_makes_a_repeat_the_keys_again():
    k = state()
    k.observe(THROTTLED, 1.0, job_id="a")
    k.observe(OK, 2.0, job_id="b")
    k.observe(THROTTLED, 2.5, job_id="c")  # a first 429 of another job after the success: the key's
    k.observe(THROTTLED, 3.0, job_id="a")  # no success since c's: the key refuses everyone
    assert k.stats.request_scoped_429 == 0 and k.streak_429 == 2 and k.cooldown_until == 5.0


def test_jobs_whose_429s_interleave_are_each_their_own_once_the_key_served_others():
    """Two jobs that always get 429, refused back to back at first (the key's), then each
    again after the key served another job: neither repeat throttles the key, nor counts as
    the other's 'everyone is refused' (before: each throttled it again, for ever)."""
    k = state()
    k.observe(THROTTLED, 1.0, job_id="a")
    k.observe(THROTTLED, 1.5, job_id="c")  # right after: the key's (streak 2, until 3.5)
    for at in (4.0, 5.5):
        k.observe(OK, at, job_id="b")
        k.observe(THROTTLED, at + 1.0, job_id="a")
        k.observe(THROTTLED, at + 1.1, job_id="c")  # a's repeat just before is no evidence against the key
    assert k.stats.request_scoped_429 == 4 and k.streak_429 == 0 and k.cooldown_until == 3.5
    k.observe(THROTTLED, 6.7, job_id="a")  # no success since its last: nothing shows the key works
    assert k.stats.request_scoped_429 == 4 and k.streak_429 == 1
    k.observe(OK, 7.0, job_id="b")
    k.observe(THROTTLED, 7.5, job_id="d")  # a new job's first 429 still acts on the key
    assert k.streak_429 == 1 and k.cooldown_until == 8.5


@pytest.mark.parametrize("scope", [None, "request"])
def test_back_to_back_429s_of_different_jobs_are_the_keys_whatever_the_headers_say(scope):
    k = state()
    one_job_429_then_ok(k)
    k.observe(OK, 20.0, job_id="b")
    # after a success, and no other job's 429 within ROOM_429_WINDOW_S: c's own
    k.observe(Outcome("rate_limited", 429, scope="request"), 20.0, job_id="c")
    assert k.stats.request_scoped_429 == 1
    k.observe(Outcome("rate_limited", 429, scope=scope), 20.5, job_id="d")  # c's just before, no success since
    assert k.stats.request_scoped_429 == 1 and k.streak_429 == 1 and k.cooldown_until == 21.5
    k.observe(Outcome("rate_limited", 429, scope="request"), 21.0, job_id="d")  # d's own again, no success
    assert k.stats.request_scoped_429 == 2


@pytest.mark.parametrize("gap, request_scoped", [
    (1.0, 0),  # another job's 429 a second before, successes between: the key's
    (ROOM_429_WINDOW_S, 0),
    (ROOM_429_WINDOW_S + 0.5, 1),  # long enough ago: the headers' room stands
])
def test_room_in_the_headers_does_not_outweigh_another_jobs_recent_429(gap, request_scoped):
    """Azure / Anthropic: the headers show per-minute room while the key is out of its
    per-second room; 429s of different jobs interleave with successes."""
    k = state()
    k.observe(Outcome("rate_limited", 429, scope="request"), 100.0, job_id="a")  # first: the request's
    assert k.stats.request_scoped_429 == 1 and k.streak_429 == 0
    k.observe(OK, 100.0 + gap / 2, job_id="b")
    k.observe(Outcome("rate_limited", 429, scope="request"), 100.0 + gap, job_id="c")
    assert k.stats.request_scoped_429 == 1 + request_scoped
    assert k.streak_429 == 1 - request_scoped  # the key's: it cools down and slows down


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


# -- when a key is ready -----------------------------------------------------------------------

def test_without_a_reserve_the_last_token_is_used():
    k = state(rps=1.0, burst=2.0)
    k.reserve(0.0, 1.0)
    assert k.ready_at(0.0, 1.0) == 0.0
    k.reserve(0.0, 1.0)
    assert k.ready_at(0.0, 1.0) == 1.0


def test_a_key_at_its_concurrency_cap_waits_for_a_completion():
    k = state(concurrency=2)
    first = k.reserve(0.0, 1.0)
    assert k.ready_at(0.0, 1.0) == 0.0  # one below the cap
    k.reserve(0.0, 1.0)
    assert k.in_flight == 2 and k.ready_at(0.0, 1.0) is None
    k.give_back(0.0, 1.0, first)
    assert k.in_flight == 1 and k.ready_at(0.0, 1.0) == 0.0


@pytest.mark.parametrize("cost, ready", [(60.0, 0.0), (60.5, None), (1.0, 0.0)])
def test_a_job_costing_more_than_the_cost_capacity_never_fits(cost, ready):
    assert state(cost_per_minute=60.0).ready_at(0.0, cost) == ready
    assert state().ready_at(0.0, 1e9) == 0.0  # no cost limit: any cost


@pytest.mark.parametrize("burst, reserve, taken, ready", [
    (3.0, 2.0, 0, 0.0),  # 3 tokens: 1 for the job, 2 kept
    (3.0, 2.0, 1, 1.0),  # 2 left: one more must refill (1/s)
    (2.0, 2.0, 1, 0.0),  # the burst cannot hold 1 + 2: the reserve is not kept
    (2.5, 1.5, 1, 1.0),  # it can (exactly): kept
])
def test_a_priority_reserve_is_kept_only_when_the_burst_can_hold_it(burst, reserve, taken, ready):
    k = state(rps=1.0, burst=burst)
    for _ in range(taken):
        k.reserve(0.0, 1.0)
    assert k.ready_at(0.0, 1.0, reserve) == ready


def test_ready_is_the_latest_of_cooldown_and_both_buckets():
    k = state(rps=1.0, burst=1.0, cost_per_minute=60.0)  # 1 cost unit/s
    k.reserve(0.0, 60.0)
    assert k.ready_at(0.0, 1.0) == 1.0  # the request bucket
    assert k.ready_at(0.0, 30.0) == 30.0  # the cost bucket
    k.cooldown_until = 40.0
    assert k.ready_at(0.0, 30.0) == 40.0 and k.ready_at(41.0, 1.0) == 41.0


def open_breaker(k: KeyState, now: float) -> None:
    for _ in range(BreakerPolicy().fail_max):
        k.breaker.settle(0, k.breaker.generation, OutcomeKind.UPSTREAM_ERROR, now)


def test_an_open_breaker_holds_the_key_and_a_probe_in_flight_takes_no_other_job():
    k = state()
    open_breaker(k, 1.0)
    assert k.ready_at(2.0, 1.0) == 1.0 + BreakerPolicy().reset_timeout_s
    assert k.ready_at(31.0, 1.0) == 31.0  # half-open: one call may go
    assert k.breaker.take_probe(7)
    assert k.ready_at(31.0, 1.0) is None  # only its completion frees the key


# -- reserving, giving back, the actual cost ----------------------------------------------------

def test_a_reservation_given_back_restores_both_buckets():
    k = state(rps=1.0, burst=2.0, cost_per_minute=60.0)
    marks = k.reserve(0.0, 10.0)
    assert (k.requests.advance(0.0), k.cost.advance(0.0), k.in_flight) == (1.0, 50.0, 1)
    k.give_back(0.0, 10.0, marks)
    assert (k.requests.advance(0.0), k.cost.advance(0.0), k.in_flight) == (2.0, 60.0, 0)


def test_a_reservation_on_a_key_without_cost_limit_has_no_cost_mark():
    k = state()
    marks = k.reserve(0.0, 10.0)
    assert marks.cost is None and marks.requests > 0
    k.give_back(0.0, 10.0, marks)
    assert k.requests.advance(0.0) == 5.0


@pytest.mark.parametrize("actual, level", [
    (30.0, 30.0), (45.0, 15.0), (20.0, 40.0), (None, 30.0), (0.0, 60.0),
    (80.0, -20.0), (90.0, -30.0),  # an overrun of up to one bucket (cost_per_minute) is charged
    (91.0, -30.0), (10_000_000.0, -30.0),  # never more: a usage figure past the limit is not a charge
])
def test_the_actual_cost_is_charged_back(actual, level):
    k = state(cost_per_minute=60.0)
    marks = k.reserve(0.0, 30.0)
    k.correct_cost(0.0, 30.0, actual, marks.cost)
    assert k.cost.advance(0.0) == level


def test_each_calls_overrun_is_capped_not_the_level():
    """Calls in flight together that each used more than estimated all stay charged (a cap on
    the level dropped the real overspend: 60 such calls spent 1.9 x the limit); one call's
    absurd usage figure costs one bucket at most."""
    k = state(cost_per_minute=60.0)
    first, second, third = k.reserve(0.0, 10.0), k.reserve(0.0, 10.0), k.reserve(0.0, 10.0)
    k.correct_cost(0.0, 10.0, 50.0, first.cost)  # 30 - 40 = -10
    k.correct_cost(0.0, 10.0, 50.0, second.cost)  # -50
    assert k.cost.advance(0.0) == -50.0
    k.correct_cost(0.0, 10.0, 10_000_000.0, third.cost)  # at most one bucket more
    assert k.cost.advance(0.0) == -110.0
    assert k.cost.ready_at(0.0, 1.0) == pytest.approx(111.0)  # at 1 token/s: about two minutes, not weeks


def test_no_cost_correction_without_a_mark_or_a_cost_bucket():
    k = state(cost_per_minute=60.0)
    k.reserve(0.0, 30.0)
    k.correct_cost(0.0, 30.0, 50.0, None)
    assert k.cost.advance(0.0) == 30.0
    plain = state()
    plain.correct_cost(0.0, 30.0, 50.0, 1)  # nothing to correct, nothing raised
    assert plain.cost is None


# -- the provider's ratelimit headers ----------------------------------------------------------

def answered(k: KeyState, now: float, **info) -> None:
    k.observe(Outcome("ok", 200, ratelimit=RateLimitInfo(**info)), now)


@pytest.mark.parametrize("limit, hint, burst", [(3.0, 3.0, 3.0), (1.0, 1.0, 1.0), (0.5, None, 5.0), (None, None, 5.0)])
def test_the_reported_request_limit_caps_the_burst(limit, hint, burst):
    k = state(rps=10.0, burst=5.0)
    answered(k, 0.0, limit_requests=limit)
    assert k.limit_hint == hint and k.requests.capacity == burst


def test_the_reported_limit_less_the_safety_margin_caps_the_burst_never_below_one():
    k = state(rps=2.0, burst=20.0, safety_s=1.0)  # burst 20 - 2 = 18
    answered(k, 0.0, limit_requests=6.0)
    assert k.requests.capacity == 4.0  # 6 - 1 s x 2/s
    answered(k, 0.0, limit_requests=2.0)
    assert k.requests.capacity == 1.0


@pytest.mark.parametrize("remaining, reset, cooldown", [(0.0, 6.0, 6.0), (-1.0, 6.0, 6.0), (0.5, 6.0, 0.0), (0.0, None, 0.0)])
def test_an_empty_request_bucket_cools_the_key_until_its_reset(remaining, reset, cooldown):
    k = state(rps=1.0, burst=5.0)
    answered(k, 1.0, remaining_requests=remaining, reset_requests_s=reset)
    assert k.requests.advance(1.0) == remaining
    assert max(0.0, k.cooldown_until - 1.0) == cooldown


@pytest.mark.parametrize("remaining, reset, cooldown", [(0.0, 3.0, 3.0), (-5.0, 3.0, 3.0), (1.0, 3.0, 0.0), (0.0, None, 0.0)])
def test_an_empty_token_budget_cools_a_key_without_a_cost_bucket_until_its_reset(remaining, reset, cooldown):
    k = state()
    answered(k, 1.0, remaining_tokens=remaining, reset_tokens_s=reset)
    assert max(0.0, k.cooldown_until - 1.0) == cooldown
    k = state(cost_per_minute=600.0)  # a cost bucket holding only estimates (no usage reported): cooled too
    answered(k, 1.0, remaining_tokens=remaining, reset_tokens_s=reset)
    assert k.cost.advance(1.0) == remaining and max(0.0, k.cooldown_until - 1.0) == cooldown
    k = state(cost_per_minute=600.0)  # charged real usage, its bucket, lowered to what remains, waits for the refill
    k.observe(Outcome("ok", 200, actual_cost=50.0, ratelimit=RateLimitInfo(remaining_tokens=remaining,
                                                                            reset_tokens_s=reset)), 1.0)
    assert k.cost.advance(1.0) == remaining and k.cooldown_until == -math.inf


def test_the_headers_cap_the_effective_request_and_cost_rates():
    k = state(rps=100.0, burst=10.0, cost_per_minute=60000.0, adapt=AdaptPolicy())
    answered(k, 0.0, limit_requests=60.0, remaining_requests=30.0, reset_requests_s=10.0,
             limit_tokens=1000.0, remaining_tokens=200.0, reset_tokens_s=10.0)
    assert k.request_rate.rate == pytest.approx(3.0)  # max(30 used, 30 left) / 10 s
    assert k.cost_rate.rate == pytest.approx(80.0)  # 800 used / 10 s
    assert k.requests.rate == pytest.approx(3.0) and k.cost.rate == pytest.approx(80.0)  # the buckets follow


@pytest.mark.parametrize("info, cost_dropped", [
    (RateLimitInfo(remaining_tokens=0.0, remaining_requests=5.0), True),  # out of tokens, not requests
    (RateLimitInfo(remaining_tokens=-2.0, remaining_requests=1.0), True),
    (RateLimitInfo(remaining_tokens=0.0), True),
    (RateLimitInfo(remaining_tokens=0.0, remaining_requests=0.0), False),  # out of both: the request rate
    (RateLimitInfo(remaining_tokens=1.0, remaining_requests=5.0), False),
    (RateLimitInfo(remaining_requests=5.0), False),
    (None, False),
])
def test_a_429_out_of_tokens_drops_the_cost_rate_not_the_request_rate(info, cost_dropped):
    k = state(rps=100.0, burst=10.0, cost_per_minute=6000.0, adapt=AdaptPolicy())
    throttle(k, 1.0, ratelimit=info)
    assert (k.cost_rate.rate < 100.0, k.request_rate.rate < 100.0) == (cost_dropped, not cost_dropped)
    plain = state(rps=100.0, burst=10.0, adapt=AdaptPolicy())  # no cost bucket: the request rate drops
    throttle(plain, 1.0, ratelimit=info)
    assert plain.request_rate.rate == pytest.approx(50.0)


# -- the burst a key starts with and the one it adapts to --------------------------------------

@pytest.mark.parametrize("burst, safety_s, rps, capacity", [(10.0, 0.5, 4.0, 8.0), (2.0, 1.0, 4.0, 1.0), (10.0, 0.0, 4.0, 10.0)])
def test_the_burst_keeps_a_safety_margin_of_safety_s_times_the_rate(burst, safety_s, rps, capacity):
    k = state(rps=rps, burst=burst, safety_s=safety_s)
    assert k.requests.capacity == capacity and k.requests.advance(0.0) == capacity and k.requests.rate == rps


@pytest.mark.parametrize("conservative, level", [(False, 5.0), (True, 0.0)])
def test_a_conservative_start_begins_with_empty_buckets(conservative, level):
    k = state(rps=1.0, burst=5.0, cost_per_minute=120.0, conservative=conservative)
    assert k.requests.advance(0.0) == level and k.cost.advance(0.0) == level * 24.0
    assert (k.cost.rate, k.cost.capacity, k.cost_rate.rate) == (2.0, 120.0, 2.0)
    assert k.requests.advance(10.0) == 5.0 and k.cost.advance(60.0) == 120.0


def test_the_burst_is_held_to_first_burst_until_the_first_answer():
    k = state(rps=10.0, burst=8.0, adapt=AdaptPolicy(first_burst=2.0))
    assert k.requests.capacity == 2.0 and k.requests.advance(0.0) == 2.0 and k.requests.rate == 10.0
    k.observe(Outcome("none"), 0.1)  # no answer (never sent): still held
    assert k.requests.capacity == 2.0
    k.observe(Outcome("upstream_error", 500), 0.2)  # any answer lets the whole burst refill
    assert k.answered and k.requests.capacity == 8.0 and k.requests.advance(1.2) == 8.0


def test_a_reload_before_the_first_answer_keeps_the_burst_held():
    from ratefleet.dispatcher.core.reconfigure import relimit
    k = state(rps=10.0, burst=8.0, adapt=AdaptPolicy(first_burst=2.0))
    relimit(k, KeySpec(id="k1", pool="p", upstream="u", rps=10.0, burst=10.0), 0.0)
    assert k.requests.capacity == 2.0
    relimit(k, KeySpec(id="k1", pool="p", upstream="u", rps=10.0, burst=1.5), 0.0)  # below first_burst
    assert k.requests.capacity == 1.5 and k.requests.advance(0.0) == 1.5
    k.observe(OK, 0.1)
    assert k.requests.capacity == 1.5


def test_first_burst_means_nothing_without_adaptation_or_above_the_burst():
    assert state(burst=8.0, adapt=AdaptPolicy(enabled=False, first_burst=2.0)).requests.capacity == 8.0
    assert state(burst=8.0, adapt=AdaptPolicy(first_burst=20.0)).requests.capacity == 8.0


def test_the_burst_shrinks_with_the_rate_never_below_one():
    k = state(rps=10.0, burst=4.0, adapt=AdaptPolicy())
    throttle(k, 0.0)
    assert (k.requests.rate, k.requests.capacity) == (5.0, 2.0)
    throttle(k, 10.0)
    assert (k.requests.rate, k.requests.capacity) == (2.5, 1.0)
    throttle(k, 20.0)
    assert k.requests.capacity == 1.0


@pytest.mark.parametrize("before, after", [(None, 600.0), (600.0, None)])
def test_a_reservation_from_before_a_cost_limit_was_added_or_removed_is_given_back(before, after):
    """A live config change adds or drops a key's cost limit while a reservation made under the
    old one is still out: giving it back restores the request token and leaves the cost alone."""
    from ratefleet.dispatcher.core.reconfigure import relimit
    k = state(rps=1.0, burst=2.0, cost_per_minute=before)
    marks = k.reserve(0.0, 10.0)
    relimit(k, KeySpec(id="k1", pool="p", upstream="u", rps=1.0, burst=2.0, cost_per_minute=after), 0.0)
    k.give_back(0.0, 10.0, marks)
    assert k.in_flight == 0 and k.requests.advance(0.0) == 2.0
    assert k.cost_capacity == (after if after else math.inf)


# -- the key's line in the status view ---------------------------------------------------------

def test_the_status_view_rounds_rates_levels_and_times_to_readable_precision():
    k = state(rps=10 / 3, burst=10 / 3, cost_per_minute=100 / 3, adapt=AdaptPolicy(), concurrency=3)
    k.reserve(0.0, 1.0)
    k.observe(Outcome("rate_limited", 429, retry_after_s=7 / 3), 0.0)
    assert k.snapshot(0.1) == {
        "pool": "p", "upstream": "u", "rps": 10 / 3, "cost_per_minute": 100 / 3, "concurrency": 3,
        "effective_rps": 1.667, "burst": 1.67, "tokens": 1.67,  # halved by the 429
        "effective_cost_per_minute": 33.3, "cost_tokens": 32.39,  # 100/3 - 1 + 0.1 s x 100/180
        "in_flight": 1, "breaker": "closed", "cooldown_s": 2.233, "throttled": True,
        "state": "enabled", "disabled_by": None, "disabled_for_s": None, "probe_in_s": None, "probe_in_flight": False,
        "probe_delay_s": None, "secret_missing": None, "disabled": False, "disabled_reason": None,
        "calls": 1, "ok": 0, "rate_limited": 1, "errors": 0,
    }
    assert k.snapshot(5.0)["cooldown_s"] == 0.0  # over: never negative


@pytest.mark.parametrize("outcome, counts", [
    (OK, (1, 1, 0, 0)), (THROTTLED, (1, 0, 1, 0)), (Outcome("upstream_error", 500), (1, 0, 0, 1)),
    (Outcome("bad_request", 400), (1, 0, 0, 1)), (Outcome("key_error", 401), (1, 0, 0, 1)), (Outcome("none"), (0, 0, 0, 0)),
])
def test_each_answer_is_counted_once_under_its_kind(outcome, counts):
    k = state()
    for n in (1, 2):
        k.observe(outcome, float(n))
        view = k.snapshot(float(n))
        assert (view["calls"], view["ok"], view["rate_limited"], view["errors"]) == tuple(n * c for c in counts)


@pytest.mark.parametrize("outcome, disabled", [
    (Outcome("none"), False), (OK, False), (THROTTLED, False), (Outcome("upstream_error", 500), False),
    (Outcome("key_error", 401), True),
])
def test_only_a_key_error_reports_the_key_taken_out(outcome, disabled):
    """The leader logs and saves the record of every key `observe` reports as taken out."""
    k = state()
    assert bool(k.observe(outcome, 1.0)) is disabled
    assert (k.disabled_reason is not None) is disabled


def test_a_key_without_a_secret_says_so_and_takes_no_job():
    k = state()
    k.health.secret_missing = "since 12:00"
    assert k.disabled_reason == "no worker has its secret (since 12:00)"
    view = k.snapshot(0.0)
    assert view["disabled"] is True and view["disabled_reason"] == k.disabled_reason
    assert k.ready_at(0.0, 1.0) is None
    k.observe(Outcome("key_error", 401), 1.0)  # taken out as well: the provider's reason comes first
    assert k.disabled_reason == "401/403: upstream answered 401"


def test_the_rate_sent_is_measured_on_fast_keys_as_well():
    """A key sending 200 calls/s (OpenAI's 12,000 RPM tier): a 429 halves the 200/s it was
    sent at. (The window once kept only the last 256 calls: any key above 128/s read as
    128/s, and a 429 dropped it to 64/s, a third of its rate lost until it climbed back.)"""
    k = state(rps=250.0, burst=500.0, adapt=AdaptPolicy())
    for n in range(400):
        k.reserve(n / 200.0, 1.0)  # 0 .. 1.995 s
    assert k.sent_rate(2.0) == pytest.approx(199.5)  # the call at exactly 2 s back is out
    throttle(k, 2.0)
    assert k.request_rate.rate == pytest.approx(199.5 / 2)



# -- the end of a cooldown ---------------------------------------------------------------------

def test_a_cooldown_ends_with_one_call_then_the_keys_rate_not_its_burst():
    """A provider trial: with the bucket refilled while the key stood still, each cooldown
    ended in `burst` calls within a millisecond, all refused again."""
    k = state(rps=10.0, burst=5.0)
    throttle(k, 0.0, retry_after_s=2.0)
    end = k.cooldown_until
    assert end == pytest.approx(2.0)
    assert k.ready_at(1.0, 1.0) == pytest.approx(end)
    k.reserve(end, 1.0)  # the first call after the cooldown
    assert k.ready_at(end, 1.0) == pytest.approx(end + 0.1)  # the next one 1 / rps later, not at once
    k.reserve(end + 0.1, 1.0)
    assert k.ready_at(end + 0.1, 1.0) == pytest.approx(end + 0.2)


def test_the_rate_after_a_cooldown_is_the_lowered_one():
    k = state(rps=10.0, burst=5.0, adapt=AdaptPolicy())
    throttle(k, 0.0, retry_after_s=2.0)
    rate = k.requests.rate
    assert rate < 10.0
    end = k.cooldown_until
    assert k.ready_at(end - 0.5, 1.0) == pytest.approx(end)
    k.reserve(end, 1.0)
    assert k.ready_at(end, 1.0) == pytest.approx(end + 1.0 / rate)


def test_an_echo_that_lengthens_the_cooldown_holds_the_burst_back_to_its_new_end():
    k = state(rps=10.0, burst=5.0)
    k.observe(THROTTLED, 1.0, sent_at=0.5)  # fresh: cooled to 2.0
    k.observe(Outcome("rate_limited", 429, retry_after_s=4.0), 1.5, sent_at=0.9)  # an echo naming a longer wait
    end = k.cooldown_until
    assert end == pytest.approx(5.5)
    k.reserve(end, 1.0)
    assert k.ready_at(end, 1.0) == pytest.approx(end + 0.1)


def test_a_request_scoped_429_leaves_the_burst_alone():
    k = state(rps=10.0, burst=5.0)
    k.observe(Outcome("rate_limited", 429, scope="request"), 1.0, job_id="j1")
    assert k.cooldown_until == -math.inf and k.requests.advance(1.0) == pytest.approx(5.0)


@pytest.mark.parametrize("lowered", ["headers", "reconfigure"])
def test_a_rate_lowered_during_the_cooldown_does_not_stretch_it(lowered):
    """A reviewer: held as a debt in tokens at the rate of the 429, the hold lasted far longer
    than the cooldown once the rate fell during it (an echo's headers: ready at 125 s for a
    cooldown ending at 51 s; an operator lowering rps to 0.1: 1,452 s for 30 s)."""
    from ratefleet.dispatcher.core.reconfigure import relimit
    k = state(rps=10.0, burst=5.0, adapt=AdaptPolicy())
    throttle(k, 0.0, retry_after_s=30.0)
    if lowered == "headers":
        k.observe(Outcome("ok", 200, ratelimit=RateLimitInfo(limit_requests=60, remaining_requests=59,
                                                             reset_requests_s=60.0)), 1.2, sent_at=-0.5)
    else:
        relimit(k, KeySpec(id="k1", pool="p", upstream="u", rps=0.1, burst=5.0), 1.0)
    end = k.cooldown_until
    assert end == pytest.approx(30.0)
    assert k.ready_at(end, 1.0) == pytest.approx(end)  # ready when the cooldown ends
    k.reserve(end, 1.0)
    assert k.ready_at(end, 1.0) == pytest.approx(end + 1.0 / k.requests.rate)  # one call, then the rate



def test_a_key_idle_long_after_its_cooldown_keeps_its_refilled_burst():
    """A second review: the cut was made at the first call after the cooldown, as of the bucket's
    last change, so a key changed by a late answer an hour later lost its refilled burst."""
    k = state(rps=1.0, burst=5.0)
    throttle(k, 0.1, retry_after_s=10.0)
    k.observe(OK, 3599.0, sent_at=0.0)  # a late answer of a call sent before the 429
    k.reserve(3600.0, 1.0)
    assert k.requests.advance(3600.0) == pytest.approx(4.0)


def test_a_reservation_given_back_after_the_cooldown_does_not_restore_the_burst():
    k = state(rps=1.0, burst=5.0)
    early = [k.reserve(0.0, 1.0) for _ in range(5)]  # drained
    throttle(k, 0.1, retry_after_s=2.0)
    end = k.cooldown_until
    k.reserve(end, 1.0)
    k.give_back(end, 1.0, early[0])  # a call reserved before the 429, never made
    assert k.ready_at(end, 1.0) == pytest.approx(end + 1.0)


def test_the_priority_reserve_sees_the_one_token_a_cooldown_ends_with():
    k = state(rps=1.0, burst=5.0)
    throttle(k, 0.0, retry_after_s=30.0)
    end = k.cooldown_until
    assert k.ready_at(end, 1.0, reserve=2.0) == pytest.approx(end + 2.0)  # 1 + 2 tokens: not at once
    assert k.ready_at(end, 1.0) == pytest.approx(end)


def test_a_cooldown_lengthened_by_the_429s_own_headers_still_ends_with_one_call():
    k = state(rps=10.0, burst=5.0)
    throttle(k, 0.0, retry_after_s=2.0,
             ratelimit=RateLimitInfo(limit_requests=60, remaining_requests=0, reset_requests_s=10.0))
    end = k.cooldown_until
    assert end == pytest.approx(10.0)
    k.reserve(end, 1.0)
    assert k.ready_at(end, 1.0) == pytest.approx(end + 1.0 / k.requests.rate)
