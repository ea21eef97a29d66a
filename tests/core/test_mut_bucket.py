"""The token bucket (dispatcher/core/bucket.py) at exact values: the level after a refill
(rate x elapsed, capped at capacity, never lowered by an earlier `now`), the instant
`ready_at` promises (burst edge, float tolerance, a `now` before the last one seen), the
marks `take` hands out, how much a refund may give back (only headroom the bucket never
refilled into), `limit` and `set_rate` at the instant they act, and the bounded refund
history. Each of these decides how many calls a key gets and when."""

from __future__ import annotations

import math

import pytest

from ratefleet.dispatcher.core.bucket import EPSILON, TokenBucket


@pytest.mark.parametrize("rate, capacity", [(0.0, 5.0), (-1.0, 5.0), (1.0, 0.0), (1.0, -2.0)])
def test_a_bucket_without_a_positive_rate_and_capacity_is_refused(rate, capacity):
    with pytest.raises(ValueError, match=r"^bucket rate and capacity must be > 0$"):
        TokenBucket(rate, capacity, 0.0, 0.0)


def test_the_smallest_positive_rate_and_capacity_are_accepted():
    b = TokenBucket(1e-6, 1e-6, 0.0, 0.0)
    assert (b.rate, b.capacity) == (1e-6, 1e-6)


@pytest.mark.parametrize("tokens, level", [(10.0, 5.0), (5.0, 5.0), (3.0, 3.0), (-2.0, -2.0)])
def test_the_start_level_is_cut_to_the_capacity(tokens, level):
    assert TokenBucket(1.0, 5.0, tokens, 0.0).advance(0.0) == level


@pytest.mark.parametrize("now, level", [(0.0, 1.0), (1.5, 4.0), (4.5, 10.0), (4.0, 9.0), (100.0, 10.0), (-3.0, 1.0)])
def test_the_level_refills_at_rate_per_second_up_to_capacity(now, level):
    b = TokenBucket(2.0, 10.0, 1.0, 0.0)
    assert b.advance(now) == pytest.approx(level, abs=1e-12)


def test_advance_changes_nothing_and_take_moves_to_now_first():
    b = TokenBucket(2.0, 10.0, 0.0, 0.0)
    assert b.advance(3.0) == 6.0
    assert b.advance(1.0) == 2.0  # nothing moved
    b.take(3.0, 4.0)
    assert b.advance(3.0) == 2.0
    assert b.advance(4.0) == 4.0


def test_an_earlier_now_counts_as_the_last_one_seen():
    b = TokenBucket(1.0, 10.0, 0.0, 0.0)
    b.take(5.0, 5.0)  # level 0 at t=5
    b.take(2.0, 1.0)  # t=2 is before t=5: counts as t=5, no refill, no negative elapsed
    assert b.advance(5.0) == -1.0
    assert b.advance(6.0) == 0.0
    assert b.ready_at(2.0, 1.0) == 7.0  # measured from t=5, never from the earlier now


@pytest.mark.parametrize("n, expected", [
    (10.0, 4.5),  # a full burst: (10 - 1) / 2 s after t=0
    (10.0 + EPSILON / 2, 4.5 + EPSILON / 4),  # within the tolerance of the capacity
    (10.0 + EPSILON, 4.5 + EPSILON / 2),  # the tolerance itself: still a full burst
    (10.0 + 1e-6, math.inf),  # more than the bucket can ever hold
    (1.0, 0.0),  # exactly the level: now
    (1.0 + EPSILON / 2, 0.0),  # within the tolerance of the level: now
    (1.0 + 1e-6, 0.0 + 1e-6 / 2),
    (3.0, 1.0),
    (0.0, 0.0),
])
def test_ready_at_is_the_instant_the_level_reaches_n(n, expected):
    b = TokenBucket(2.0, 10.0, 1.0, 0.0)
    assert b.ready_at(0.0, n) == pytest.approx(expected, abs=1e-12)


def test_a_shortfall_of_exactly_the_tolerance_is_ready_now():
    b = TokenBucket(2.0, 10.0, 0.0, 0.0)
    assert b.ready_at(0.0, EPSILON) == 0.0
    assert b.ready_at(0.0, 2 * EPSILON) == EPSILON


def test_ready_at_from_a_later_now_counts_only_what_is_still_missing():
    b = TokenBucket(2.0, 10.0, 0.0, 0.0)
    assert b.ready_at(1.0, 3.0) == 1.5  # 2 there at t=1, 1 missing at 2/s
    assert b.ready_at(5.0, 3.0) == 5.0
    b.take(0.0, 3.0)  # debt: -3 at t=0
    assert b.ready_at(0.0, 1.0) == 2.0


