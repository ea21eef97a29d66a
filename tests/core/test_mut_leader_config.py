"""The leader's part of a live config change (dispatcher/core/leader_config.py): the new
windows and poison limits (max_deliver) it takes, the held jobs of a removed tier handed back
only while the lease is ours, and the two log lines an operator reads, field by field."""

from __future__ import annotations

from leader_helpers import MAX_DELIVER, T0, Run, ack, beat, delivery, machine

from ratefleet.dispatcher.core import KeySpec, PoolSpec, SchedulerSpec, TierSpec
from ratefleet.dispatcher.core import commands as cmd
from ratefleet.dispatcher.core import events as ev

SLOW = KeySpec("k1", "p", "u", 0.001, 1.0)


def spec_of(*tiers: str, keys: tuple[KeySpec, ...] = (SLOW,)) -> SchedulerSpec:
    return SchedulerSpec(pools=(PoolSpec("p", "u", keys),), tiers=tuple(TierSpec(t, 2, ("p",)) for t in tiers))


def logs(out: list[cmd.Command]) -> list[cmd.Log]:
    return [c for c in out if isinstance(c, cmd.Log)]


def test_a_revision_sets_windows_and_merges_the_poison_limits():
    m = machine(keys=1)
    old = dict(m.settings.max_deliver)
    out = m.handle(ev.ConfigChanged(3, spec_of("vip", "gold"), {"vip": 6, "gold": 4}, {"gold": 9, "vip": 2}), T0 + 0.1)
    assert cmd.Pull("gold", 4, 1.0) in out  # the new tier is fed at once, not at the next housekeeping
    assert m.pulls.tiers["gold"].last_activity == T0 + 0.1
    assert m.settings.windows == {"vip": 6, "gold": 4}
    assert m.settings.max_deliver == {**old, "gold": 9, "vip": 2}  # a removed tier's limit stays known
    assert set(m.pulls.tiers) == {"vip", "gold"} and m.pulls.tiers["gold"].window == 4


def test_the_applied_revision_is_logged_with_what_changed():
    m = machine(keys=1, rps=0.001, burst=1.0)
    run = Run(m)
    run.at(T0, beat("w1", slots=4))
    run.at(T0 + 0.1, delivery(1))  # takes the one token
    run.at(T0 + 0.1, delivery(2))  # held
    removed = sorted(set(m.settings.windows) - {"vip"})
    keys = (KeySpec("k1", "p", "u", 0.002, 1.0), KeySpec("k2", "p", "u", 1.0, 1.0))
    out = m.handle(ev.ConfigChanged(5, spec_of("vip", "gold", keys=keys), {"vip": 8, "gold": 8},
                                    {"vip": 5, "gold": 5}), T0 + 0.2)
    assert [c for c in out if isinstance(c, cmd.HandBack)] == [cmd.HandBack(2, ack(2, 1), 0.0)]
    [applied] = logs(out)
    assert applied == cmd.Log("info", "config revision applied", {
        "revision": 5, "keys_added": ["k2"], "keys_removed": [], "keys_changed": ["k1"],
        "tiers_added": ["gold"], "tiers_removed": applied.fields["tiers_removed"], "jobs_handed_back": 1})
    assert sorted(applied.fields["tiers_removed"]) == removed and "normal" in removed


def test_a_removed_tiers_jobs_are_not_handed_back_without_the_lease():
    m = machine(keys=1, rps=0.001, burst=1.0, lease_until=T0 + 0.15)
    run = Run(m)
    run.at(T0, beat("w1", slots=4))
    run.at(T0 + 0.1, delivery(1))
    run.at(T0 + 0.1, delivery(2))  # held
    out = m.handle(ev.ConfigChanged(5, spec_of("vip"), {"vip": 8}, {"vip": 5}), T0 + 0.2)
    assert [c for c in out if isinstance(c, cmd.HandBack)] == []
    assert m.held == {} and logs(out)[-1].fields["jobs_handed_back"] == 1


def test_a_refused_revision_is_logged_with_the_running_one_and_why():
    m = machine(keys=1)
    m.handle(ev.ConfigChanged(4, spec_of("vip"), {"vip": 8}, {"vip": 5}), T0)
    bad = SchedulerSpec(pools=(PoolSpec("p", "u", (SLOW,)),), tiers=(TierSpec("vip", 1, ("missing",)),))
    out = m.handle(ev.ConfigChanged(5, bad, {"vip": 1}, {"vip": 1}), T0 + 0.1)
    [refused] = logs(out)
    assert (refused.level, refused.message) == ("error", "config revision refused by the leader; the running one stays")
    assert refused.fields["revision"] == 5 and refused.fields["running"] == 4
    assert "missing" in refused.fields["error"]
    assert m.settings.windows == {"vip": 8} and m.settings.max_deliver["vip"] == 5 and MAX_DELIVER
