"""Request-scoped 401s that arrive together, probes that hit a bad request, and a backlog
behind a provider-disabled key: the key stays (or comes back) and the jobs wait rather than
fail. Fake clock, named instants."""

from __future__ import annotations

from collections import Counter

from core_helpers import dispatch, job, key, make, pool

from ratefleet.dispatcher.core import Dispatch, Idle, Outcome, ProbePolicy, Reject, WaitUntil

t0, t1 = 0.0, 1.0
OK = Outcome("ok", 200)
# OpenAI's answer to a wrong OpenAI-Organization header: the request's fault, not the key's
WRONG_ORG = Outcome("denied", 401, code="mismatched_organization")
INVALID_KEY = Outcome("key_error", 401, code="invalid_api_key")
PROBE = ProbePolicy(base_s=60.0, max_s=3600.0)


def two_keys():
    return make(pool("p", key("k1", rps=1000, burst=100), key("k2", rps=1000, burst=100)), probe=PROBE)


def states(s, now: float) -> dict[str, str]:
    return {k: v["state"] for k, v in s.snapshot(now)["keys"].items()}


def test_concurrent_request_scoped_401s_leave_both_keys_and_each_job_fails_alone():
    s = two_keys()
    bad = [f"bad{i}" for i in range(4)]
    for job_id in bad:
        s.add(job(job_id=job_id), t0)
    first = [dispatch(s, t0) for _ in bad]  # all four on the wire at once, spread over k1 and k2
    assert Counter(d.key_id for d in first) == {"k1": 2, "k2": 2}
    for d in first:
        s.complete(d.reservation, WRONG_ORG, t0)
    assert states(s, t0) == {"k1": "enabled", "k2": "enabled"}  # nothing is judged yet
    for job_id in bad:  # redelivered: each goes to the key that has not refused it
        s.add(job(job_id=job_id), t0)
    second = [dispatch(s, t0) for _ in bad]
    assert all(d.reservation.denial_final for d in second)
    assert {d.job.job_id: d.key_id for d in second} == {d.job.job_id: ("k2" if d.key_id == "k1" else "k1")
                                                        for d in first}
    for d in second:
        s.complete(d.reservation, WRONG_ORG, t0)
    assert states(s, t0) == {"k1": "enabled", "k2": "enabled"}
    for i in range(10):
        s.add(job(job_id=f"good{i}"), t1)
        good = dispatch(s, t1)
        s.complete(good.reservation, OK, t1)
    assert states(s, t1) == {"k1": "enabled", "k2": "enabled"}


def test_a_key_disabled_on_a_strike_later_withdrawn_comes_back():
    s = two_keys()
    s.add(job(job_id="j0"), t0)
    on_k1 = dispatch(s, t0)
    s.complete(on_k1.reservation, Outcome("denied", 401), t0)
    s.add(job(job_id="j0"), t0)
    s.complete(dispatch(s, t0).reservation, OK, t0)  # j0 succeeded on k2: k1's 401 was about k1
    s.add(job(job_id="bad"), t0)
    bad = dispatch(s, t0)
    assert bad.key_id == "k1"
    s.complete(bad.reservation, WRONG_ORG, t0)
    assert states(s, t0)["k1"] == "disabled"  # two 401s, one confirmed: a revoked key goes out fast
    s.add(job(job_id="bad"), t0)
    again = dispatch(s, t0)
    assert again.key_id == "k2" and again.reservation.denial_final
    s.complete(again.reservation, WRONG_ORG, t0)  # refused on k2 too: its 401 on k1 was the request's fault
    assert states(s, t0) == {"k1": "enabled", "k2": "enabled"}
    assert s.key_changes() == ["k1"]


def test_a_bad_request_as_the_probe_is_no_verdict_and_does_not_double_the_delay():
    s = two_keys()
    s.add(job(job_id="x"), t0)
    s.complete(dispatch(s, t0).reservation, INVALID_KEY, t0)
    s.add(job(job_id="bad"), 61.0)
    probe = dispatch(s, 61.0)
    assert probe.key_id == "k1" and probe.reservation.key_probe
    s.complete(probe.reservation, WRONG_ORG, 61.0)
    k1 = s.snapshot(61.0)["keys"]["k1"]
    assert k1["state"] == "disabled" and k1["probe_delay_s"] == 60.0 and k1["probe_in_s"] == 60.0
    s.add(job(job_id="bad"), 61.0)  # refused on k2 as well: the request's fault, fails alone
    again = dispatch(s, 61.0)
    assert again.key_id == "k2" and again.reservation.denial_final
    s.complete(again.reservation, WRONG_ORG, 61.0)
    s.add(job(job_id="good"), 121.0)
    probe = dispatch(s, 121.0)
    assert probe.key_id == "k1" and probe.reservation.key_probe
    s.complete(probe.reservation, OK, 121.0)
    assert states(s, 121.0)["k1"] == "enabled"


def test_a_backlog_waits_for_the_probe_of_its_only_key_instead_of_failing():
    s = make(pool("p", key("k1", rps=1000, burst=1000)), probe=PROBE)
    s.add(job(job_id="blip"), t0)
    s.complete(dispatch(s, t0).reservation, INVALID_KEY, 0.1)
    for i in range(1000):
        s.add(job(job_id=f"j{i}"), 0.2)
    assert s.next(0.2) == WaitUntil(60.1)  # nothing is rejected: the queue waits for the probe
    assert s.pending("normal") == 1000
    probe = dispatch(s, 60.1)
    assert probe.reservation.key_probe and probe.job.job_id == "j0"
    assert s.next(60.1) == Idle()  # one probe at a time
    s.complete(probe.reservation, OK, 60.2)
    decisions = [s.next(60.2) for _ in range(999)]
    assert all(isinstance(d, Dispatch) for d in decisions) and s.pending("normal") == 0


def test_a_key_no_probe_can_bring_back_still_rejects_at_once():
    s = make(pool("p", key("k1")), probe=PROBE)
    s.disable_key("k1", "leaked", t0)
    s.add(job(), t0)
    reject = s.next(t0)
    assert isinstance(reject, Reject) and reject.code == "no_key_available" and "leaked" in reject.message


def test_a_402_without_a_provider_code_takes_the_key_out_as_payment_required():
    s = two_keys()
    s.add(job(job_id="x"), t0)
    s.complete(dispatch(s, t0).reservation, Outcome("key_error", 402), t0)
    k1 = s.snapshot(t0)["keys"]["k1"]
    assert k1["disabled_reason"] == "payment_required (HTTP 402)" and k1["probe_in_s"] == 60.0
