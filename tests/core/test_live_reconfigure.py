"""A live config change of the scheduling core (issue 9 section 2), with a fake clock.

The rule under test: unchanged keys keep their state (a reload never refills a burst), a
key with new limits keeps its bucket level, a removed key's calls in flight finish and are
counted, a new key is usable at once; tiers keep their queues; the leader applies the
change as an event and hands back what it held for a removed tier.
"""

from __future__ import annotations

import pytest
from core_helpers import key, make, pool
from hypothesis import given
from hypothesis import settings as settings_
from hypothesis import strategies as st
from leader_helpers import T0, Run, assigned, beat, delivery, machine, outcome, settings

from ratefleet.dispatcher.core import Dispatch, Outcome, SchedulerSpec, TierSpec
from ratefleet.dispatcher.core import commands as cmd
from ratefleet.dispatcher.core import events as ev
from ratefleet.dispatcher.core.reconfigure import KeyPlan, plan_keys
from ratefleet.dispatcher.core.types import KeySpec, PendingJob, PoolSpec

OK = Outcome(kind="ok", status=200)  # type: ignore[arg-type]
TIERS = (("vip", 2), ("normal", 1))


def spec_of(*pools: PoolSpec, tiers: tuple[tuple[str, int], ...] = TIERS, policy: str = "weighted") -> SchedulerSpec:
    names = tuple(p.name for p in pools)
    return SchedulerSpec(pools=pools, tiers=tuple(TierSpec(n, w, names) for n, w in tiers), policy=policy,  # type: ignore[arg-type]
                         safety_s=0.0)


def drain(s, tier: str = "normal", n: int = 1, now: float = 0.0) -> list[Dispatch]:
    """Queue `n` jobs and dispatch as many as the keys allow at `now`."""
    for i in range(n):
        s.add(PendingJob(f"{tier}-{now}-{i}", tier, "u"), now)
    out = []
    while isinstance(d := s.next(now), Dispatch):
        out.append(d)
    return out


def tokens(s, key_id: str, now: float) -> float:
    return s.snapshot(now)["keys"][key_id]["tokens"]


def test_plan_keys_sorts_ids_by_what_changed() -> None:
    a, b, c = KeySpec("a", "p", "u", 1, 5), KeySpec("b", "p", "u", 1, 5), KeySpec("c", "p", "u", 1, 5)
    b2 = KeySpec("b", "p", "u", 2, 5)
    d = KeySpec("d", "p", "u", 1, 5)
    assert plan_keys({"a": a, "b": b, "c": c}, {"a": a, "b": b2, "d": d}) == KeyPlan(("a",), ("b",), ("d",), ("c",))
    assert plan_keys({"a": a}, {"a": a}) == KeyPlan(("a",))


@pytest.mark.parametrize("new_k1", [key("k1", rps=1, burst=5), key("k1", rps=2, burst=10)], ids=["unchanged", "new-limits"])
def test_a_reload_does_not_refill_a_keys_burst(new_k1: KeySpec) -> None:
    s = make(pool("p", key("k1", rps=1, burst=5)), tiers=TIERS, safety_s=0.0)
    spent = drain(s, n=5, now=0.0)
    assert [d.key_id for d in spent] == ["k1"] * 5 and tokens(s, "k1", 0.0) == pytest.approx(0.0)
    for d in spent:
        s.complete(d.reservation, OK, 0.0)
    s.reconfigure(spec_of(pool("p", new_k1, key("k9", rps=1, burst=5))), 0.5)
    assert tokens(s, "k1", 0.5) == pytest.approx(0.5)  # refilled by time only: 0.5 s at 1/s
    # the new rate applies from the change on, never to the time before it
    assert tokens(s, "k1", 1.0) == pytest.approx(0.5 + 0.5 * new_k1.rps)
    assert s.snapshot(1.0)["keys"]["k1"]["calls"] == 5  # counters kept too


