"""A key's disabled state and probe schedule (dispatcher/core/keyhealth.py) and the
scheduler's key-admin surface (keyadmin.py): which answers count as a change (a change is
logged and persisted by the leader, so a false one repeats a KEY DISABLED alarm and a
missed one leaves a stale record for the next leader), the probe delay starting over when a
key comes back, and restored records without every field. Named instants, no clock."""

from __future__ import annotations

import pytest
from core_helpers import dispatch, job, key, make, pool

from ratefleet.dispatcher.core import Dispatch, Outcome, ProbePolicy
from ratefleet.dispatcher.core.keyhealth import KeyHealth

P = ProbePolicy(base_s=60.0, max_s=3600.0)
OK = Outcome("ok", 200)
INVALID_KEY = Outcome("key_error", 401, code="invalid_api_key")
DENIED_401 = Outcome("denied", 401)
UPSTREAM_503 = Outcome("upstream_error", 503)


def provider_disabled(now: float = 0.0) -> KeyHealth:
    health = KeyHealth(P)
    assert health.disable("provider", "invalid_api_key (HTTP 401)", now)
    return health


# -- KeyHealth: what each step returns and leaves behind ---------------------------------------

def test_provider_evidence_on_a_disabled_key_changes_nothing():
    health = provider_disabled(0.0)
    assert health.disable("provider", "insufficient_quota (HTTP 429)", 5.0) is False
    assert (health.reason, health.since, health.probe_at) == ("invalid_api_key (HTTP 401)", 0.0, 60.0)
    operator = KeyHealth(P)
    operator.disable("operator", "leaked", 0.0)
    assert operator.disable("provider", "invalid_api_key (HTTP 401)", 5.0) is False
    assert operator.by == "operator" and operator.gate(100.0) is None


@pytest.mark.parametrize("verdict, changed, delay, probe_at, by", [
    (True, True, 60.0, None, None),  # accepted: enabled, delay back to base
    (False, True, 120.0, 130.0, "provider"),  # refused again: the delay doubles from now
    (None, False, 60.0, 60.0, "provider"),  # no verdict: nothing changed, the next job probes
])
def test_settling_the_probe_says_whether_the_state_changed(verdict, changed, delay, probe_at, by):
    health = provider_disabled(0.0)
    assert health.take_probe(7)
    assert health.settle_probe(7, verdict, 10.0) is changed
    assert (health.probe, health.probe_delay_s, health.probe_at, health.by) == (None, delay, probe_at, by)


def test_an_answer_of_another_reservation_settles_nothing():
    health = provider_disabled(0.0)
    health.take_probe(7)
    assert health.settle_probe(8, False, 10.0) is False
    assert health.postpone_probe(8, 10.0) is False
    assert (health.probe, health.probe_delay_s, health.probe_at) == (7, 60.0, 60.0)


def test_postponing_the_probe_says_it_was_the_probe_and_keeps_the_delay():
    health = provider_disabled(0.0)
    health.take_probe(7)
    assert health.postpone_probe(7, 10.0) is True
    assert (health.probe, health.probe_delay_s, health.probe_at) == (None, 60.0, 70.0)


def test_enable_resets_the_probe_delay_for_the_next_disable():
    health = provider_disabled(0.0)
    health.take_probe(1)
    health.settle_probe(1, False, 10.0)  # delay 120 s
    assert health.enable() is True
    assert health.probe_delay_s == 60.0
    assert health.disable("provider", "invalid_api_key (HTTP 401)", 200.0)
    assert health.probe_at == 260.0


@pytest.mark.parametrize("probe_in_s, probe_at", [(None, 500.0), (0.0, 500.0), (-3.0, 500.0), (0.25, 500.25)])
def test_a_restored_provider_key_probes_when_its_saved_time_says(probe_in_s, probe_at):
    health = KeyHealth(P)
    health.restore("provider", "r", 500.0, probe_delay_s=120.0, probe_in_s=probe_in_s)
    assert health.probe_at == probe_at and health.gate(500.0) == probe_at
    assert health.view(500.0)["disabled_for_s"] == 0.0  # no disabled_for_s: out since now


