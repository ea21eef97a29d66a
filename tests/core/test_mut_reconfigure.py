"""A live config change of the scheduler (dispatcher/core/reconfigure.py), rule by rule: new
limits keep the bucket level (request and cost buckets, the safety margin applied), a key
added starts like a key at leader start under the new spec's policies, a removed key's calls
finish and it is then forgotten, tiers carry queues and counters over, a removed tier's
queued jobs come back, and a spec `Scheduler(spec)` would refuse changes nothing."""

from __future__ import annotations

import pytest
from core_helpers import job, key, make, pool

from ratefleet.dispatcher.core import (
    BreakerPolicy,
    CooldownPolicy,
    Dispatch,
    Outcome,
    PoolSpec,
    ProbePolicy,
    Scheduler,
    SchedulerSpec,
    TierSpec,
)
from ratefleet.dispatcher.core.adaptive import AdaptPolicy
from ratefleet.dispatcher.core.key import KeyState
from ratefleet.dispatcher.core.reconfigure import checked_keys, relimit
from ratefleet.dispatcher.core.split import SplitSpec
from ratefleet.dispatcher.core.types import KeySpec

OK = Outcome(kind="ok", status=200)  # type: ignore[arg-type]
ERROR = Outcome(kind="upstream_error", status=500)  # type: ignore[arg-type]
THROTTLED = Outcome(kind="rate_limited", status=429)  # type: ignore[arg-type]
KEY_ERROR = Outcome(kind="key_error", status=401, code="invalid_api_key")  # type: ignore[arg-type]
TIERS = (("vip", 2), ("normal", 1))


def spec_of(*pools: PoolSpec, tiers=TIERS, chains=None, **kw) -> SchedulerSpec:
    names = tuple(p.name for p in pools)
    chains = chains or {}
    kw.setdefault("safety_s", 0.0)
    return SchedulerSpec(pools=pools, tiers=tuple(TierSpec(n, w, chains.get(n, names)) for n, w in tiers), **kw)


def state(spec: KeySpec, safety_s: float = 0.0, now: float = 0.0) -> KeyState:
    return KeyState(spec, safety_s=safety_s, breaker=BreakerPolicy(), cooldown=CooldownPolicy(), now=now,
                    conservative=False, adapt=AdaptPolicy(enabled=False))


def run(s: Scheduler, tier: str, n: int, now: float) -> list[Dispatch]:
    for _ in range(n):
        s.add(job(tier), now)
    out = []
    while isinstance(d := s.next(now), Dispatch):
        out.append(d)
    return out


def view(s: Scheduler, key_id: str, now: float) -> dict:
    return s.snapshot(now)["keys"][key_id]


# -- relimit: new limits on a live key ----------------------------------------------------------

def test_new_limits_take_the_safety_margin_and_the_new_rate():
    k = state(key("k1", rps=2.0, burst=10.0), safety_s=0.5)  # capacity 10 - 0.5*2 = 9
    assert k.requests.capacity == pytest.approx(9.0)
    relimit(k, key("k1", rps=4.0, burst=6.0), 1.0)
    assert k.spec.rps == 4.0 and k.requests.rate == pytest.approx(4.0)
    assert k.requests.capacity == pytest.approx(4.0)  # 6 - 0.5*4
    assert k.requests.advance(1.0) == pytest.approx(4.0)  # the level cut to the smaller burst, not refilled


def test_new_limits_never_leave_a_burst_below_one():
    k = state(key("k1", rps=2.0, burst=10.0), safety_s=0.5)
    relimit(k, key("k1", rps=3.0, burst=1.2), 0.0)  # 1.2 - 1.5 < 1
    assert k.requests.capacity == pytest.approx(1.0)


def test_a_larger_burst_leaves_room_but_adds_no_token():
    k = state(key("k1", rps=1.0, burst=4.0))
    for _ in range(4):
        k.requests.take(0.0, 1.0)
    relimit(k, key("k1", rps=2.0, burst=8.0), 1.0)
    assert k.requests.capacity == pytest.approx(8.0)
    assert k.requests.advance(1.0) == pytest.approx(1.0)  # 1 s at the old 1/s
    assert k.requests.advance(2.0) == pytest.approx(3.0)  # then 2/s


def test_a_new_cost_limit_starts_empty_and_refills_at_its_rate():
    k = state(key("k1"))
    assert k.cost is None
    relimit(k, key("k1", cost_per_minute=600.0), 5.0)
    assert k.cost is not None and k.cost_rate is not None
    assert (k.cost.rate, k.cost.capacity) == (pytest.approx(10.0), pytest.approx(600.0))
    assert k.cost.advance(5.0) == pytest.approx(0.0)  # what it spent in the last minute is not known
    assert k.cost.advance(8.0) == pytest.approx(30.0)
    assert k.cost_rate.rate == pytest.approx(10.0) and k.cost_rate.configured == pytest.approx(10.0)
    assert k.cost_rate.policy is k.request_rate.policy


