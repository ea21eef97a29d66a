"""A key's effective rate (dispatcher/core/adaptive.py) at exact values: the rate, target, peak
and return start after a 429 (with and without a measured sent rate), each success's step
below the target, between the target and the peak, and above the peak (time capped at
max(idle_cap_s, 2 calls at the current rate)), the header hints and their 10 s window, a
live reconfigure, the floor/configured clamp, and `header_rate`. Each value sets how many
calls per second a key is sent."""

from __future__ import annotations

import pytest

from ratefleet.dispatcher.core.adaptive import AdaptiveRate, AdaptPolicy, header_rate

P = AdaptPolicy()  # decrease 0.5, target 0.9, recover 5 s, probe 2 %/s, increase 5 %/s, floor 1 %


def state(r: AdaptiveRate) -> tuple[float, float, float, float]:
    return (round(r.rate, 9), round(r.target, 9), round(r.peak, 9), round(r._low, 9))


def at_the_floor() -> AdaptiveRate:
    """A 100/s key after 20 throttles 0.1 s apart: at the floor (1/s), target 1 (floored), at t = 1.9 s."""
    r = AdaptiveRate(100.0, P, 0.0)
    for i in range(20):
        r.on_throttle(i * 0.1, None)
    return r


@pytest.mark.parametrize("configured", [0.0, -1.0])
def test_a_configured_rate_that_is_not_positive_is_refused(configured):
    with pytest.raises(ValueError, match=r"^configured rate must be > 0$"):
        AdaptiveRate(configured, P, 0.0)


def test_a_new_key_runs_at_its_configured_rate_with_the_floor_at_one_percent():
    r = AdaptiveRate(10.0, P, 0.0)
    assert state(r) == (10.0, 10.0, 10.0, 10.0)
    assert r.configured == 10.0 and r.floor == pytest.approx(0.1)


@pytest.mark.parametrize("sent, after", [
    (None, (5.0, 9.0, 10.0, 5.0)),  # no measurement: from the effective rate
    (0.0, (5.0, 9.0, 10.0, 5.0)),  # a zero measurement is none
    (4.0, (2.0, 3.6, 4.0, 2.0)),  # fewer sent than allowed: from what was sent
    (20.0, (5.0, 9.0, 10.0, 5.0)),  # more sent than the effective rate: from the effective rate
])
def test_a_429_drops_to_half_of_the_rate_that_drew_it(sent, after):
    r = AdaptiveRate(10.0, P, 0.0)
    r.on_throttle(1.0, sent)
    assert state(r) == after


def test_a_success_below_the_target_returns_linearly_over_recover_s():
    r = AdaptiveRate(10.0, P, 0.0)
    r.on_throttle(1.0, None)  # 5 -> target 9 in 5 s: 0.8/s
    r.on_success(2.0)
    assert state(r) == (5.8, 9.0, 10.0, 5.0)
    r.on_success(3.5)
    assert r.rate == pytest.approx(7.0)
    r.on_success(3.5)  # no time passed: no step
    assert r.rate == pytest.approx(7.0)
    r.on_success(5.5)
    assert r.rate == pytest.approx(8.6)
    r.on_success(7.5)  # would be 10.2: stops at the target
    assert state(r) == (9.0, 9.0, 10.0, 5.0)


def test_between_the_target_and_the_peak_a_success_creeps_at_probe_per_s_of_the_target():
    r = AdaptiveRate(10.0, P, 0.0)
    r.on_throttle(0.0, None)
    for now in (2.0, 4.0, 6.0):
        r.on_success(now)
    assert r.rate == pytest.approx(9.0)
    r.on_success(7.0)
    assert state(r) == (9.18, 9.18, 10.0, 5.0)  # +2 % of 9 in 1 s; the target follows
    r.on_success(7.5)
    assert r.rate == pytest.approx(9.18 + 9.18 * 0.02 * 0.5)


