"""Priority reserve: lower tiers leave a token per key while the top tier has nothing queued."""

from __future__ import annotations

from collections import Counter

from core_helpers import dispatch, job, key, make, pool

from ratefleet.dispatcher.core import Dispatch, Outcome, WaitUntil

t0, t1, t2, t3 = 0.0, 0.1, 0.2, 0.3


def reserved(rps=10.0, burst=3.0, reserve=1.0):
    return make(pool("p", key("k1", rps=rps, burst=burst)), priority_reserve=reserve)


def test_guest_leaves_one_token_and_a_vip_arriving_later_runs_at_once():
    s = reserved()
    for _ in range(100):
        s.add(job("guest"), t0)
    assert [dispatch(s, t0).job.tier for _ in range(2)] == ["guest", "guest"]  # 3 tokens: 2 spent, 1 kept
    assert s.next(t0) == WaitUntil(0.1)  # guest waits for the token after the reserve
    s.add(job("vip", job_id="urgent"), t0 + 0.01)
    assert dispatch(s, t0 + 0.01).job.job_id == "urgent"  # no wait for a refill


def test_steady_state_throughput_is_unchanged():
    plain, kept = reserved(reserve=0.0), reserved()
    for s in (plain, kept):
        for _ in range(500):
            s.add(job("guest"), t0)
    def run(s):
        now, count = t0, 0
        while now < 10.0:
            decision = s.next(now)
            if isinstance(decision, Dispatch):
                count += 1
                s.complete(decision.reservation, Outcome("ok"), now)
            else:
                now = decision.at
        return count
    # over 10 s both spend rps*10; the reserve only shifts the bucket level by one token
    assert abs(run(plain) - run(kept)) <= 1


def test_reserve_lapses_while_the_top_tier_has_a_backlog_so_shares_hold():
    s = make(pool("p", key("k1", rps=1, burst=3)), tiers=(("vip", 2), ("guest", 1)), priority_reserve=1.0)
    for name in ("vip", "guest"):
        for _ in range(300):
            s.add(job(name), t0)
    picks = Counter(dispatch(s, float(i)).job.tier for i in range(3, 303))
    assert picks["vip"] == 200 and picks["guest"] == 100


def test_keys_too_small_for_a_reserve_are_used_fully():
    s = reserved(burst=1.0)
    s.add(job("guest"), t0)
    assert dispatch(s, t0).job.tier == "guest"


def test_lost_outcome_frees_the_slot_and_counts_nothing():
    s = make(pool("p", key("k1", rps=100, burst=10, concurrency=1)))
    s.add(job("normal"), t0)
    s.add(job("normal"), t0)
    first = dispatch(s, t0)
    assert not isinstance(s.next(t0), Dispatch)  # concurrency 1
    s.complete(first.reservation, Outcome("lost"), t1)
    dispatch(s, t1)
    snap = s.snapshot(t1)["keys"]["k1"]
    assert (snap["calls"], snap["errors"], snap["breaker"]) == (0, 0, "closed")


# -- worker slots ----------------------------------------------------------------------------


def slotted(slots_reserve=1):
    return make(pool("p", key("k1", rps=1000.0, burst=100.0)), priority_slots=slots_reserve)


def test_lower_tiers_leave_the_last_slot_for_the_top_tier():
    """Slow bulk calls filled every worker slot, so a vip job waited for a call to end; calls
    started together end together (a whole call's length: 2.3 s with 4 s calls in a trial)."""
    s = slotted()
    for _ in range(10):
        s.add(job("guest"), t0)
    assert isinstance(s.next(t0, free_slots=2, total_slots=16), Dispatch)
    assert not isinstance(s.next(t0, free_slots=1, total_slots=16), Dispatch)  # the last slot is kept
    s.add(job("vip", job_id="urgent"), t1)
    assert dispatch_with(s, t1, free_slots=1, total_slots=16).job.job_id == "urgent"  # at once, in the kept slot


def test_the_slot_reserve_is_at_most_one_slot_in_eight_and_zero_turns_it_off():
    s = slotted(slots_reserve=3)
    for _ in range(10):
        s.add(job("guest"), t0)
    assert s.reserved_slots(7) == 0 and s.reserved_slots(8) == 1 and s.reserved_slots(64) == 3
    assert isinstance(s.next(t0, free_slots=1, total_slots=7), Dispatch)  # a small fleet keeps every slot busy
    assert not isinstance(s.next(t0, free_slots=2, total_slots=16), Dispatch)  # 16 slots: 2 kept
    off = slotted(slots_reserve=0)
    off.add(job("guest"), t0)
    assert isinstance(off.next(t0, free_slots=1, total_slots=64), Dispatch)
    plain = slotted()
    plain.add(job("guest"), t0)
    assert isinstance(plain.next(t0), Dispatch)  # slots not given: no reserve


def dispatch_with(s, now, **slots):
    decision = s.next(now, **slots)
    assert isinstance(decision, Dispatch), decision
    return decision
