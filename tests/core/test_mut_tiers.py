"""Tier queues and their order (dispatcher/core/tiers.py) at exact values: each tier's stride
(lcm of the weights / its weight, exact integers), which tier is offered the next key under
"weighted" (lowest pass, ties to the higher priority) and "strict" (priority order), a tier's
fair start when its queue fills again, the counters of a dispatch and its undo, and the
refusals of a bad tier list. A wrong value here gives a tier the wrong share or order."""

from __future__ import annotations

import math

import pytest

from ratefleet.dispatcher.core.tiers import TierBook
from ratefleet.dispatcher.core.types import PendingJob, TierSpec


def book(*weights: tuple[str, int], policy: str = "weighted") -> TierBook:
    return TierBook(tuple(TierSpec(name, weight, ("p",)) for name, weight in weights), policy)  # type: ignore[arg-type]


def pending(tier: str, n: int = 1) -> list[PendingJob]:
    return [PendingJob(f"{tier}-{i}", tier, "u") for i in range(n)]


def fill(tiers: TierBook, **counts: int) -> None:
    for name, n in counts.items():
        for job in pending(name, n):
            tiers.push(tiers.get(name), job)


@pytest.mark.parametrize("weights, strides", [
    ((8, 4, 2, 1), (1, 2, 4, 8)),
    ((3, 2), (2, 3)),
    ((1,), (1,)),
    ((6, 4, 1), (2, 3, 12)),
])
def test_each_tier_s_stride_is_the_lcm_over_its_weight_and_ranks_follow_the_list(weights, strides):
    tiers = book(*((f"t{i}", w) for i, w in enumerate(weights)))
    assert [(t.name, t.rank, t.stride) for t in tiers] == [(f"t{i}", i, s) for i, s in enumerate(strides)]
    assert all((t.in_flight, t.dispatched, len(t.jobs)) == (0, 0, 0) for t in tiers)