def test_above_the_peak_a_success_climbs_by_increase_per_s_of_the_configured_rate():
    r = AdaptiveRate(100.0, P, 0.0)
    r.on_throttle(0.0, 40.0)  # peak 40, rate 20, target 36
    r.on_hint(0.0, 50.0)  # the provider allows 50: return to 47.5, above the peak
    assert state(r) == (20.0, 47.5, 40.0, 20.0)
    for now in (2.0, 4.0, 5.0):  # (47.5 - 20) / 5 s = 5.5/s
        r.on_success(now)
    assert state(r) == (47.5, 47.5, 40.0, 20.0)
    r.on_success(6.0)
    assert state(r) == (52.5, 52.5, 40.0, 20.0)  # 5 % of 100 per second
    r.on_success(8.0)
    assert r.rate == pytest.approx(62.5)


def test_a_key_at_the_floor_climbs_by_increase_per_s_not_by_the_probe():
    r = at_the_floor()
    assert state(r) == (1.0, 1.0, 1.0, 1.0)  # rate, target and peak all at the floor
    r.on_success(2.9)
    assert r.rate == pytest.approx(6.0)  # 5 % of 100 in the 1 s since the last 429


def test_a_measured_rate_below_one_call_per_second_still_counts():
    r = AdaptiveRate(10.0, P, 0.0)
    r.on_throttle(1.0, 0.5)
    assert state(r) == (0.25, 0.45, 0.5, 0.25)


def test_hint_room_equal_to_the_rate_does_not_raise_the_target():
    policy = AdaptPolicy(decrease=0.95, target_fraction=0.5)  # a drop that leaves rate > target
    r = AdaptiveRate(100.0, policy, 0.0)
    r.on_throttle(0.0, None)
    assert state(r) == (95.0, 50.0, 100.0, 95.0)
    r.on_hint(0.0, 100.0)  # room 0.95 x 100 = 95: not above the rate
    assert state(r) == (95.0, 50.0, 100.0, 95.0)
    r.on_success(1.0)
    assert r.rate == pytest.approx(96.0)  # creeps at 2 % of the target 50


def test_only_the_last_64_hints_are_remembered():
    r = at_the_floor()
    r.on_hint(20.0, 40.0)
    for _ in range(63):
        r.on_hint(20.0, 60.0)
    r.on_throttle(20.0, None)
    r.on_hint(20.0, 60.0)  # the 65th hint pushes out the 40
    assert r.target == pytest.approx(57.0)


def test_a_key_at_its_configured_rate_stays_there():
    r = AdaptiveRate(10.0, P, 0.0)
    r.on_success(1.0)
    assert state(r) == (10.0, 10.0, 10.0, 10.0)


@pytest.mark.parametrize("idle_cap_s, gap, climbed", [
    (2.0, 100.0, 2.0),  # capped at idle_cap_s
    (2.0, 1.5, 1.5),
    (3.0, 100.0, 3.0),
    (0.5, 100.0, 0.5),  # 2 calls at 5/s = 0.4 s: the cap is the larger 0.5 s
])
def test_time_between_successes_counts_up_to_the_idle_cap(idle_cap_s, gap, climbed):
    r = AdaptiveRate(10.0, P, 0.0)
    r.on_throttle(0.0, None)  # 5/s, 0.8/s back to 9
    r.on_success(gap, idle_cap_s=idle_cap_s)
    assert r.rate == pytest.approx(5.0 + 0.8 * climbed)


def test_a_key_held_at_a_low_rate_may_count_two_calls_of_its_own_spacing():
    r = AdaptiveRate(1.0, P, 0.0)
    r.on_throttle(0.0, None)  # 0.5/s: 2 calls take 4 s, more than idle_cap_s 2
    r.on_success(100.0)
    assert r.rate == pytest.approx(0.5 + (0.9 - 0.5) * 4.0 / 5.0)


def test_a_success_timed_before_the_last_change_counts_no_time():
    r = AdaptiveRate(10.0, P, 0.0)
    r.on_throttle(5.0, None)
    r.on_success(4.0)
    assert r.rate == 5.0
    r.on_success(6.0)  # one second after the 429, not two after the earlier success
    assert r.rate == pytest.approx(5.8)


def test_a_hint_below_the_rate_sets_rate_target_and_return_start():
    r = AdaptiveRate(10.0, P, 0.0)
    r.on_hint(1.0, 4.0)
    assert state(r) == (4.0, 4.0, 10.0, 4.0)
    r.on_hint(1.0, 4.0)  # the same hint again: nothing moves
    assert state(r) == (4.0, 4.0, 10.0, 4.0)