def test_a_changed_cost_limit_keeps_the_level():
    k = state(key("k1", cost_per_minute=600.0))
    k.cost.take(0.0, 500.0)  # 100 left
    relimit(k, key("k1", cost_per_minute=120.0), 0.0)
    assert (k.cost.rate, k.cost.capacity) == (pytest.approx(2.0), pytest.approx(120.0))
    assert k.cost.advance(0.0) == pytest.approx(100.0) and k.cost.advance(5.0) == pytest.approx(110.0)
    assert k.cost_rate.configured == pytest.approx(2.0)
    relimit(k, key("k1", cost_per_minute=1200.0), 5.0)
    assert k.cost.advance(5.0) == pytest.approx(110.0) and k.cost.capacity == pytest.approx(1200.0)
    assert k.cost.rate == pytest.approx(20.0)


def test_a_dropped_cost_limit_stops_counting():
    k = state(key("k1", cost_per_minute=600.0))
    relimit(k, key("k1"), 0.0)
    assert k.cost is None and k.cost_rate is None and k.cost_capacity == float("inf")


# -- keys through Scheduler.reconfigure ---------------------------------------------------------

def test_a_key_added_follows_the_new_specs_policies_like_a_key_at_leader_start():
    """The module's rule: "Breaker, cooldown, probe, adapt and safety policies apply to keys
    added from now on". A key added by a reload behaves as the same key of a scheduler built
    from the new spec."""
    old = spec_of(pool("p", key("k1", rps=2.0, burst=5.0)), chains={"vip": ("p",), "normal": ("p",)})
    new_pools = (pool("p", key("k1", rps=2.0, burst=5.0)), pool("q", key("k2", pool="q", rps=2.0, burst=5.0)))
    policies = dict(breaker=BreakerPolicy(fail_max=1, reset_timeout_s=7.0), cooldown=CooldownPolicy(4.0, 40.0),
                    probe=ProbePolicy(9.0, 90.0), safety_s=0.5, adapt=AdaptPolicy(enabled=False))
    new = spec_of(*new_pools, chains={"vip": ("q",), "normal": ("p",)}, **policies)
    reloaded = Scheduler(old, 0.0)
    reloaded.reconfigure(new, 3.0)
    fresh = Scheduler(new, 3.0)
    for s in (reloaded, fresh):
        assert view(s, "k2", 3.0)["burst"] == pytest.approx(4.0)  # 5 - 0.5*2
        first = run(s, "vip", 1, 3.0)
        s.complete(first[0].reservation, ERROR, 3.1)  # fail_max 1: the breaker opens
        second = run(s, "vip", 1, 3.2)
        assert second == []
    assert view(reloaded, "k2", 3.2) == view(fresh, "k2", 3.2)
    assert view(reloaded, "k2", 3.2)["breaker"] == "open"
    for s in (reloaded, fresh):
        (probe,) = run(s, "vip", 0, 10.2)  # the queued job goes out as the half-open probe
        s.complete(probe.reservation, THROTTLED, 10.3)
    assert view(reloaded, "k2", 10.3) == view(fresh, "k2", 10.3)
    assert view(reloaded, "k2", 10.3)["cooldown_s"] == pytest.approx(4.0)
    for s in (reloaded, fresh):
        (d,) = run(s, "vip", 1, 60.0)
        s.complete(d.reservation, KEY_ERROR, 60.1)  # disabled on provider evidence: probed later
    assert view(reloaded, "k2", 60.1) == view(fresh, "k2", 60.1)
    assert view(reloaded, "k2", 60.1)["probe_in_s"] == pytest.approx(9.0)


def test_a_cost_limit_added_by_a_reload_adapts_with_the_key():
    s = make(pool("p", key("k1", rps=10.0, burst=5.0)), tiers=TIERS)
    s.reconfigure(spec_of(pool("p", key("k1", rps=10.0, burst=5.0, cost_per_minute=60.0))), 1.0)
    assert view(s, "k1", 1.0)["cost_tokens"] == pytest.approx(0.0)
    (d,) = run(s, "normal", 1, 2.0)  # 1 s at 1/s: one cost unit
    s.complete(d.reservation, OK, 3.0)  # the cost rate climbs from where it was set
    assert view(s, "k1", 3.0)["effective_cost_per_minute"] == pytest.approx(60.0)
    assert view(s, "k1", 3.0)["cost_tokens"] == pytest.approx(1.0)


