"""Per-key circuit breakers (aiobreaker state machine, core-owned monotonic timing).

Every test runs with the process in Asia/Tokyo and in America/Los_Angeles: aiobreaker's
own time properties are wrong outside UTC, and the core must not depend on them.
"""

from __future__ import annotations

import pytest
from core_helpers import dispatch, job, key, make, pool

from ratefleet.dispatcher.core import Idle, Outcome, WaitUntil

pytestmark = pytest.mark.usefixtures("non_utc")

t0, t1, t2, t3, t4, t5, t6, t7, t8, t9 = 0.0, 1.0, 2.0, 3.0, 9.0, 13.0, 14.0, 20.0, 23.0, 40.0
FAIL = Outcome("upstream_error", 503)
OK = Outcome("ok", 200)
RESET = 10.0


def one_key(**kw):
    s = make(pool("p", key("k1", rps=1000, burst=50)), fail_max=3, reset_s=RESET, **kw)
    for _ in range(30):
        s.add(job(), t0)
    return s


def breaker(s, now):
    return s.snapshot(now)["keys"]["k1"]["breaker"]


def trip(s, now):
    """Three consecutive upstream errors at `now`."""
    for _ in range(3):
        s.complete(dispatch(s, now).reservation, FAIL, now)


def test_opens_after_fail_max_consecutive_failures(non_utc):
    s = one_key()
    for _ in range(2):
        s.complete(dispatch(s, t0).reservation, FAIL, t0)
    s.complete(dispatch(s, t0).reservation, OK, t0)  # ok resets the count
    for _ in range(2):
        s.complete(dispatch(s, t1).reservation, FAIL, t1)
    assert breaker(s, t1) == "closed"
    s.complete(dispatch(s, t2).reservation, FAIL, t2)
    assert breaker(s, t2) == "open"
    assert s.next(t2) == WaitUntil(t2 + RESET)
    assert s.next(t4) == WaitUntil(t2 + RESET)


@pytest.mark.parametrize("status", [400, 404, 429])
def test_non_failures_do_not_count_while_closed(status):
    s = one_key()
    kind = "rate_limited" if status == 429 else "bad_request"
    for _ in range(2):
        s.complete(dispatch(s, t0).reservation, FAIL, t0)
    s.complete(dispatch(s, t0).reservation, Outcome(kind, status, retry_after_s=0.0), t0)
    # a 429 cools the key down for at least cooldown base_s (1 s), whatever Retry-After says
    s.complete(dispatch(s, t1).reservation, FAIL, t1)  # third consecutive upstream error
    assert breaker(s, t1) == "open"


def test_half_open_admits_exactly_one_probe():
    s = one_key()
    trip(s, t1)
    assert breaker(s, t4) == "open"
    probe = dispatch(s, t1 + RESET)
    assert probe.reservation.probe is True
    assert breaker(s, t1 + RESET) == "half_open"
    assert s.next(t1 + RESET) == Idle()  # probe in flight: only its completion frees the key
    assert s.next(t9) == Idle()


def test_probe_success_closes():
    s = one_key()
    trip(s, t1)
    probe = dispatch(s, t5)
    s.complete(probe.reservation, OK, t6)
    assert breaker(s, t6) == "closed"
    follow = [dispatch(s, t6) for _ in range(3)]
    assert not any(d.reservation.probe for d in follow)


def test_probe_failure_reopens_from_the_failure_time():
    s = one_key()
    trip(s, t1)
    probe = dispatch(s, t5)
    s.complete(probe.reservation, FAIL, t6)
    assert breaker(s, t6) == "open"
    assert s.next(t6) == WaitUntil(t6 + RESET)
    assert dispatch(s, t6 + RESET).reservation.probe is True


@pytest.mark.parametrize("kind, status", [("bad_request", 400), ("rate_limited", 429)])
def test_answered_probe_closes(kind, status):
    s = one_key()
    trip(s, t1)
    probe = dispatch(s, t5)
    s.complete(probe.reservation, Outcome(kind, status, retry_after_s=0.0), t6)
    assert breaker(s, t6) == "closed"


def test_key_error_probe_frees_the_slot_and_disables():
    s = one_key()
    trip(s, t1)
    s.complete(dispatch(s, t5).reservation, Outcome("key_error", 401), t6)
    view = s.snapshot(t6)["keys"]["k1"]
    assert view["disabled"] and view["breaker"] == "half_open"


def test_cancelled_probe_lets_another_probe_go():
    s = one_key()
    trip(s, t1)
    probe = dispatch(s, t5)
    s.cancel(probe.reservation, t6)
    again = dispatch(s, t6)
    assert again.reservation.probe is True and again.job == probe.job


def test_late_outcomes_from_an_old_generation_are_ignored():
    s = one_key()
    stale = [dispatch(s, t0) for _ in range(2)]  # reserved while closed (old generation)
    trip(s, t1)
    s.complete(stale[0].reservation, FAIL, t2)  # would count while open: ignored
    assert s.next(t2) == WaitUntil(t1 + RESET)  # opened_at did not move
    probe = dispatch(s, t5)
    s.complete(stale[1].reservation, OK, t5)  # a late success must not close the probe's breaker
    assert breaker(s, t5) == "half_open"
    assert s.next(t5) == Idle()  # and the probe is still the only call admitted
    s.complete(probe.reservation, OK, t6)
    assert breaker(s, t6) == "closed"
    assert probe.reservation.generation > stale[0].reservation.generation


