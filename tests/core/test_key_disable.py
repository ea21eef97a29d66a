"""Key-scoped versus request-scoped refusals, key probes, operator decisions and missing
secrets, over named instants (fake clock, no sleeping)."""

from __future__ import annotations

import pytest
from core_helpers import dispatch, job, key, make, pool

from ratefleet.dispatcher.core import Dispatch, Idle, Outcome, ProbePolicy, Reject, WaitUntil
from ratefleet.dispatcher.core.denials import AUTH_JOBS, FORBIDDEN_JOBS

t0, t1, t2, t3 = 0.0, 1.0, 2.0, 3.0
OK = Outcome("ok", 200)
DENIED_403 = Outcome("denied", 403, code="permission_denied")
DENIED_401 = Outcome("denied", 401)
INVALID_KEY = Outcome("key_error", 401, code="invalid_api_key")
NO_CREDIT = Outcome("key_error", 429, code="insufficient_quota")


def two_keys(probe: ProbePolicy = ProbePolicy(base_s=60.0, max_s=3600.0), **kw):
    return make(pool("p", key("k1", rps=1000, burst=100), key("k2", rps=1000, burst=100)), probe=probe, **kw)


def view(s, key_id: str, now: float) -> dict:
    return s.snapshot(now)["keys"][key_id]


def run_on(s, job_id: str, now: float) -> Dispatch:
    s.add(job(job_id=job_id), now)
    return dispatch(s, now)


def test_a_request_refused_on_two_keys_fails_and_leaves_both_keys_enabled():
    # the example: a job for a model the keys may not use, then 10 valid jobs
    s = two_keys()
    first = run_on(s, "bad-model", t0)
    assert first.key_id == "k1" and first.reservation.denial_final is False
    s.complete(first.reservation, DENIED_403, t0)
    s.add(job(job_id="bad-model"), t0)  # redelivered: it must go to the other key
    second = dispatch(s, t0)
    assert second.key_id == "k2" and second.reservation.denial_final is True
    s.complete(second.reservation, DENIED_403, t0)
    assert not view(s, "k1", t0)["disabled"] and not view(s, "k2", t0)["disabled"]
    for i in range(10):
        d = run_on(s, f"good{i}", t1)
        s.complete(d.reservation, OK, t1)
    assert view(s, "k1", t1)["ok"] + view(s, "k2", t1)["ok"] == 10


@pytest.mark.parametrize("status, outcome, jobs_needed", [
    (401, DENIED_401, AUTH_JOBS),
    (403, DENIED_403, FORBIDDEN_JOBS),
])
def test_a_key_refusing_different_jobs_that_succeed_elsewhere_is_disabled(status, outcome, jobs_needed):
    s = two_keys()
    for i in range(jobs_needed):
        on_k1 = run_on(s, f"j{i}", t0)
        assert on_k1.key_id == "k1"
        s.complete(on_k1.reservation, outcome, t0)
        assert view(s, "k1", t0)["disabled"] is (status == 401 and i + 1 >= jobs_needed)
        s.add(job(job_id=f"j{i}"), t0)
        on_k2 = dispatch(s, t0)
        assert on_k2.key_id == "k2"
        s.complete(on_k2.reservation, OK, t0)
    k1 = view(s, "k1", t0)
    assert k1["disabled"] and k1["disabled_by"] == "provider" and f"{status} on {jobs_needed} different jobs" in (
        k1["disabled_reason"])
    assert not view(s, "k2", t0)["disabled"]


def test_one_401_blip_does_not_disable_and_a_success_clears_it():
    s = two_keys()
    d = run_on(s, "a", t0)
    s.complete(d.reservation, DENIED_401, t0)
    s.add(job(job_id="a"), t0)
    s.complete(dispatch(s, t0).reservation, OK, t0)  # k2
    later = run_on(s, "b", t1)  # k1 again (the job b was never refused)
    assert later.key_id == "k1"
    s.complete(later.reservation, OK, t1)  # k1 authenticates fine: its 401 record is cleared
    d = run_on(s, "c", t2)
    s.complete(d.reservation, DENIED_401, t2)
    assert not view(s, "k1", t2)["disabled"]


def test_requests_refused_everywhere_never_count_against_a_key():
    s = two_keys()
    for i in range(5):
        first = run_on(s, f"bad{i}", t0)
        s.complete(first.reservation, DENIED_401, t0)
        s.add(job(job_id=f"bad{i}"), t0)
        second = dispatch(s, t0)
        assert second.key_id != first.key_id and second.reservation.denial_final
        s.complete(second.reservation, DENIED_401, t0)
    # each job's first 401 is forgiven when the second key refuses it too
    assert not view(s, "k1", t0)["disabled"] and not view(s, "k2", t0)["disabled"]


@pytest.mark.parametrize("outcome, reason", [
    (INVALID_KEY, "invalid_api_key (HTTP 401)"),
    (NO_CREDIT, "insufficient_quota (HTTP 429)"),  # out of credit: out of rotation, not a cooldown
])
def test_explicit_key_codes_disable_at_once(outcome, reason):
    s = two_keys()
    d = run_on(s, "x", t0)
    s.complete(d.reservation, outcome, t0)
    k1 = view(s, "k1", t0)
    assert k1["disabled"] and k1["disabled_reason"] == reason and k1["probe_in_s"] == 60.0
    assert k1["cooldown_s"] == 0.0
    assert {run_on(s, f"y{i}", t1).key_id for i in range(5)} == {"k2"}


# named instants of a probe schedule: base 60 s, doubling, capped at 200 s
P = ProbePolicy(base_s=60.0, max_s=200.0)