def test_a_key_added_is_full_and_usable_at_once():
    s = make(pool("p", key("k1", rps=1.0, burst=1.0)), tiers=TIERS)
    s.reconfigure(spec_of(pool("p", key("k1", rps=1.0, burst=1.0), key("k2", rps=1.0, burst=3.0))), 0.0)
    assert view(s, "k2", 0.0)["tokens"] == pytest.approx(3.0)


def test_a_removed_key_with_a_call_running_comes_back_with_its_state():
    s = make(pool("p", key("k1", rps=1.0, burst=2.0)), pool("q", key("k2", pool="q", rps=1.0, burst=1.0)), tiers=TIERS)
    spent = run(s, "normal", 3, 0.0)
    on_k1 = [d for d in spent if d.key_id == "k1"]
    assert len(on_k1) == 2
    s.complete(on_k1[0].reservation, OK, 0.1)
    s.reconfigure(spec_of(pool("q", key("k2", pool="q", rps=1.0, burst=1.0))), 0.2)  # k1's second call still runs
    back = s.reconfigure(spec_of(pool("p", key("k1", rps=2.0, burst=2.0)), pool("q", key("k2", pool="q", rps=1.0, burst=1.0))),
                         0.3)
    assert back.keys.added == ("k1",)
    k1 = view(s, "k1", 0.3)
    assert (k1["in_flight"], k1["calls"], k1["rps"]) == (1, 1, 2.0)  # its state, with the new limits
    assert k1["tokens"] == pytest.approx(0.3)  # 0.3 s at 1/s: no refill
    s.complete(on_k1[1].reservation, OK, 0.4)
    assert view(s, "k1", 0.4)["in_flight"] == 0 and view(s, "k1", 0.4)["calls"] == 2


def test_a_removed_key_comes_back_with_its_state_also_under_the_same_limits():
    s = make(pool("p", key("k1", rps=1.0, burst=2.0)), pool("q", key("k2", pool="q", rps=1.0, burst=1.0)), tiers=TIERS)
    spent = [d for d in run(s, "normal", 3, 0.0) if d.key_id == "k1"]
    s.reconfigure(spec_of(pool("q", key("k2", pool="q", rps=1.0, burst=1.0))), 0.2)
    s.reconfigure(spec_of(pool("p", key("k1", rps=1.0, burst=2.0)), pool("q", key("k2", pool="q", rps=1.0, burst=1.0))), 0.3)
    assert view(s, "k1", 0.3)["in_flight"] == 2 and view(s, "k1", 0.3)["tokens"] == pytest.approx(0.3)
    for d in spent:
        s.complete(d.reservation, OK, 0.4)
    assert view(s, "k1", 0.4)["calls"] == 2


@pytest.mark.parametrize("calls_running", [0, 1])
def test_a_removed_key_whose_calls_ended_comes_back_as_a_new_key(calls_running):
    s = make(pool("p", key("k1", rps=1.0, burst=2.0)), pool("q", key("k2", pool="q", rps=1.0, burst=1.0)), tiers=TIERS)
    spent = [d for d in run(s, "normal", 3, 0.0) if d.key_id == "k1"]
    for d in spent[calls_running:]:
        s.complete(d.reservation, OK, 0.1)
    s.reconfigure(spec_of(pool("q", key("k2", pool="q", rps=1.0, burst=1.0))), 0.2)
    for d in spent[:calls_running]:
        s.complete(d.reservation, OK, 0.25)  # the last call ends: the key is forgotten
    s.reconfigure(spec_of(pool("p", key("k1", rps=1.0, burst=2.0)), pool("q", key("k2", pool="q", rps=1.0, burst=1.0))), 0.3)
    k1 = view(s, "k1", 0.3)
    assert (k1["calls"], k1["in_flight"], k1["tokens"]) == (0, 0, 2.0)  # full, no counters


def test_a_key_kept_unchanged_keeps_its_state_and_a_changed_one_its_level():
    s = make(pool("p", key("k1", rps=1.0, burst=4.0), key("k2", rps=1.0, burst=4.0)), tiers=TIERS)
    for d in run(s, "normal", 8, 0.0):
        s.complete(d.reservation, OK, 0.0)
    done = s.reconfigure(spec_of(pool("p", key("k1", rps=1.0, burst=4.0), key("k2", rps=3.0, burst=4.0))), 1.0)
    assert (done.keys.kept, done.keys.changed) == (("k1",), ("k2",))
    assert view(s, "k1", 1.0)["calls"] == 4 and view(s, "k2", 1.0)["calls"] == 4
    assert view(s, "k2", 2.0)["tokens"] == pytest.approx(4.0)  # 1 + 1 s at the new 3/s
    assert view(s, "k2", 2.0)["effective_rps"] == pytest.approx(3.0)
    assert view(s, "k1", 2.0)["tokens"] == pytest.approx(2.0)