def test_failures_from_before_a_close_do_not_count_after_it():
    s = one_key()
    stale = [dispatch(s, t0) for _ in range(3)]
    trip(s, t1)
    s.complete(dispatch(s, t5).reservation, OK, t5)  # closed again, new generation
    for d in stale:
        s.complete(d.reservation, FAIL, t6)
    assert breaker(s, t6) == "closed"


def test_open_key_falls_back_to_the_next_pool():
    s = make(pool("a", key("a1", pool="a", rps=100)), pool("b", key("b1", pool="b", rps=100)),
             fail_max=1, reset_s=RESET)
    for _ in range(5):
        s.add(job(), t0)
    s.complete(dispatch(s, t0).reservation, FAIL, t0)
    assert dispatch(s, t1).key_id == "b1"
    assert dispatch(s, t0 + RESET).key_id == "a1"  # half-open probe back on the first pool
    assert dispatch(s, t0 + RESET).key_id == "b1"  # the other pool serves while a1's probe is out


def test_a_retry_after_an_upstream_error_goes_to_another_key(non_utc):
    """Idle keys tie (configuration order), so a job's retries went back to the key that failed:
    with a dead first key, jobs sent one at a time used up attempts on it (a reviewer's trial:
    3 of 8 failed). A retry now goes to another key that can take it now."""
    s = make(pool("p", key("k1", rps=1000, burst=50), key("k2", rps=1000, burst=50)), fail_max=5, reset_s=RESET)
    calls = {"k1": 0, "k2": 0}
    for n in range(8):
        now = t0 + n * 60.0  # one job at a time, the keys idle and full in between
        s.add(job(job_id=f"j{n}"), now)
        for attempt in range(3):
            d = dispatch(s, now + attempt * 5.0)  # after the nak delay: both keys full again, a tie
            calls[d.key_id] += 1
            if d.key_id == "k2":
                s.complete(d.reservation, OK, now + attempt * 5.0)
                break
            s.complete(d.reservation, FAIL, now + attempt * 5.0)  # k1 is dead
            s.add(job(job_id=f"j{n}"), now + attempt * 5.0)  # nak'd, delivered again
        else:
            raise AssertionError(f"j{n} used up its attempts on the dead key")
    assert calls["k2"] == 8 and calls["k1"] <= 8


def test_a_retry_goes_back_to_the_failed_key_when_it_is_the_only_one_able_now(non_utc):
    s = make(pool("p", key("k1", rps=1000, burst=50), key("k2", rps=1000, burst=50, concurrency=1)),
             fail_max=5, reset_s=RESET)
    s.add(job(job_id="busy"), t0)
    s.add(job(job_id="j"), t0)
    first, second = dispatch(s, t0), dispatch(s, t0)
    on_k2, on_k1 = (first, second) if first.key_id == "k2" else (second, first)
    assert (on_k1.key_id, on_k2.key_id) == ("k1", "k2")
    s.complete(on_k1.reservation, FAIL, t0)
    s.add(on_k1.job, t0)
    again = dispatch(s, t0)  # k2 is busy: not held back for it (a soft preference)
    assert again.key_id == "k1"


def test_one_jobs_failures_count_once_until_the_next_success(non_utc):
    """One request the upstream always answers 500, retried on the only key of its pool, must
    not open the breaker for everyone (a gateway trial: the next healthy request waited 15 s,
    then timed out); fail_max different jobs failing in a row still do."""
    s = make(pool("p", key("k1", rps=1000, burst=50)), fail_max=3, reset_s=RESET)
    for _ in range(6):  # the same job back (nak, redelivery) and failing again and again
        s.add(job(job_id="poison"), t0)
        s.complete(dispatch(s, t0).reservation, FAIL, t0)
    assert breaker(s, t0) == "closed"
    s.add(job(job_id="a"), t1)
    s.complete(dispatch(s, t1).reservation, FAIL, t1)
    assert breaker(s, t1) == "closed"  # poison and a: two different jobs
    s.add(job(job_id="b"), t1)
    s.complete(dispatch(s, t1).reservation, FAIL, t1)
    assert breaker(s, t1) == "open"


def test_after_a_success_a_jobs_failure_counts_again(non_utc):
    s = make(pool("p", key("k1", rps=1000, burst=50)), fail_max=3, reset_s=RESET)
    for who in ("a", "b"):
        s.add(job(job_id=who), t0)
        s.complete(dispatch(s, t0).reservation, FAIL, t0)
    s.add(job(job_id="ok"), t0)
    s.complete(dispatch(s, t0).reservation, OK, t0)  # the count starts again, and the memory
    for who in ("a", "b"):
        s.add(job(job_id=who), t1)
        s.complete(dispatch(s, t1).reservation, FAIL, t1)
    assert breaker(s, t1) == "closed"
    s.add(job(job_id="a"), t1)
    s.complete(dispatch(s, t1).reservation, FAIL, t1)  # a's again: no more evidence
    assert breaker(s, t1) == "closed"
    s.add(job(job_id="c"), t1)
    s.complete(dispatch(s, t1).reservation, FAIL, t1)
    assert breaker(s, t1) == "open"