# -- through the scheduler: what `key_changes` names (the leader logs and saves each) ------------

def two_keys(probe: ProbePolicy = P):
    return make(pool("p", key("k1", rps=1000, burst=100), key("k2", rps=1000, burst=100)), probe=probe)


def on(s, job_id: str, now: float, key_id: str, skip: frozenset[str] = frozenset()) -> Dispatch:
    s.add(job(job_id=job_id), now)
    decision = s.next(now, skip)
    assert isinstance(decision, Dispatch) and decision.key_id == key_id, decision
    return decision


def probing_k1(s) -> Dispatch:
    """k1 provider-disabled at 0 s, its probe dispatched at 60 s (changes consumed)."""
    s.complete_unknown("k1", INVALID_KEY, 0.0)
    assert s.key_changes() == ["k1"]
    probe = on(s, "probe", 60.0, "k1", skip=frozenset({"k2"}))
    assert probe.reservation.key_probe
    return probe


@pytest.mark.parametrize("outcome, changes, probe_in_s", [
    (OK, ["k1"], None),  # back in rotation
    (INVALID_KEY, ["k1"], 120.0),  # refused again: news, and a new probe time to persist
    (UPSTREAM_503, [], 0.0),  # says nothing: no news, the next job probes
])
def test_a_probe_outcome_is_news_only_when_it_decides(outcome, changes, probe_in_s):
    s = two_keys()
    probe = probing_k1(s)
    s.complete(probe.reservation, outcome, 61.0)
    assert s.key_changes() == changes
    record = s.key_record("k1", 61.0)
    assert (record and record["probe_in_s"]) == (probe_in_s if record else None)


def test_a_probe_answered_after_an_operator_enabled_the_key_is_no_news():
    s = two_keys()
    probe = probing_k1(s)
    assert s.enable_key("k1", 61.0)
    assert s.key_changes() == ["k1"]
    s.complete(probe.reservation, INVALID_KEY, 62.0)  # a key-scoped answer: that is news again
    assert s.key_changes() == ["k1"]
    s = two_keys()
    probe = probing_k1(s)
    s.enable_key("k1", 61.0)
    s.key_changes()
    s.complete(probe.reservation, OK, 62.0)
    assert s.key_changes() == []


def test_an_operator_disable_during_the_probe_keeps_the_operator_reason():
    s = two_keys()
    probe = probing_k1(s)
    assert s.disable_key("k1", "leaked", 61.0)
    assert s.key_changes() == ["k1"]
    s.complete(probe.reservation, UPSTREAM_503, 62.0)
    assert s.key_changes() == []
    assert s.key_record("k1", 62.0) == {"by": "operator", "reason": "leaked", "probe_delay_s": 60.0,
                                        "probe_in_s": None, "disabled_for_s": 1.0}


def test_operator_disable_records_the_time_it_happened():
    s = two_keys()
    assert s.disable_key("k2", "rotating", 5.0)
    assert s.key_record("k2", 8.5)["disabled_for_s"] == 3.5
    assert s.disable_key("k2", "rotating", 9.0) is False
    assert s.disable_key("k2", "leaked", 9.0) is True
    assert s.key_record("k2", 10.0)["disabled_for_s"] == 1.0


def test_enabling_a_key_forgets_its_401_strikes():
    s = two_keys()
    first = on(s, "a", 0.0, "k1")
    s.complete(first.reservation, DENIED_401, 0.0)
    s.add(job(job_id="a"), 0.0)
    s.complete(dispatch(s, 0.0).reservation, OK, 0.0)  # "a" works on k2: one strike against k1
    s.disable_key("k1", "checking", 1.0)
    s.enable_key("k1", 2.0)  # the operator put it back: its strikes start over
    second = on(s, "b", 3.0, "k1")
    s.complete(second.reservation, DENIED_401, 3.0)
    s.add(job(job_id="b"), 3.0)
    s.complete(dispatch(s, 3.0).reservation, OK, 3.0)  # one strike again, not two
    assert s.snapshot(3.0)["keys"]["k1"]["disabled"] is False