def test_strides_stay_exact_integers_past_float_precision():
    primes = (2, 3, 5, 7, 11, 13, 17, 19, 23, 29, 31, 37, 41, 43, 47, 53)
    scale = math.prod(primes)
    assert scale > 2 ** 53
    tiers = book(*((f"p{w}", w) for w in primes))
    assert [t.stride for t in tiers] == [scale // w for w in primes]
    assert all(type(t.stride) is int for t in tiers)


@pytest.mark.parametrize("policy", ["weighted", "strict"])
def test_both_policies_are_accepted(policy):
    assert book(("a", 1), policy=policy).policy == policy


@pytest.mark.parametrize("weights, policy, match", [
    ((("a", 1),), "fair", "unknown tier policy 'fair'"),
    ((("a", 1),), "Weighted", "unknown tier policy"),
    ((("a", 2), ("b", 0)), "weighted", "tier 'b': weight must be"),
    ((("a", -1),), "strict", "tier 'a': weight must be"),
    ((("a", 2), ("a", 1)), "weighted", "unique"),
])
def test_a_bad_tier_list_is_refused(weights, policy, match):
    with pytest.raises(ValueError, match=match):
        book(*weights, policy=policy)


def test_an_unknown_tier_names_the_configured_ones():
    tiers = book(("vip", 2), ("normal", 1))
    assert tiers.get("vip").name == "vip" and tiers.find("normal") is tiers.get("normal")
    assert tiers.find("gold") is None
    with pytest.raises(ValueError, match=r"unknown tier 'gold' \(configured: vip, normal\)"):
        tiers.get("gold")
    with pytest.raises(ValueError, match=r"unknown tier 'gold' \(configured: none\)"):
        book().get("gold")


def test_weighted_offers_the_lowest_pass_first_and_ties_go_to_the_higher_tier():
    tiers = book(("vip", 2), ("normal", 1))  # strides 1 and 2
    fill(tiers, vip=10, normal=10)
    order = []
    for _ in range(9):
        first = tiers.in_order()[0]
        order.append(first.name)
        first.jobs.popleft()
        tiers.charge(first)
    assert order == ["vip", "normal", "vip", "vip", "normal", "vip", "vip", "normal", "vip"]
    assert [(t.name, t.pass_value) for t in tiers] == [("vip", 6), ("normal", 6)]


def test_strict_offers_the_highest_tier_first_whatever_its_pass():
    tiers = book(("vip", 1), ("normal", 1), ("guest", 1), policy="strict")
    fill(tiers, guest=1, normal=1)
    assert [t.name for t in tiers.in_order()] == ["normal", "guest"]
    for _ in range(3):
        tiers.charge(tiers.get("normal"))
    fill(tiers, vip=1)
    assert [t.name for t in tiers.in_order()] == ["vip", "normal", "guest"]
    weighted = book(("vip", 1), ("normal", 1), ("guest", 1))
    fill(weighted, vip=1, normal=1, guest=1)
    weighted.charge(weighted.get("vip"))
    assert [t.name for t in weighted.in_order()] == ["normal", "guest", "vip"]


def test_empty_tiers_are_not_offered():
    tiers = book(("vip", 1), ("normal", 1))
    assert tiers.in_order() == []
    fill(tiers, normal=1)
    assert [t.name for t in tiers.in_order()] == ["normal"]


def test_a_tier_that_fills_again_starts_at_the_lowest_busy_pass_not_below():
    tiers = book(("vip", 1), ("normal", 1), ("guest", 1))
    fill(tiers, normal=1, guest=1)
    normal, guest, vip = tiers.get("normal"), tiers.get("guest"), tiers.get("vip")
    for _ in range(5):
        tiers.charge(normal)
    for _ in range(3):
        tiers.charge(guest)
    fill(tiers, vip=1)  # idle time is not banked: vip starts at min(5, 3) = 3
    assert vip.pass_value == 3
    fill(tiers, vip=1)  # already queued: no restart
    for _ in range(9):
        tiers.charge(vip)
    assert vip.pass_value == 12
    vip.jobs.clear()
    fill(tiers, vip=1)  # ahead of the others already: keeps its own pass
    assert vip.pass_value == 12
    guest.jobs.clear()
    tiers.charge(normal)  # normal at 6, vip at 12: guest starts at 6
    fill(tiers, guest=1)
    assert guest.pass_value == 6
    idle = book(("a", 1), ("b", 1), ("c", 1))  # c never had a job: its pass 0 is not a busy one
    fill(idle, b=1)
    for _ in range(4):
        idle.charge(idle.get("b"))
    fill(idle, a=1)
    assert idle.get("a").pass_value == 4
    fresh = book(("a", 1), ("b", 1))
    fresh.charge(fresh.get("a"))
    fill(fresh, a=1)  # no other tier busy: its own pass stays
    assert fresh.get("a").pass_value == 1


def test_push_keeps_fifo_order_and_front_puts_a_job_first():
    tiers = book(("normal", 1))
    normal = tiers.get("normal")
    first, second, returned = PendingJob("j1", "normal", "u"), PendingJob("j2", "normal", "u"), PendingJob("j0", "normal", "u")
    tiers.push(normal, first)
    tiers.push(normal, second)
    tiers.push(normal, returned, front=True)
    assert [j.job_id for j in normal.jobs] == ["j0", "j1", "j2"]


def test_charge_and_uncharge_move_pass_in_flight_and_dispatched_by_one_dispatch():
    tiers = book(("vip", 3), ("normal", 1))  # strides 1 and 3
    normal = tiers.get("normal")
    for _ in range(3):
        tiers.charge(normal)
    assert (normal.pass_value, normal.in_flight, normal.dispatched) == (9, 3, 3)
    tiers.uncharge(normal)
    assert (normal.pass_value, normal.in_flight, normal.dispatched) == (6, 2, 2)
    assert (tiers.get("vip").pass_value, tiers.get("vip").in_flight) == (0, 0)


def test_drain_returns_every_queued_job_highest_tier_first_and_empties_the_queues():
    tiers = book(("vip", 1), ("normal", 1), ("guest", 1))
    fill(tiers, guest=2, vip=1, normal=1)
    assert [j.job_id for j in tiers.drain()] == ["vip-0", "normal-0", "guest-0", "guest-1"]
    assert tiers.in_order() == [] and tiers.drain() == []
