"""Tier ordering: weighted (stride) shares, no banked credit, strict priority."""

from __future__ import annotations

from collections import Counter

import pytest
from core_helpers import dispatch, job, key, make, pool

from ratefleet.dispatcher.core import Dispatch, WaitUntil

t0, t1, t2 = 0.0, 1.0, 2.0


def single_key(**kw):
    return make(pool("p", key("k1", rps=1, burst=1)), **kw)


def test_vip_behind_a_guest_backlog_gets_the_next_token():
    s = single_key()
    for _ in range(1000):
        s.add(job("guest"), t0)
    now = t0
    for _ in range(50):
        dispatch(s, now)
        now += 1.0
    s.add(job("vip", job_id="urgent"), now - 0.5)
    assert dispatch(s, now).job.job_id == "urgent"


def test_idle_tier_does_not_bank_credit():
    s = single_key(tiers=(("vip", 8), ("guest", 1)))
    for _ in range(200):
        s.add(job("guest"), t0)
    for i in range(100):  # vip idle for 100 dispatches
        dispatch(s, float(i))
    for _ in range(100):
        s.add(job("vip"), 100.0)
    picks = Counter(dispatch(s, 100.0 + i).job.tier for i in range(90))
    assert picks["guest"] == pytest.approx(10, abs=1)  # 8:1 from the moment vip arrives


@pytest.mark.parametrize("weights", [(8, 1), (4, 2), (3, 2), (2, 1, 1)])
def test_weighted_shares(weights):
    names = tuple(f"t{i}" for i in range(len(weights)))
    s = single_key(tiers=tuple(zip(names, weights)))
    for name in names:
        for _ in range(2000):
            s.add(job(name), t0)
    rounds = 60 * sum(weights)
    picks = Counter(dispatch(s, float(i)).job.tier for i in range(rounds))
    assert [picks[n] for n in names] == [60 * w for w in weights]


def test_strict_serves_the_highest_tier_first():
    s = single_key(policy="strict")
    for tier in ("guest", "normal", "vip", "premium"):
        for _ in range(3):
            s.add(job(tier), t0)
    order = [dispatch(s, float(i)).job.tier for i in range(12)]
    assert order == ["vip"] * 3 + ["premium"] * 3 + ["normal"] * 3 + ["guest"] * 3


def test_blocked_higher_tier_does_not_stop_lower_tiers():
    s = make(
        pool("a", key("a1", pool="a", rps=1, burst=1)),
        pool("b", key("b1", pool="b", rps=1, burst=1)),
        policy="strict",
        chains={"vip": ("a",), "guest": ("b",)},
    )
    for tier in ("vip", "vip", "guest"):
        s.add(job(tier), t0)
    assert [dispatch(s, t0).job.tier for _ in range(2)] == ["vip", "guest"]
    assert s.next(t0) == WaitUntil(t1)


def test_cancel_refunds_the_tier_share():
    s = single_key(tiers=(("vip", 1), ("guest", 1)))
    s.add(job("vip"), t0)
    s.add(job("guest"), t0)
    d = dispatch(s, t0)
    assert d.job.tier == "vip"
    s.cancel(d.reservation, t0)
    assert dispatch(s, t0).job.tier == "vip"  # the cancelled dispatch did not use its turn
    assert isinstance(s.next(t2), Dispatch)