def test_a_restored_record_without_a_delay_starts_at_the_base_delay():
    s = make(pool("p", key("k1")), probe=ProbePolicy(base_s=0.5, max_s=10.0))
    s.restore_key("k1", {"by": "provider", "reason": "r"}, 0.0)
    assert s.key_record("k1", 0.0) == {"by": "provider", "reason": "r", "probe_delay_s": 0.5, "probe_in_s": 0.0,
                                       "disabled_for_s": 0.0}


# -- a job one key refused (401) goes to another key only if that key could take it ------------

def refused_on_k1_while_k2_is_disabled(s, at: float) -> None:
    first = on(s, "a", 0.0, "k1")
    assert not first.reservation.denial_final  # k2 could take it: a 401 is not the end yet
    s.complete(first.reservation, DENIED_401, 0.0)
    s.complete_unknown("k2", INVALID_KEY, 0.0)  # then k2 goes out, its probe due at 60 s
    s.add(job(job_id="a"), at)


def test_a_refused_job_goes_back_to_its_key_as_final_while_the_other_key_waits_for_its_probe():
    s = two_keys()
    refused_on_k1_while_k2_is_disabled(s, 2.0)
    again = s.next(2.0)
    assert isinstance(again, Dispatch) and again.key_id == "k1" and again.reservation.denial_final


def test_a_refused_job_becomes_the_probe_of_the_other_key_once_the_probe_is_due():
    s = two_keys()
    refused_on_k1_while_k2_is_disabled(s, 60.0)  # exactly when the probe is due
    again = s.next(60.0)
    assert isinstance(again, Dispatch) and again.key_id == "k2" and again.reservation.key_probe


# -- status: how a key's state reads ----------------------------------------------------------

def test_a_probe_in_flight_reads_as_due_now():
    health = provider_disabled(0.0)
    assert health.view(70.0)["probe_in_flight"] is False  # due, none out yet
    health.take_probe(3)
    assert health.view(10.0)["probe_in_s"] == 0.0 and health.view(10.0)["probe_in_flight"] is True
    assert health.could_serve(10.0) and health.gate(10.0) is None
    health.release_probe(3)
    assert health.view(70.0)["probe_in_flight"] is False


def test_status_times_are_rounded_to_milliseconds():
    health = provider_disabled(0.0)
    view = health.view(0.00012)
    assert (view["disabled_for_s"], view["probe_in_s"]) == (0.0, 60.0)
    view = health.view(1.23456)
    assert (view["disabled_for_s"], view["probe_in_s"]) == (1.235, 58.765)


def test_a_key_without_its_secret_reads_as_disabled_by_secret():
    health = KeyHealth(P)
    health.secret_missing = "LOCAL_KEY_1 not set"
    view = health.view(0.0)
    assert (view["state"], view["disabled_by"], view["secret_missing"]) == ("disabled", "secret", "LOCAL_KEY_1 not set")
    assert health.gate(0.0) is None and not health.could_serve(0.0) and not health.comes_back(0.0)


def test_is_disabled_names_every_reason_a_key_takes_no_job():
    s = make(pool("p", key("k1"), key("k2"), key("k3"), key("k4")))
    s.disable_key("k1", "leaked", 0.0)
    s.complete_unknown("k2", INVALID_KEY, 0.0)
    s.set_secret_missing({"k3": "LOCAL_KEY_3 not set"})
    assert [s.is_disabled(k) for k in ("k1", "k2", "k3", "k4", "unknown")] == [True, True, True, False, False]