@pytest.mark.parametrize("probe_outcomes, expected_delays", [
    ([OK], [60.0]),
    ([INVALID_KEY, OK], [60.0, 120.0]),
    ([INVALID_KEY, INVALID_KEY, INVALID_KEY, OK], [60.0, 120.0, 200.0, 200.0]),  # capped at max_s
    ([INVALID_KEY, Outcome("rate_limited", 429)], [60.0, 120.0]),  # a plain 429 means the key authenticated
    ([DENIED_401, OK], [60.0, 60.0]),  # a plain 401 on the probe is no verdict: same delay, not doubled
    ([Outcome("upstream_error", 503), OK], [60.0, 0.0]),  # a 5xx says nothing: the next job probes again
])
def test_a_disabled_key_is_probed_with_one_job_and_comes_back(probe_outcomes, expected_delays):
    s = make(pool("p", key("k1", rps=1000, burst=100)), probe=P)
    d = run_on(s, "first", t0)
    s.complete(d.reservation, INVALID_KEY, t0)
    now = t0
    for outcome, delay in zip(probe_outcomes, expected_delays):
        assert view(s, "k1", now)["probe_in_s"] == delay
        if delay:
            s.add(job(), now + delay - 1)  # no key, no probe due: the job waits for the probe, it does not fail
            assert s.next(now + delay - 1) == WaitUntil(now + delay)
        now += delay
        probe = run_on(s, f"probe{now}", now)
        assert probe.reservation.key_probe and view(s, "k1", now)["probe_in_s"] == 0.0
        s.add(job(), now)
        assert s.next(now) == Idle()  # one probe at a time; the next job waits for its verdict
        s.complete(probe.reservation, outcome, now)
        s.discard_pending()
    k1 = view(s, "k1", now)
    assert k1["state"] == "enabled" and k1["probe_delay_s"] is None
    s.add(job(), now + 10)  # (after any 429 cooldown)
    assert not dispatch(s, now + 10).reservation.key_probe


def test_a_probe_that_was_not_made_lets_the_next_job_probe():
    s = make(pool("p", key("k1", rps=1000, burst=100)), probe=P)
    s.complete(run_on(s, "a", t0).reservation, INVALID_KEY, t0)
    probe = run_on(s, "b", 60.0)
    s.cancel(probe.reservation, 60.0)
    again = dispatch(s, 60.0)
    assert again.reservation.key_probe and again.job == probe.job


def test_operator_disable_is_never_probed_and_enable_brings_the_key_back():
    s = two_keys()
    assert s.disable_key("k1", "leaked in a log", t0)
    k1 = view(s, "k1", t0)
    assert (k1["disabled_by"], k1["disabled_reason"], k1["probe_in_s"]) == ("operator", "leaked in a log", None)
    assert {run_on(s, f"j{i}", t).key_id for i, t in enumerate((t0, 100.0, 10_000.0))} == {"k2"}
    assert s.key_changes() == ["k1"] and s.key_changes() == []
    # provider evidence never overrides the operator
    s.complete_unknown("k1", INVALID_KEY, 10_000.0)
    assert view(s, "k1", 10_000.0)["disabled_by"] == "operator"
    assert s.enable_key("k1", 10_001.0) and not view(s, "k1", 10_001.0)["disabled"]
    assert "k1" in {run_on(s, f"e{i}", 10_001.0).key_id for i in range(4)}


def test_no_worker_with_the_secret_takes_the_key_out_and_says_why():
    s = two_keys()
    s.set_secret_missing({"k1": "LOCAL_KEY_1 not set"})
    k1 = view(s, "k1", t0)
    assert k1["disabled"] and k1["disabled_by"] == "secret"
    assert k1["disabled_reason"] == "no worker has its secret (LOCAL_KEY_1 not set)"
    assert {run_on(s, f"j{i}", t0).key_id for i in range(4)} == {"k2"}
    s.set_secret_missing({"k1": "LOCAL_KEY_1 not set", "k2": "file /run/k2 empty"})
    s.add(job(), t1)
    reject = s.next(t1)
    assert isinstance(reject, Reject) and reject.code == "no_key_available"
    assert "LOCAL_KEY_1 not set" in reject.message and "file /run/k2 empty" in reject.message
    s.set_secret_missing({})
    assert isinstance(run_on(s, "back", t2), Dispatch)


def test_keys_without_a_free_worker_are_skipped():
    s = two_keys()
    s.add(job(), t0)
    assert dispatch_skipping(s, t0, {"k1"}).key_id == "k2"
    s.add(job(), t0)
    assert s.next(t0, frozenset({"k1", "k2"})) == Idle()


def dispatch_skipping(s, now, skip) -> Dispatch:
    decision = s.next(now, frozenset(skip))
    assert isinstance(decision, Dispatch), decision
    return decision


def test_a_persisted_state_restores_on_a_new_scheduler():
    s = two_keys()
    s.complete(run_on(s, "a", t0).reservation, NO_CREDIT, t0)
    s.disable_key("k2", "rotating", t0)
    records = {k: s.key_record(k, 30.0) for k in ("k1", "k2")}
    assert records["k1"]["by"] == "provider" and records["k1"]["probe_in_s"] == 30.0
    fresh = two_keys(now=500.0)
    for key_id, record in records.items():
        fresh.restore_key(key_id, record, 500.0)
    assert fresh.snapshot(500.0)["keys"]["k1"]["probe_in_s"] == 30.0
    assert view(fresh, "k2", 500.0)["disabled_reason"] == "rotating"
    fresh.add(job(), 529.0)
    assert fresh.next(529.0) == WaitUntil(530.0)  # k2 stays out; the job waits for k1's probe
    assert run_on(fresh, "probe", 530.0).reservation.key_probe
    with pytest.raises(ValueError):
        fresh.restore_key("k1", {"by": "nobody", "reason": "x"}, 500.0)
