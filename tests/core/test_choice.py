"""Key choice, pool fallback, upstream filtering and Reject decisions."""

from __future__ import annotations

import pytest
from core_helpers import dispatch, job, key, make, pool

from ratefleet.dispatcher.core import LOOKAHEAD, Idle, Outcome, Reject, WaitUntil

t0, t1, t2, t3, t4, t5, t6, t7, t8, t9 = 0.0, 0.1, 0.5, 1.0, 2.0, 5.0, 10.0, 20.0, 50.0, 100.0


def two_pools(**a_kw):
    return make(
        pool("a", key("a1", pool="a", rps=1, burst=2, **a_kw)),
        pool("b", key("b1", pool="b", rps=1, burst=2)),
        fail_max=1, reset_s=30.0,
    )


def fill(s, n, **kw):
    for _ in range(n):
        s.add(job(**kw), t0)


def test_first_pool_until_exhausted_then_next():
    s = two_pools()
    fill(s, 6)
    assert [dispatch(s, t0).key_id for _ in range(4)] == ["a1", "a1", "b1", "b1"]
    assert s.next(t0) == WaitUntil(t3)
    assert dispatch(s, t3).key_id == "a1"  # the first pool again as soon as it refills


@pytest.mark.parametrize(
    "blocker",
    [
        Outcome("rate_limited", 429, retry_after_s=60.0),  # cooling
        Outcome("upstream_error", 500),  # breaker open (fail_max=1)
        Outcome("key_error", 401),  # disabled
    ],
)
def test_fallback_when_first_pool_is_unusable(blocker):
    s = two_pools()
    fill(s, 3)
    s.complete(dispatch(s, t0).reservation, blocker, t0)
    assert dispatch(s, t5).key_id == "b1"
    assert dispatch(s, t5).key_id == "b1"


def test_fallback_when_first_pool_is_at_concurrency():
    s = two_pools(concurrency=1)
    fill(s, 3)
    assert [dispatch(s, t0).key_id for _ in range(2)] == ["a1", "b1"]


def test_pools_of_other_upstreams_are_skipped():
    s = make(
        pool("x", key("x1", pool="x", upstream="other"), upstream="other"),
        pool("a", key("a1", pool="a")),
        chains={"normal": ("x", "a")},
    )
    s.add(job(upstream="u"), t0)
    s.add(job(upstream="other"), t0)
    assert dispatch(s, t0).key_id == "a1"
    assert dispatch(s, t0).key_id == "x1"


def test_key_with_most_tokens_relative_to_capacity_wins():
    s = make(pool("p", key("k1", rps=1, burst=4), key("k2", rps=1, burst=2), key("k3", rps=1, burst=4)))
    fill(s, 5)
    # ratio of tokens to capacity first; equal ratios fall back to config order
    picks = [dispatch(s, t0).key_id for _ in range(5)]
    assert picks == ["k1", "k2", "k3", "k1", "k3"]


def test_equal_tokens_prefer_fewest_in_flight():
    s = make(pool("p", key("k1"), key("k2")))
    s.adopt_in_flight("k1", 1, t0)  # in flight without spending this leader's tokens
    fill(s, 1)
    assert dispatch(s, t0).key_id == "k2"


def test_lookahead_lets_other_upstreams_pass_a_blocked_job():
    s = make(pool("a", key("a1", pool="a", rps=1, burst=1)),
             pool("y", key("y1", pool="y", upstream="v", rps=1, burst=1), upstream="v"))
    first, second, other = job(job_id="u1"), job(job_id="u2"), job(upstream="v", job_id="v1")
    for j in (first, second, other):
        s.add(j, t0)
    assert dispatch(s, t0).job == first
    assert dispatch(s, t0).job == other  # u2 is blocked, v1 behind it is not
    assert s.next(t0) == WaitUntil(t3)


def test_small_job_does_not_overtake_a_big_one_of_its_upstream():
    s = make(pool("p", key("k1", rps=100, burst=10, cost_per_minute=60)))
    s.add(job(cost=50, job_id="big1"), t0)
    s.add(job(cost=50, job_id="big2"), t0)
    s.add(job(cost=1, job_id="small"), t0)
    assert dispatch(s, t0).job.job_id == "big1"
    assert s.next(t0) == WaitUntil(40.0)  # small waits behind big2 (no starvation)
    assert dispatch(s, 40.0).job.job_id == "big2"


def test_lookahead_is_bounded():
    s = make(pool("a", key("a1", pool="a", rps=1, burst=1)),
             pool("y", key("y1", pool="y", upstream="v"), upstream="v"))
    fill(s, LOOKAHEAD + 1)
    s.add(job(upstream="v"), t0)
    dispatch(s, t0)
    assert isinstance(s.next(t0), WaitUntil)  # the v job is the 17th after the first went


def test_reject_when_tier_has_no_pool_for_the_upstream():
    s = make(pool("a", key("a1", pool="a")))
    s.add(job(upstream="nowhere", tier="vip"), t0)
    reject = s.next(t0)
    assert isinstance(reject, Reject) and reject.code == "no_key_available"
    assert "no pool for upstream 'nowhere'" in reject.message and "tiers.vip.pools" in reject.message
    assert s.next(t0) == Idle() and s.pending("vip") == 0


def test_reject_when_cost_exceeds_every_key():
    s = make(pool("p", key("k1", cost_per_minute=100), key("k2", cost_per_minute=300)))
    s.add(job(cost=301), t0)
    s.add(job(cost=250), t0)
    reject = s.next(t0)
    assert isinstance(reject, Reject)
    assert "largest: 300" in reject.message and "cost_per_minute" in reject.message
    d = dispatch(s, t0)
    assert d.key_id == "k2"  # k1 cannot ever hold 250


def test_reject_does_not_wait_for_the_queue_head():
    s = make(pool("p", key("k1", rps=1, burst=1)))
    s.add(job(), t0)
    s.add(job(), t0)
    s.add(job(upstream="nowhere"), t0)
    dispatch(s, t0)
    assert isinstance(s.next(t0), Reject)
    assert s.next(t0) == WaitUntil(t3)