def test_take_spends_into_debt_and_hands_out_increasing_marks():
    b = TokenBucket(1.0, 5.0, 2.0, 0.0)
    assert b.take(0.0, 5.0) == 1
    assert b.advance(0.0) == -3.0
    assert b.take(1.0, 0.5) == 2
    assert b.advance(1.0) == -2.5
    assert b.take(1.0, 0.0) == 3


def test_a_refund_right_away_gives_everything_back():
    b = TokenBucket(1.0, 10.0, 10.0, 0.0)
    mark = b.take(0.0, 4.0)
    assert b.refund(0.0, 4.0, mark) == 4.0
    assert b.advance(0.0) == 10.0


def test_a_refund_gives_back_only_the_headroom_the_bucket_never_refilled_into():
    b = TokenBucket(1.0, 10.0, 10.0, 0.0)
    mark = b.take(0.0, 4.0)  # 6 left
    assert b.refund(2.0, 4.0, mark) == 2.0  # refilled to 8: 2 of headroom left
    assert b.advance(2.0) == 10.0
    b = TokenBucket(1.0, 10.0, 10.0, 0.0)
    mark = b.take(0.0, 4.0)
    assert b.refund(5.0, 4.0, mark) == 0.0  # full again: the provider never saw the difference
    assert b.advance(5.0) == 10.0


def test_a_refund_is_measured_against_the_fullest_moment_since_the_take():
    b = TokenBucket(1.0, 10.0, 10.0, 0.0)
    mark = b.take(0.0, 4.0)  # 6
    b.take(3.0, 5.0)  # refilled to 9, then 4: the headroom was 1 at t=3
    assert b.refund(3.0, 4.0, mark) == 1.0
    assert b.advance(3.0) == 5.0


def test_a_refund_of_more_than_was_taken_or_of_nothing_gives_what_it_may():
    b = TokenBucket(1.0, 10.0, 10.0, 0.0)
    mark = b.take(0.0, 2.0)
    assert b.refund(0.0, -1.0, mark) == 0.0
    assert b.refund(0.0, 0.0, mark) == 0.0
    assert b.advance(0.0) == 8.0
    assert b.refund(0.0, 5.0, mark) == 2.0  # the full headroom, never above capacity
    assert b.advance(0.0) == 10.0


def test_every_refund_moves_the_mark_sequence():
    b = TokenBucket(1.0, 10.0, 10.0, 0.0)
    mark = b.take(0.0, 2.0)
    b.refund(0.0, 0.0, mark)  # gives nothing, still one mutation
    assert b.take(0.0, 1.0) == mark + 2


def test_two_overlapping_refunds_together_give_back_no_more_than_the_headroom():
    b = TokenBucket(1.0, 10.0, 10.0, 0.0)
    first = b.take(0.0, 5.0)  # 5
    second = b.take(0.0, 5.0)  # 0
    assert b.refund(8.0, 5.0, second) == 2.0  # 8 of 10 at t=8
    assert b.refund(8.0, 5.0, first) == 0.0
    assert b.advance(8.0) == 10.0


def test_a_refund_raises_the_history_seen_by_an_older_mark():
    b = TokenBucket(1.0, 10.0, 10.0, 0.0)
    first = b.take(0.0, 5.0)  # 5
    second = b.take(0.0, 5.0)  # 0
    assert b.refund(8.0, 5.0, second) == 2.0  # 8 at t=8: 2 of headroom, now full
    b.take(8.0, 4.0)  # 6
    # the moment at t=8 counts as full for `first` too: a provider that saw only the
    # second call (actual cost 3) and this one is at 10 -> 6 as well
    assert b.refund(8.0, 5.0, first) == 0.0
    assert b.advance(8.0) == 6.0


def test_after_more_than_256_history_entries_the_oldest_marks_refund_nothing():
    b = TokenBucket(1.0, 1000.0, 1000.0, 0.0)
    marks = [b.take(0.0, 1.0) for _ in range(300)]
    assert marks[:2] == [1, 2]
    assert b.refund(0.0, 1.0, marks[126]) == 0.0  # its history was dropped: give nothing back
    assert b.refund(0.0, 1.0, marks[127]) == 1.0
    assert b.advance(0.0) == 701.0


def _given_back(takes: int, index: int) -> float:
    b = TokenBucket(1.0, 1000.0, 1000.0, 0.0)
    marks = [b.take(0.0, 1.0) for _ in range(takes)]
    return b.refund(0.0, 1.0, marks[index])