def test_a_reload_at_an_earlier_time_than_the_scheduler_has_seen_counts_from_the_latest():
    s = make(pool("p", key("k1", rps=1.0, burst=4.0)), tiers=TIERS)
    for d in run(s, "normal", 4, 0.0):
        s.complete(d.reservation, OK, 0.0)
    assert view(s, "k1", 2.0)["tokens"] == pytest.approx(2.0)
    s.reconfigure(spec_of(pool("p", key("k1", rps=2.0, burst=4.0), key("k2", rps=1.0, burst=1.0))), 1.0)
    assert view(s, "k1", 3.0)["tokens"] == pytest.approx(4.0)  # 2 at t=2, then 1 s at 2/s
    assert view(s, "k2", 2.0)["tokens"] == pytest.approx(1.0)


# -- tiers, pools, reserve --------------------------------------------------------------------

def test_tiers_carry_their_counters_and_a_removed_first_tier_does_not_stop_the_rest():
    s = make(pool("p", key("k1", rps=1.0, burst=2.0)), tiers=TIERS)
    run(s, "vip", 1, 0.0)
    running = run(s, "normal", 3, 0.0)
    assert len(running) == 1
    done = s.reconfigure(spec_of(pool("p", key("k1", rps=1.0, burst=2.0)), tiers=(("normal", 1), ("bulk", 1))), 0.0)
    assert done.tiers_removed == ("vip",) and done.tiers_added == ("bulk",) and done.dropped == ()
    tiers = s.snapshot(0.0)["tiers"]
    assert tiers["normal"] == {"pending": 2, "in_flight": 1, "dispatched": 1}
    assert tiers["bulk"] == {"pending": 0, "in_flight": 0, "dispatched": 0}


def test_every_removed_tier_returns_its_queued_jobs():
    s = make(pool("p", key("k1", rps=1.0, burst=1.0)), tiers=(("vip", 4), ("normal", 2), ("guest", 1)))
    queued = {t: [job(t) for _ in range(n)] for t, n in (("vip", 1), ("normal", 2), ("guest", 1))}
    for jobs in queued.values():
        for j in jobs:
            s.add(j, 0.0)
    done = s.reconfigure(spec_of(pool("p", key("k1", rps=1.0, burst=1.0)), tiers=(("normal", 1),)), 0.0)
    assert done.tiers_removed == ("vip", "guest") and done.keys.kept == ("k1",)
    assert sorted(j.job_id for j in done.dropped) == sorted(j.job_id for j in queued["vip"] + queued["guest"])
    assert [d.job.job_id for d in run(s, "normal", 0, 0.0)] == [queued["normal"][0].job_id]


def test_a_new_pool_chain_is_used_after_the_reload():
    s = make(pool("p", key("k1", rps=1.0, burst=1.0)), pool("q", key("k2", pool="q", rps=1.0, burst=1.0)), tiers=TIERS,
             chains={"normal": ("p",), "vip": ("p",)})
    assert [d.key_id for d in run(s, "normal", 1, 0.0)] == ["k1"]
    s.reconfigure(spec_of(pool("p", key("k1", rps=1.0, burst=1.0)), pool("q", key("k2", pool="q", rps=1.0, burst=1.0)),
                          chains={"normal": ("q",), "vip": ("p",)}), 0.0)
    assert [d.key_id for d in run(s, "normal", 1, 0.0)] == ["k2"]


def test_a_new_priority_reserve_applies_at_once():
    pools = (pool("p", key("k1", rps=1.0, burst=3.0)),)
    s = make(*pools, tiers=TIERS)
    s.reconfigure(spec_of(*pools, priority_reserve=2.0), 0.0)
    assert len(run(s, "normal", 3, 0.0)) == 1  # 2 tokens kept for a vip job
    s.reconfigure(spec_of(*pools), 0.0)
    assert len(run(s, "normal", 0, 0.0)) == 2


def test_a_new_slot_reserve_applies_at_once():
    pools = (pool("p", key("k1", rps=1000.0, burst=100.0)),)
    s = make(*pools, tiers=TIERS)
    s.add(job("normal"), 0.0)
    s.reconfigure(spec_of(*pools, priority_slots=1), 0.0)
    assert not isinstance(s.next(0.0, free_slots=1, total_slots=16), Dispatch)  # the last slot kept for vip
    s.reconfigure(spec_of(*pools), 0.0)
    assert isinstance(s.next(0.0, free_slots=1, total_slots=16), Dispatch)