def test_a_smaller_burst_cuts_the_level() -> None:
    s = make(pool("p", key("k1", rps=1, burst=5)), tiers=TIERS, safety_s=0.0)
    assert tokens(s, "k1", 0.0) == pytest.approx(5.0)
    s.reconfigure(spec_of(pool("p", key("k1", rps=1, burst=2))), 0.0)
    assert tokens(s, "k1", 0.0) == pytest.approx(2.0)
    assert len(drain(s, n=5, now=0.0)) == 2


def test_a_removed_keys_call_in_flight_finishes_and_is_counted() -> None:
    s = make(pool("p", key("k1", rps=1, burst=1), key("k2", rps=1, burst=1)), tiers=TIERS, safety_s=0.0)
    running = {d.key_id: d for d in drain(s, n=2, now=0.0)}
    assert set(running) == {"k1", "k2"} and s.in_flight("normal") == 2
    done = s.reconfigure(spec_of(pool("p", key("k1", rps=1, burst=1))), 0.1)
    assert done.keys.removed == ("k2",)
    assert "k2" not in s.key_ids() and "k2" not in s.snapshot(0.1)["keys"]
    s.complete(running["k2"].reservation, OK, 0.2)  # no error; the tier's count comes down
    assert s.in_flight("normal") == 1
    later = drain(s, n=3, now=10.0)
    assert {d.key_id for d in later} == {"k1"}  # never the removed key again
    assert not s._retired  # forgotten once its last call ended


def test_a_new_key_is_usable_at_once() -> None:
    s = make(pool("p", key("k1", rps=1, burst=1)), tiers=TIERS, safety_s=0.0)
    assert [d.key_id for d in drain(s, n=3, now=0.0)] == ["k1"]
    s.reconfigure(spec_of(pool("p", key("k1", rps=1, burst=1), key("k3", rps=10, burst=2))), 0.0)
    assert [d.key_id for d in drain(s, n=0, now=0.0)] == ["k3", "k3"]  # the two queued jobs


def test_tiers_keep_their_queues_and_take_new_weights_and_policy() -> None:
    s = make(pool("p", key("k1", rps=1, burst=1)), tiers=TIERS, safety_s=0.0)
    drain(s, "normal", n=2, now=0.0)
    drain(s, "vip", n=1, now=0.0)
    s.reconfigure(spec_of(pool("p", key("k1", rps=1, burst=1)), tiers=(("vip", 1), ("normal", 1), ("bulk", 1)),
                          policy="strict"), 0.0)
    assert s.pending("normal") == 1 and s.pending("vip") == 1 and s.pending("bulk") == 0
    assert s._tiers.policy == "strict"


def test_a_removed_tiers_queued_jobs_are_returned() -> None:
    s = make(pool("p", key("k1", rps=1, burst=1)), tiers=TIERS, safety_s=0.0)
    drain(s, "vip", n=1, now=0.0)
    drain(s, "normal", n=2, now=0.0)
    done = s.reconfigure(spec_of(pool("p", key("k1", rps=1, burst=1)), tiers=(("vip", 1),)), 0.0)
    assert done.tiers_removed == ("normal",) and len(done.dropped) == 2


def test_an_invalid_spec_changes_nothing() -> None:
    s = make(pool("p", key("k1", rps=1, burst=1)), tiers=TIERS, safety_s=0.0)
    bad = SchedulerSpec(pools=(pool("p", key("k1")),), tiers=(TierSpec("vip", 1, ("nope",)),))
    with pytest.raises(ValueError, match="unknown pool"):
        s.reconfigure(bad, 0.0)
    assert s.key_ids() == ["k1"] and [t.name for t in s._tiers] == ["vip", "normal"]


# -- the leader machine: the change is an event ---------------------------------------------

def _event(revision: int, spec: SchedulerSpec) -> ev.ConfigChanged:
    tiers = [t.name for t in spec.tiers]
    return ev.ConfigChanged(revision, spec, {t: 8 for t in tiers}, {t: 5 for t in tiers})


