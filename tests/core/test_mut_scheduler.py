"""The scheduler's own rules (dispatcher/core/scheduler.py) that only a mutation run showed
unguarded: jobs of cost 0 or below one unit run; a job no pool can serve is rejected as
itself; the look-ahead passes every job of a blocked upstream; the priority reserve lapses
while the top tier has jobs queued; a reservation says whether a 401/403 ends its job; keys
disabled and enabled again on 401 evidence are reported and start their strikes over; calls
adopted from a previous leader count as separate jobs and their 429 echoes back off once;
a removed key is forgotten once its last call is cancelled; an earlier `now` never moves the
clock back. Fake clock, named instants."""

from __future__ import annotations

import pytest
from core_helpers import dispatch, job, key, make, pool

from ratefleet.dispatcher.core import (
    Dispatch,
    Idle,
    Outcome,
    PoolSpec,
    ProbePolicy,
    Reject,
    Scheduler,
    SchedulerSpec,
    TierSpec,
    WaitUntil,
)
from ratefleet.schemas.result import ErrorCode

t0, t1, t2 = 0.0, 1.0, 2.0
OK = Outcome("ok", 200)
FAIL = Outcome("upstream_error", 503)
THROTTLED = Outcome("rate_limited", 429)
DENIED = Outcome("denied", 401)  # a plain 401: the key's or the request's fault (denials.py)
PROBE = ProbePolicy(base_s=60.0, max_s=3600.0)


def view(s: Scheduler, key_id: str, now: float) -> dict:
    return s.snapshot(now)["keys"][key_id]


def on(s: Scheduler, key_id: str, job_id: str, now: float, keys: tuple[str, ...]) -> Dispatch:
    """Queue `job_id` and dispatch it on `key_id` (the other `keys` passed over)."""
    s.add(job(job_id=job_id), now)
    decision = s.next(now, skip_keys=frozenset(keys) - {key_id})
    assert isinstance(decision, Dispatch) and decision.key_id == key_id, decision
    return decision


# -- queue and decisions --------------------------------------------------------------------

@pytest.mark.parametrize("cost", [0.0, 0.5, 1.0])
def test_jobs_of_cost_zero_or_below_one_unit_are_queued_and_run(cost):
    s = make(pool("p", key("k1", cost_per_minute=60)))
    s.add(job(cost=cost, job_id="small"), t0)
    d = dispatch(s, t0)
    assert d.job.job_id == "small" and d.reservation.cost == cost
    assert view(s, "k1", t0)["cost_tokens"] == 60 - cost


def test_a_negative_cost_is_refused():
    s = make(pool("p", key("k1")))
    with pytest.raises(ValueError, match="cost must be >= 0"):
        s.add(job(cost=-0.5), t0)


def test_a_job_no_pool_serves_is_rejected_as_itself_and_leaves_the_queue():
    s = make(pool("p", key("k1")))
    orphan = job(upstream="nowhere", job_id="orphan")
    s.add(orphan, t0)
    decision = s.next(t0)
    assert isinstance(decision, Reject) and decision.job == orphan
    assert decision.code == ErrorCode.NO_KEY_AVAILABLE and "upstream 'nowhere'" in decision.message
    assert s.pending("normal") == 0 and s.next(t0) == Idle()


def test_the_look_ahead_passes_every_job_of_a_blocked_upstream():
    s = make(pool("pa", key("ka", pool="pa", upstream="a", rps=1, burst=1), upstream="a"),
             pool("pb", key("kb", pool="pb", upstream="b"), upstream="b"))
    s.add(job(upstream="a"), t0)
    dispatch(s, t0)  # ka's only token
    for job_id in ("a1", "a2"):
        s.add(job(upstream="a", job_id=job_id), t0)
    s.add(job(upstream="b", job_id="b1"), t0)
    assert dispatch(s, t0).job.job_id == "b1", "two jobs waiting for upstream a held back upstream b"
    assert s.next(t0) == WaitUntil(pytest.approx(t1))  # then a1 waits for ka's next token


def test_a_scheduler_without_tiers_is_idle():
    s = Scheduler(SchedulerSpec(pools=(PoolSpec("p", "u", (key("k1"),)),), tiers=()), t0)
    assert s.next(t0) == Idle()


def test_the_priority_reserve_lapses_while_the_top_tier_has_jobs_queued():
    """Equal weights, 2 tokens, both tiers queued: vip then guest, each one token. A reserve
    held back for vip while vip jobs are queued would hand vip both (weighted shares broken)."""
    s = make(pool("p", key("k1", rps=0.001, burst=2)), tiers=(("vip", 1), ("guest", 1)), priority_reserve=1.0)
    for tier in ("vip", "vip", "guest", "guest"):
        s.add(job(tier), t0)
    assert [dispatch(s, t0).job.tier for _ in range(2)] == ["vip", "guest"]