def test_a_hint_above_the_rate_but_below_the_target_lowers_only_the_target():
    r = AdaptiveRate(10.0, P, 0.0)
    r.on_throttle(0.0, None)  # 5, target 9
    r.on_hint(11.0, 6.0)  # 0.95 x 6 = 5.7 > 5 and > the new target 6? no: 5.7 < 6
    assert state(r) == (5.0, 6.0, 10.0, 5.0)


def test_a_recovering_key_returns_to_95_percent_of_the_lowest_recent_hint():
    r = at_the_floor()  # down to the floor, 1/s; target 1 (floored)
    r.on_hint(20.0, 50.0)
    assert state(r) == (1.0, 47.5, 1.0, 1.0)
    r.on_hint(21.0, 40.0)  # a lower hint: caps the target at 40; 0.95 x 40 is below it
    assert state(r) == (1.0, 40.0, 1.0, 1.0)


def test_a_hint_exactly_10_s_old_still_bounds_the_return_target():
    r = at_the_floor()
    r.on_hint(20.0, 40.0)
    assert r.target == pytest.approx(38.0)
    r.on_throttle(25.0, None)  # back to the floor target
    r.on_hint(30.0, 60.0)  # 40 is exactly 10 s old: still the tightest
    assert r.target == pytest.approx(38.0)


def test_a_hint_older_than_10_s_leaves_the_window():
    r = at_the_floor()
    r.on_hint(20.0, 40.0)
    assert r.target == pytest.approx(38.0)
    r.on_throttle(25.0, None)  # back to the floor target
    r.on_hint(30.001, 60.0)  # 40 is 10.001 s old: out; 0.95 x 60
    assert r.target == pytest.approx(57.0)


def test_the_hint_trust_target_needs_room_above_both_rate_and_target():
    r = AdaptiveRate(100.0, P, 0.0)
    r.on_throttle(0.0, None)  # 50, target 90
    r.on_hint(1.0, 60.0)  # room 57 > 50 but the target drops to 60 first, 57 < 60
    assert state(r) == (50.0, 60.0, 100.0, 50.0)
    r2 = AdaptiveRate(100.0, P, 0.0)
    r2.on_hint(1.0, 40.0)  # rate 40, target 40; room 38 is below both
    assert state(r2) == (40.0, 40.0, 100.0, 40.0)


def test_a_hint_moves_the_time_climbing_is_measured_from():
    r = AdaptiveRate(10.0, P, 0.0)
    r.on_throttle(0.0, None)
    r.on_hint(5.0, 50.0)
    r.on_success(6.0)
    # the hint lifted the target to 10 (0.95 x 50, capped): 1 s since the hint of 5 s to climb 5,
    # not the capped 2 s since the 429
    assert r.rate == pytest.approx(6.0)


def test_a_hint_is_always_cut_to_the_configured_rate_and_the_floor():
    r = AdaptiveRate(10.0, P, 0.0)
    r.on_hint(1.0, 0.001)
    assert state(r) == (0.1, 0.1, 10.0, 0.1)


def test_disabled_adaptation_ignores_every_signal():
    r = AdaptiveRate(10.0, AdaptPolicy(enabled=False), 0.0)
    r.on_throttle(1.0, None)
    r.on_hint(1.0, 2.0)
    r.on_success(2.0)
    assert state(r) == (10.0, 10.0, 10.0, 10.0)


def test_a_reconfigured_key_at_full_rate_moves_to_the_new_rate():
    r = AdaptiveRate(10.0, P, 0.0)
    r.reconfigure(20.0)
    assert state(r) == (20.0, 20.0, 20.0, 20.0)
    assert (r.configured, r.floor) == (20.0, pytest.approx(0.2))
    r.reconfigure(4.0)
    assert state(r) == (4.0, 4.0, 4.0, 4.0)


def test_a_reconfigured_adapted_key_keeps_its_rate_capped_at_the_new_one():
    r = AdaptiveRate(10.0, P, 0.0)
    r.on_throttle(0.0, None)  # 5, target 9, peak 10, low 5
    r.reconfigure(20.0)
    assert state(r) == (5.0, 9.0, 10.0, 5.0)
    r.reconfigure(3.0)
    assert state(r) == (3.0, 3.0, 3.0, 3.0)
    assert r.floor == pytest.approx(0.03)