@pytest.mark.parametrize("takes, given", [
    (256, (0.0, 1.0, 1.0, 1.0, 1.0)),  # the refund's own entry is the 257th: drops the oldest 128
    (383, (0.0, 1.0, 1.0, 1.0, 1.0)),
    (384, (0.0, 0.0, 0.0, 0.0, 1.0)),  # and 128 entries later the next 128
])
def test_the_refund_history_forgets_in_halves_of_128_once_it_exceeds_256(takes, given):
    assert tuple(_given_back(takes, i) for i in (126, 127, 200, 254, 255)) == given


def test_zero_cost_takes_at_the_same_level_do_not_push_out_the_history():
    b = TokenBucket(1.0, 1000.0, 1000.0, 0.0)
    mark = b.take(0.0, 1.0)
    for _ in range(300):
        b.take(0.0, 0.0)  # the same level each time: one history entry, not 300
    assert b.refund(0.0, 1.0, mark) == 1.0


def test_a_refund_raises_only_the_history_after_its_own_mark():
    b = TokenBucket(1.0, 10.0, 10.0, 0.0)
    first = b.take(0.0, 4.0)  # 6
    second = b.take(2.0, 4.0)  # 8, then 4
    assert b.refund(2.0, 4.0, second) == 4.0
    # the 8 at t=2 came before `second`: `first` may still give back 2 (a provider that saw
    # neither call is full at 10)
    assert b.refund(2.0, 4.0, first) == 2.0
    assert b.advance(2.0) == 10.0


def test_limit_lowers_the_level_and_never_raises_it():
    b = TokenBucket(1.0, 10.0, 4.0, 0.0)
    b.limit(2.0, 7.0)  # 6 at t=2, below 7: unchanged
    assert b.advance(2.0) == 6.0
    mark = b.take(2.0, 0.0)
    b.limit(2.0, 6.0)  # equal: unchanged, no mutation
    assert b.take(2.0, 0.0) == mark + 1
    b.limit(3.0, 1.5)
    assert b.advance(3.0) == 1.5
    assert b.take(3.0, 0.0) == mark + 3  # the lowering was a mutation


def test_a_limit_after_a_take_caps_what_a_refund_of_it_can_give_back():
    b = TokenBucket(1.0, 10.0, 10.0, 0.0)
    mark = b.take(0.0, 4.0)  # 6
    b.limit(0.0, 2.0)  # the provider says 2 are left
    assert b.refund(0.0, 4.0, mark) == 4.0  # headroom was at least 4 throughout
    assert b.advance(0.0) == 6.0


@pytest.mark.parametrize("rate, capacity", [(0.0, None), (-1.0, None), (1.0, 0.0), (1.0, -1.0)])
def test_set_rate_refuses_a_rate_or_capacity_that_is_not_positive(rate, capacity):
    b = TokenBucket(1.0, 10.0, 0.0, 0.0)
    with pytest.raises(ValueError, match=r"^bucket rate and capacity must be > 0$"):
        b.set_rate(1.0, rate, capacity)
    assert (b.rate, b.capacity) == (1.0, 10.0)


def test_set_rate_keeps_what_accrued_at_the_old_rate_and_refills_at_the_new_one():
    b = TokenBucket(1.0, 10.0, 0.0, 0.0)
    b.set_rate(2.0, 3.0)  # 2 accrued at 1/s
    assert (b.rate, b.capacity) == (3.0, 10.0)
    assert b.advance(2.0) == 2.0
    assert b.advance(3.0) == 5.0
    assert b.ready_at(2.0, 8.0) == 4.0


def test_a_smaller_capacity_cuts_the_level_and_a_larger_one_only_leaves_room():
    b = TokenBucket(1.0, 10.0, 8.0, 0.0)
    mark = b.take(0.0, 0.0)
    b.set_rate(0.0, 1.0, 5.0)
    assert (b.capacity, b.advance(0.0)) == (5.0, 5.0)
    assert b.take(0.0, 0.0) == mark + 2  # the cut was a mutation
    b.set_rate(0.0, 1.0, 20.0)
    assert (b.capacity, b.advance(0.0), b.advance(10.0)) == (20.0, 5.0, 15.0)
    b.set_rate(0.0, 1.0, 20.0)  # the same capacity: no mutation
    assert b.take(0.0, 0.0) == mark + 4


def test_a_refund_after_a_capacity_cut_counts_the_cut_as_refilled():
    b = TokenBucket(1.0, 10.0, 10.0, 0.0)
    mark = b.take(0.0, 4.0)  # 6 of 10
    b.set_rate(0.0, 1.0, 6.0)  # 6 of 6: full under the new capacity
    assert b.refund(0.0, 4.0, mark) == 0.0
    assert b.advance(0.0) == 6.0