def test_a_reservation_names_the_job_key_pool_cost_and_time():
    s = make(pool("main", key("k1", pool="main")), now=t0)
    s.add(job(cost=3.0, job_id="j"), t1)
    d = dispatch(s, t1)
    r = d.reservation
    assert (r.job, r.key_id, r.pool, r.cost, r.at, r.adopted) == (d.job, "k1", "main", 3.0, t1, False)
    assert (d.key_id, d.pool) == ("k1", "main")


# -- 401/403: whether a refusal ends the job (denials.py) ------------------------------------

def test_a_job_on_the_only_key_ends_with_a_refusal():
    s = make(pool("p", key("k1")))
    s.add(job(), t0)
    assert dispatch(s, t0).reservation.denial_final is True


def test_a_job_with_another_key_left_is_tried_there_and_its_second_refusal_ends_it():
    keys = ("k1", "k2", "k3")
    s = make(pool("p", *(key(k, rps=1000, burst=100) for k in keys)))
    first = on(s, "k1", "j", t0, keys)
    assert first.reservation.denial_final is False  # k2 and k3 can still judge it
    s.complete(first.reservation, DENIED, t0)
    s.add(job(job_id="j"), t0)
    second = dispatch(s, t0)
    assert second.key_id != "k1"
    assert second.reservation.denial_final is True, "a job refused on two keys must end, not try a third"


def two_keys() -> Scheduler:
    return make(pool("p", key("k1", rps=1000, burst=100), key("k2", rps=1000, burst=100)), probe=PROBE)


def disable_k1_on_401s(s: Scheduler, pending: str = "A") -> None:
    """`pending` refused on k1 (not judged yet); B refused on k1 and then fine on k2: k1 has
    401s on two different jobs, one confirmed, and is disabled (denials.py)."""
    keys = ("k1", "k2")
    s.complete(on(s, "k1", pending, t0, keys).reservation, DENIED, t0)
    s.complete(on(s, "k1", "B", t0, keys).reservation, DENIED, t0)
    s.complete(on(s, "k2", "B", t0, keys).reservation, OK, t0)


def test_a_key_disabled_on_401_evidence_is_reported_as_changed():
    s = two_keys()
    s.key_changes()
    disable_k1_on_401s(s)
    assert view(s, "k1", t0)["disabled_by"] == "provider"
    assert s.key_changes() == ["k1"]


def test_a_key_enabled_when_its_401_evidence_is_withdrawn_is_reported_and_starts_its_strikes_over():
    s = two_keys()
    disable_k1_on_401s(s, pending="A")
    s.key_changes()
    s.add(job(job_id="A"), t1)  # A is refused on k2 too: the request was at fault, not k1
    again = dispatch(s, t1)
    assert again.key_id == "k2" and again.reservation.denial_final
    s.complete(again.reservation, DENIED, t1)
    assert view(s, "k1", t1)["state"] == "enabled"
    assert s.key_changes() == ["k1"]
    # B's confirmed strike is forgotten with the rest: one new 401 is one strike, not two
    s.complete(on(s, "k1", "C", t2, ("k1", "k2")).reservation, DENIED, t2)
    assert view(s, "k1", t2)["state"] == "enabled", "a key enabled again was disabled by one 401"


@pytest.mark.parametrize("probe_answer", [THROTTLED, Outcome("bad_request", 400)])
def test_a_key_whose_probe_succeeds_starts_its_401_strikes_over(probe_answer):
    """Disabled after 401s on two jobs (one key, so each refusal is final); its probe gets an
    answer that accepts the credentials (429, 400): enabled, and one new 401 later is one
    strike, not the third."""
    s = make(pool("p", key("k1", rps=1000, burst=100)), probe=PROBE)
    for job_id in ("A", "B"):
        s.add(job(job_id=job_id), t0)
        s.complete(dispatch(s, t0).reservation, DENIED, t0)
    assert view(s, "k1", t0)["disabled_by"] == "provider"
    s.add(job(job_id="P"), 60.0)
    probe = dispatch(s, 60.0)
    assert probe.reservation.key_probe
    s.complete(probe.reservation, probe_answer, 60.0)
    assert view(s, "k1", 60.0)["state"] == "enabled"
    s.add(job(job_id="C"), 61.0)
    s.complete(dispatch(s, 61.0).reservation, DENIED, 61.0)
    assert view(s, "k1", 61.0)["state"] == "enabled", "the strikes from before the probe counted again"