@pytest.mark.parametrize("configured", [0.0, -2.0])
def test_reconfigure_refuses_a_rate_that_is_not_positive(configured):
    r = AdaptiveRate(10.0, P, 0.0)
    with pytest.raises(ValueError, match=r"^configured rate must be > 0$"):
        r.reconfigure(configured)
    assert r.configured == 10.0


def test_a_raised_floor_lifts_a_low_rate_on_reconfigure():
    r = at_the_floor()
    assert r.rate == pytest.approx(1.0)
    r.reconfigure(500.0)  # floor 5
    assert state(r) == (5.0, 5.0, 5.0, 5.0)


@pytest.mark.parametrize("limit, remaining, reset, expected", [
    (100.0, 40.0, 10.0, 6.0),  # 60 used in the window
    (100.0, 90.0, 10.0, 9.0),  # what is left per second
    (100.0, 100.0, 4.0, 25.0),
    (100.0, 150.0, 10.0, 15.0),  # more left than the limit: used is 0, not negative
    (100.0, 0.0, 0.5, 200.0),
    (100.0, 40.0, 0.0, None),
    (100.0, 40.0, -1.0, None),
    (0.0, 0.0, 10.0, None),
    (0.0, 5.0, 10.0, None),  # no limit: no bound, whatever is left
    (1.0, 0.0, 2.0, 0.5),  # a limit of one call per window is a limit
    (1.0, 0.5, 1.0, 0.5),  # fractional units: half used, half left
    (1e-320, 0.0, 1e10, None),  # a rate that rounds to zero is no rate
    (-5.0, 0.0, 10.0, None),
    (None, 40.0, 10.0, None),
    (100.0, None, 10.0, None),
    (100.0, 40.0, None, None),
])
def test_header_rate_is_the_larger_of_used_and_remaining_per_second(limit, remaining, reset, expected):
    assert header_rate(limit, remaining, reset) == expected


@pytest.mark.parametrize("limit, remaining, reset, expected", [
    (14400.0, 7200.0, 43200.0, 120.0),  # Groq: half a day's requests used, full again in 12 h
    (10000.0, 9990.0, 40000.0, 9990 / 60),  # one IETF policy of a day (w=86400)
    (14400.0, 6.0, 43200.0, 14394 / 43200),  # near the end of the quota: its refill paces
    (1000.0, 0.0, 1800.0, 1000 / 1800),  # spent: the key is cooled until the reset (key.py)
    (60.0, 30.0, 60.0, 0.5),  # at the horizon: a pace, as before
    (60.0, 30.0, 60.5, 0.5),  # just past it: remaining / 60 s
])
def test_a_reset_past_the_pacing_horizon_is_a_quota_spent_within_the_horizon(limit, remaining, reset, expected):
    assert header_rate(limit, remaining, reset) == pytest.approx(expected)


def test_a_key_with_half_its_days_requests_left_keeps_its_rate():
    """A provider trial: Groq's x-ratelimit-*-requests are per day; a key that had used half its
    day (reset 12h0m0s) was held at 0.167 req/s of its 4."""
    from ratefleet.dispatcher.core import BreakerPolicy, CooldownPolicy, Outcome, RateLimitInfo
    from ratefleet.dispatcher.core.key import KeyState
    from ratefleet.dispatcher.core.types import KeySpec
    k = KeyState(KeySpec(id="k1", pool="p", upstream="u", rps=4.0, burst=4.0), safety_s=0.0, breaker=BreakerPolicy(),
                 cooldown=CooldownPolicy(1.0, 60.0), now=0.0, conservative=False, adapt=AdaptPolicy())
    day = RateLimitInfo(limit_requests=14400, remaining_requests=7200, reset_requests_s=43200.0)
    for n in range(20):
        k.observe(Outcome("ok", 200, ratelimit=day), 0.25 * n)
    assert k.request_rate.rate == pytest.approx(4.0) and k.cooldown_until < 5.0
    spent = RateLimitInfo(limit_requests=14400, remaining_requests=0, reset_requests_s=43200.0)
    k.observe(Outcome("ok", 200, ratelimit=spent), 5.0)
    # none left: cooled until the reset, at most retry_after_max_s (then one call looks again)
    assert k.cooldown_until == pytest.approx(5.0 + min(43200.0, k.cooldown.retry_after_max_s))
