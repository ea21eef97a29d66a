"""TokenBucket and request-bucket behaviour, as tables over named instants (no sleeping)."""

from __future__ import annotations

import math

import pytest
from core_helpers import dispatch, job, key, make, pool
from hypothesis import given, settings
from hypothesis import strategies as st

from ratefleet.dispatcher.core import Dispatch, TokenBucket, WaitUntil

t0, t1, t2, t3, t4, t5, t6, t7, t8, t9 = 0.0, 0.25, 0.5, 0.75, 1.0, 1.5, 2.0, 3.0, 10.0, 100.0


@pytest.mark.parametrize(
    "name, ops, level_at, expected",
    [
        ("starts full", [], t0, 4.0),
        ("take spends", [("take", t0, 3)], t0, 1.0),
        ("refills at rate", [("take", t0, 4)], t1, 0.5),
        ("refill capped", [("take", t0, 4)], t9, 4.0),
        ("may go into debt", [("take", t0, 6)], t0, -2.0),
        ("debt refills too", [("take", t0, 6)], t4, 0.0),
        ("earlier now is the last now", [("take", t2, 4), ("take", t0, 0)], t2, 0.0),
        ("refund before refill", [("take", t0, 4), ("refund", t1, 4, 1)], t1, 4.0),
        ("refund after refill to cap adds nothing", [("take", t0, 4), ("refund", t8, 4, 1)], t8, 4.0),
        ("refund limited by peak since take",
         [("take", t0, 4), ("take", t6, 2), ("refund", t6, 4, 1)], t6, 2.0),
        ("limit lowers", [("limit", t0, 1.5)], t0, 1.5),
        ("limit never raises", [("take", t0, 4), ("limit", t0, 3)], t0, 0.0),
    ],
)
def test_bucket_table(name, ops, level_at, expected):
    bucket = TokenBucket(rate=2.0, capacity=4.0, tokens=4.0, now=t0)
    for op, at, amount, *mark in ops:
        if op == "take":
            bucket.take(at, amount)
        elif op == "refund":
            bucket.refund(at, amount, mark[0])
        else:
            bucket.limit(at, amount)
    assert bucket.advance(level_at) == pytest.approx(expected)


@pytest.mark.parametrize(
    "tokens, n, expected",
    [(4.0, 1, t0), (0.0, 1, t2), (0.5, 1, t1), (-2.0, 1, t5), (0.0, 4, t6), (4.0, 5, math.inf)],
)
def test_ready_at(tokens, n, expected):
    bucket = TokenBucket(rate=2.0, capacity=4.0, tokens=tokens, now=t0)
    assert bucket.ready_at(t0, n) == pytest.approx(expected)


def test_advance_changes_nothing():
    bucket = TokenBucket(rate=2.0, capacity=4.0, tokens=0.0, now=t0)
    assert bucket.advance(t4) == 2.0
    assert bucket.advance(t1) == 0.5


def test_request_bucket_refill_and_burst_cap():
    s = make(pool("p", key("k1", rps=2, burst=3)))
    for _ in range(5):
        s.add(job(), t0)
    for _ in range(3):
        dispatch(s, t0)
    assert s.next(t0) == WaitUntil(t2)
    assert s.next(t1) == WaitUntil(t2)
    dispatch(s, t2)
    for _ in range(5):
        s.add(job(), t9)
    for _ in range(3):  # a long pause refills to burst, never beyond
        dispatch(s, t9)
    assert s.next(t9) == WaitUntil(t9 + 0.5)


@pytest.mark.parametrize(
    "rps, burst, capacity",
    [(10, 5, 4.5), (100, 2, 1.0), (1, 1, 1.0), (20, 10, 9.0)],
)
def test_safety_margin_keeps_last_tokens(rps, burst, capacity):
    s = make(pool("p", key("k1", rps=rps, burst=burst)), safety_s=0.05)
    assert s.snapshot(t0)["keys"]["k1"]["tokens"] == capacity
    for _ in range(int(capacity) + 1):
        s.add(job(), t0)
    for _ in range(int(capacity)):
        dispatch(s, t0)
    wait = s.next(t0)
    assert isinstance(wait, WaitUntil)
    assert wait.at == pytest.approx((1 - (capacity - int(capacity))) / rps)


def test_cancel_gives_token_back_and_requeues_at_head():
    s = make(pool("p", key("k1", rps=1, burst=1)))
    first, second = job(job_id="first"), job(job_id="second")
    s.add(first, t0)
    s.add(second, t0)
    d = dispatch(s, t0)
    assert d.job == first and s.in_flight("normal") == 1
    s.cancel(d.reservation, t1)
    assert s.pending("normal") == 2 and s.in_flight("normal") == 0
    again = dispatch(s, t1)  # the token came back, the job is at the head
    assert again.job == first
    s.cancel(d.reservation, t1)  # cancelling twice does nothing
    assert s.pending("normal") == 1


def test_cancel_after_refill_does_not_create_extra_tokens():
    s = make(pool("p", key("k1", rps=1, burst=1)))
    for _ in range(3):
        s.add(job(), t0)
    old = dispatch(s, t0)
    dispatch(s, t4)  # refilled: a second call at t4
    s.cancel(old.reservation, t4)  # the bucket was full meanwhile: nothing to give back
    assert s.next(t4) == WaitUntil(t6)


def test_time_never_goes_backwards():
    s = make(pool("p", key("k1", rps=1, burst=1)))
    s.add(job(), t0)
    s.add(job(), t0)
    dispatch(s, t4)
    assert s.next(t0) == WaitUntil(t6)  # t0 < t4 counts as t4
    assert isinstance(s.next(t6), Dispatch)


def provider_level(takes: list[tuple[float, float]], now: float, rate: float, capacity: float) -> float:
    """A provider's bucket that only ever saw the actual costs, replayed from the start."""
    level, last = capacity, takes[0][0] if takes else now
    for at, cost in takes:
        level = min(capacity, level + (at - last) * rate) - cost
        last = at
    return min(capacity, level + (now - last) * rate)


@settings(max_examples=300, deadline=None)
@given(
    rate=st.floats(0.5, 20), capacity=st.floats(1, 10),
    steps=st.lists(st.tuples(st.floats(0, 1), st.floats(0.1, 1), st.floats(0, 1), st.integers(0, 3)),
                   min_size=1, max_size=60),
)
def test_refunds_never_beat_a_provider_that_saw_actual_costs(rate, capacity, steps):
    """Holding tokens and giving back the unused part (or all, on cancel) is always safe."""
    bucket = TokenBucket(rate, capacity, capacity, 1000.0)
    now, takes, open_ = 1000.0, [], []
    for dt, size, used, settle in steps:
        now = max(now + dt, bucket.ready_at(now + dt, size * capacity))
        assert bucket.advance(now) <= provider_level(takes, now, rate, capacity) + 1e-9
        estimate = size * capacity
        open_.append((bucket.take(now, estimate), estimate, estimate * used))
        takes.append((now, estimate * used))
        for _ in range(min(settle, len(open_))):
            mark, estimate, actual = open_.pop(settle % len(open_))
            bucket.refund(now, estimate - actual, mark)
            assert bucket.advance(now) <= provider_level(takes, now, rate, capacity) + 1e-9