# -- calls adopted from a previous leader ---------------------------------------------------

def test_adopted_calls_refused_401_count_as_different_jobs():
    """Two calls a previous leader started on the only key, both refused 401: two jobs'
    final refusals, which take the key out as two of our own jobs' would."""
    s = make(pool("p", key("k1")), probe=PROBE)
    for reservation in s.adopt_in_flight("k1", 2, t0):
        s.complete(reservation, DENIED, t1)
    assert view(s, "k1", t1)["disabled_by"] == "provider"


def test_429_echoes_of_adopted_calls_back_off_once_like_our_own_calls():
    """Four calls on the wire answered 429 together: the first is fresh, the others are
    echoes of the same overload (key.py). Adopted calls were sent at or before their
    adoption, so the same holds for them: one rate drop and the base cooldown, not four
    (which would pull the key to an eighth of its rate and cool it for 8 s after a failover)."""
    def after_four_429s(adopted: bool) -> tuple[float, float]:
        s = make(pool("p", key("k1", rps=10, burst=10)), now=t0)
        if adopted:
            calls = s.adopt_in_flight("k1", 4, t0)
        else:
            for _ in range(4):
                s.add(job(), t0)
            calls = [dispatch(s, t0).reservation for _ in range(4)]
        for i, reservation in enumerate(calls):
            s.complete(reservation, THROTTLED, t1 + 0.01 * i)
        k1 = view(s, "k1", t1 + 0.1)
        return k1["effective_rps"], k1["cooldown_s"]

    assert after_four_429s(adopted=False) == (5.0, pytest.approx(0.9))
    assert after_four_429s(adopted=True) == (5.0, pytest.approx(0.9))


@pytest.mark.parametrize("adopted", [False, True])
def test_429s_of_two_calls_back_to_back_are_the_keys_even_when_headers_show_room(adopted):
    """The first 429 with room in the key's headers is the request's own; a second one of
    another call right after it (no success between) means the key refuses everyone (key.py).
    Two calls adopted from a previous leader are two different calls, as our own are."""
    s = make(pool("p", key("k1", rps=10, burst=10)), now=t0)
    if adopted:
        calls = s.adopt_in_flight("k1", 2, t0)
    else:
        s.add(job(), t0)
        s.add(job(), t0)
        calls = [dispatch(s, t0).reservation, dispatch(s, t0).reservation]
    room = Outcome("rate_limited", 429, scope="request")
    s.complete(calls[0], room, t1)
    assert view(s, "k1", t1)["cooldown_s"] == 0.0  # the request's own: the key is not throttled
    s.complete(calls[1], room, t1)
    k1 = view(s, "k1", t1)
    assert k1["cooldown_s"] > 0.0 and k1["effective_rps"] < 10, "two calls refused back to back left the key alone"


# -- removed keys ---------------------------------------------------------------------------

def spec_with(*key_ids: str) -> SchedulerSpec:
    keys = tuple(key(k, rps=1000, burst=100) for k in key_ids)
    return SchedulerSpec(pools=(PoolSpec("p", "u", keys),), tiers=(TierSpec("normal", 1, ("p",)),), safety_s=0.0)


@pytest.mark.parametrize("adopted", [False, True])
def test_a_removed_key_is_forgotten_when_its_last_call_is_cancelled(adopted):
    """k1 (one failed call behind it) is removed while a call runs on it; the call is cancelled,
    so k1 is gone: added back later, it starts as a new key, not with its old counters."""
    s = Scheduler(spec_with("k1", "k2"), t0)
    s.complete(on(s, "k1", "old", t0, ("k1", "k2")).reservation, FAIL, t0)
    running = s.adopt_in_flight("k1", 1, t0)[0] if adopted else on(s, "k1", "j", t0, ("k1", "k2")).reservation
    s.reconfigure(spec_with("k2"), t1)
    s.cancel(running, t1)
    s.reconfigure(spec_with("k1", "k2"), t2)
    k1 = view(s, "k1", t2)
    assert (k1["calls"], k1["errors"], k1["in_flight"]) == (0, 0, 0)


# -- the clock ------------------------------------------------------------------------------

def test_adopting_calls_moves_the_clock_and_an_earlier_now_counts_as_the_latest():
    """Conservative start (empty buckets, 1 token/s): calls adopted at t=5 move the clock to 5,
    so a job asked for with an older `now` finds the 5 tokens refilled by then."""
    s = make(pool("p", key("k1", rps=1, burst=5)), now=t0, conservative=True)
    s.adopt_in_flight("k1", 1, 5.0)
    s.add(job(), t0)
    assert isinstance(s.next(t0), Dispatch)