# -- a spec Scheduler(spec) refuses changes nothing -------------------------------------------

def refused(s: Scheduler, spec: SchedulerSpec, match: str) -> None:
    before = s.snapshot(0.0)
    with pytest.raises(ValueError, match=match):
        s.reconfigure(spec, 0.0)
    with pytest.raises(ValueError, match=match):
        Scheduler(spec, 0.0)
    assert s.snapshot(0.0) == before


def test_an_unknown_pool_is_refused_with_the_tier_and_pools_named():
    s = make(pool("p", key("k1")), tiers=TIERS)
    bad = SchedulerSpec(pools=(pool("p", key("k1")),), tiers=(TierSpec("vip", 1, ("p", "nope", "gone")),))
    refused(s, bad, r"^tier 'vip' names unknown pool\(s\): nope, gone$")


def test_an_unknown_split_pool_is_refused():
    s = make(pool("p", key("k1")), tiers=TIERS)
    bad = SchedulerSpec(pools=(pool("p", key("k1")),),
                        tiers=(TierSpec("vip", 1, ("p",), split=SplitSpec(("nope",), 0.5)),))
    refused(s, bad, r"unknown pool\(s\): nope")


def test_a_negative_priority_reserve_is_refused():
    s = make(pool("p", key("k1")), tiers=TIERS)
    refused(s, spec_of(pool("p", key("k1")), priority_reserve=-1.0), "^priority_reserve must be >= 0$")


def test_a_negative_slot_reserve_is_refused():
    s = make(pool("p", key("k1")), tiers=TIERS)
    refused(s, spec_of(pool("p", key("k1")), priority_slots=-1), "^priority_slots must be >= 0$")


def test_duplicate_pools_and_keys_are_refused():
    s = make(pool("p", key("k1")), tiers=TIERS)
    refused(s, spec_of(pool("p", key("k1")), pool("p", key("k2"))), "^pool names must be unique$")
    refused(s, spec_of(pool("p", key("k1")), pool("q", key("k1", pool="q"))), "^key id 'k1' appears twice$")


@pytest.mark.parametrize(("bad", "problem"), [
    (key("k1", pool="other"), "pool/upstream fields must match the pool \\(p, u\\)"),
    (key("k1", upstream="v"), "pool/upstream fields must match the pool \\(p, u\\)"),
    (key("k1", rps=0.0), "rps must be > 0 and burst >= 1"),
    (key("k1", rps=-1.0), "rps must be > 0 and burst >= 1"),
    (key("k1", burst=0.99), "rps must be > 0 and burst >= 1"),
    (key("k1", concurrency=0), "concurrency must be >= 1 when set"),
    (key("k1", cost_per_minute=0.0), "cost_per_minute must be > 0 when set"),
])
def test_a_bad_key_is_refused_naming_pool_key_and_problem(bad, problem):
    with pytest.raises(ValueError, match=f"^pool 'p', key 'k1': {problem}$"):
        list(checked_keys("p", "u", [key("k0"), bad]))
    s = make(pool("p", key("k1")), tiers=TIERS)
    refused(s, spec_of(pool("p", bad)), problem)


def test_keys_at_the_limits_are_accepted():
    edge = [key("k1", rps=0.001, burst=1.0, concurrency=1, cost_per_minute=0.01), key("k2")]
    assert list(checked_keys("p", "u", edge)) == edge


def test_a_removed_key_is_kept_until_its_last_call_ends():
    s = make(pool("p", key("k1", rps=1.0, burst=2.0)), pool("q", key("k2", pool="q", rps=1.0, burst=1.0)), tiers=TIERS)
    on_k1 = [d for d in run(s, "normal", 3, 0.0) if d.key_id == "k1"]
    assert len(on_k1) == 2
    s.reconfigure(spec_of(pool("q", key("k2", pool="q", rps=1.0, burst=1.0))), 0.1)
    s.complete(on_k1[0].reservation, OK, 0.2)
    s.complete(on_k1[1].reservation, OK, 0.3)  # the key is still known: its count comes down
    assert s.in_flight("normal") == 1  # k2's call
    s.reconfigure(spec_of(pool("p", key("k1", rps=1.0, burst=2.0)), pool("q", key("k2", pool="q", rps=1.0, burst=1.0))),
                  0.4)
    assert view(s, "k1", 0.4)["calls"] == 0  # forgotten after the last call: back as a new key