def _leader_spec(*keys: KeySpec, tiers: tuple[str, ...] = ("vip", "normal")) -> SchedulerSpec:
    return SchedulerSpec(pools=(PoolSpec("p", "u", keys),), tiers=tuple(TierSpec(t, 2, ("p",)) for t in tiers))


def test_the_leader_applies_a_revision_and_reports_it() -> None:
    run = Run(machine(keys=1, rps=100.0, burst=10.0))
    run.at(T0, beat("w1", slots=4))
    first = assigned(run.at(T0 + 0.1, delivery(1)))
    assert [a.assignment for a in first]
    k1 = KeySpec("k1", "p", "u", 100.0, 10.0)
    run.at(T0 + 0.2, _event(7, _leader_spec(k1, KeySpec("k2", "p", "u", 100.0, 10.0))))
    assert run.m.status(T0 + 0.2)["config_revision"] == 7
    assert set(run.m.status(T0 + 0.2)["keys"]) == {"k1", "k2"}
    run.at(T0 + 0.3, _event(8, _leader_spec(KeySpec("k2", "p", "u", 100.0, 10.0))))  # k1 removed, its call runs
    out = run.at(T0 + 0.4, outcome(first[0].assignment, key_id="k1"))
    assert not [c for c in out if isinstance(c, cmd.Nak)]
    again = assigned(run.at(T0 + 0.5, delivery(2)))
    assert [run.m.fleet.by_assignment.get(a.assignment).key_id for a in again] == ["k2"]


def test_the_leader_hands_back_what_it_held_for_a_removed_tier() -> None:
    m = machine(keys=1, rps=0.001, burst=1.0)
    run = Run(m)
    run.at(T0, beat("w1", slots=4))
    run.at(T0 + 0.1, delivery(1, tier="normal"))  # takes the one token
    run.at(T0 + 0.1, delivery(2, tier="normal"))  # held: no token
    out = run.at(T0 + 0.2, _event(3, _leader_spec(KeySpec("k1", "p", "u", 0.001, 1.0), tiers=("vip",))))
    assert [(c.seq, c.delay_s) for c in out if isinstance(c, cmd.HandBack)] == [(2, 0.0)]
    late = run.at(T0 + 0.3, delivery(3, tier="normal"))  # on the removed tier's inbox
    assert [type(c).__name__ for c in late] == ["HandBack"]
    assert "normal" not in m.settings.windows and m.config_revision == 3


def test_the_leader_keeps_its_revision_when_the_scheduler_refuses_the_spec() -> None:
    m = machine(keys=1)
    m.handle(_event(4, _leader_spec(KeySpec("k1", "p", "u", 100.0, 10.0))), T0)
    bad = SchedulerSpec(pools=(PoolSpec("p", "u", (KeySpec("k1", "p", "u", 1, 1),)),),
                        tiers=(TierSpec("vip", 1, ("missing",)),))
    out = m.handle(_event(5, bad), T0 + 0.1)
    assert m.config_revision == 4
    assert any(isinstance(c, cmd.Log) and c.level == "error" for c in out)
    assert settings().windows  # the helpers' settings are untouched


@settings_(max_examples=200, deadline=None)
@given(rps=st.floats(0.5, 50), burst=st.floats(1, 20), spend=st.integers(0, 25), new_rps=st.floats(0.5, 50),
       new_burst=st.floats(1, 20), at=st.floats(0, 5))
def test_property_a_reload_never_adds_tokens(rps, burst, spend, new_rps, new_burst, at) -> None:
    s = make(pool("p", key("k1", rps=rps, burst=burst)), tiers=TIERS, safety_s=0.0)
    for d in drain(s, n=spend, now=0.0):
        s.complete(d.reservation, OK, 0.0)
    before = s._keys["k1"].requests.advance(at)
    s.reconfigure(spec_of(pool("p", key("k1", rps=new_rps, burst=new_burst))), at)
    after = s._keys["k1"].requests.advance(at)
    assert after <= before + 1e-9
    assert after == pytest.approx(min(before, s._keys["k1"].requests.capacity))
