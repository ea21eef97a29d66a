"""The leader's worker decisions (dispatcher/core/leader_fleet.py) on a real scheduler, fleet
and key keeper at named instants: a new worker's calls in flight are adopted against their
keys (each once, an unknown key logged, the rest still adopted), an outcome frees the slot and
feeds the key (also for a call this leader did not hand out), and a lost assignment or a
silent worker's job goes back to the queue with a nak only when the leader owns its ack."""

from __future__ import annotations

from core_helpers import dispatch, job, key, make, pool

from ratefleet.dispatcher.core.commands import Log, Nak, SaveKey
from ratefleet.dispatcher.core.fleet import AssignmentRecord, Fleet
from ratefleet.dispatcher.core.leader_fleet import LOST, FleetKeeper
from ratefleet.dispatcher.core.leader_keys import KeyKeeper
from ratefleet.dispatcher.core.types import Outcome
from ratefleet.schemas.internal import Heartbeat, InFlight
from ratefleet.schemas.outcome import OutcomeKind

T = 500.0


def keeper(timeout_s: float = 10.0) -> FleetKeeper:
    scheduler = make(pool("p", key("k1", concurrency=5), key("k2", concurrency=5)), now=T)
    fleet = Fleet(timeout_s)
    return FleetKeeper(scheduler, fleet, KeyKeeper(scheduler, fleet))


def hb(worker: str, slots: int = 4, items: tuple[tuple[str, str], ...] = ()) -> Heartbeat:
    return Heartbeat(worker=worker, slots=slots,
                     in_flight=[InFlight(assignment=a, key_id=k, job_id=f"job-{a}") for a, k in items])


def in_flight(fk: FleetKeeper, now: float = T) -> dict[str, int]:
    return {kid: k["in_flight"] for kid, k in fk.scheduler.snapshot(now)["keys"].items()}


def handed_out(fk: FleetKeeper, aid: str, worker: str, now: float = T, ack: str | None = None) -> AssignmentRecord:
    """A job dispatched by the scheduler and assigned to `worker`, as the leader does."""
    fk.scheduler.add(job("normal", job_id=f"job-{aid}"), now)
    d = dispatch(fk.scheduler, now)
    record = AssignmentRecord(aid, worker, d.job.job_id, "normal", d.key_id, f"ack-{aid}" if ack is None else ack,
                              d.reservation, now)
    fk.fleet.assign(record)
    return record


def test_a_new_worker_s_calls_in_flight_are_adopted_once_each():
    fk = keeper()
    fk.heartbeat(hb("w0"), T, True)
    handed_out(fk, "known", "w0")  # already tracked: not adopted a second time
    before = in_flight(fk)
    out = fk.heartbeat(hb("w1", 3, (("known", "k1"), ("a1", "k1"), ("a2", "k2"), ("a3", "k2"))), T + 1, True)
    joined = [c for c in out if isinstance(c, Log)]
    assert [(c.level, c.fields) for c in joined] == [("info", {"worker": "w1", "slots": 3, "in_flight": 4})]
    assert "joined" in joined[0].message
    assert in_flight(fk) == {"k1": before["k1"] + 1, "k2": before["k2"] + 2}
    for aid, kid in (("a1", "k1"), ("a2", "k2"), ("a3", "k2")):
        r = fk.fleet.by_assignment[aid]
        assert (r.id, r.worker, r.job_id, r.tier, r.key_id, r.ack, r.at) == (aid, "w1", f"job-{aid}", "?", kid, "",
                                                                             T + 1)
        assert r.reservation.adopted and r.reservation.key_id == kid
    assert fk.fleet.by_assignment["known"].worker == "w0"
    assert fk.fleet.workers["w1"].free == 0  # 3 slots, 3 adopted calls
    # a known worker's next beat adopts nothing more
    assert fk.heartbeat(hb("w1", 3, (("a1", "k1"), ("a2", "k2"), ("a3", "k2"), ("a4", "k1"))), T + 2, True) == []
    assert "a4" not in fk.fleet.by_assignment


def test_a_call_on_an_unknown_key_is_logged_and_the_others_are_still_adopted():
    fk = keeper()
    out = fk.heartbeat(hb("w1", 4, (("a1", "k1"), ("x1", "k9"), ("a2", "k2"))), T, True)
    errors = [c for c in out if isinstance(c, Log) and c.level == "error"]
    assert [c.fields for c in errors] == [{"worker": "w1", "key_id": "k9"}]
    assert "does not know" in errors[0].message
    assert [c.level for c in out] == ["error", "info"]
    assert sorted(fk.fleet.by_assignment) == ["a1", "a2"] and in_flight(fk) == {"k1": 1, "k2": 1}


def test_an_adopted_call_s_outcome_frees_its_key():
    fk = keeper()
    fk.heartbeat(hb("w1", 2, (("a1", "k1"),)), T, True)
    assert fk.outcome("a1", "k1", Outcome(kind=OutcomeKind.OK, status=200), T + 1) == []
    assert in_flight(fk) == {"k1": 0, "k2": 0} and fk.fleet.workers["w1"].free == 2
    assert fk.scheduler.snapshot(T + 1)["keys"]["k1"]["ok"] == 1


def test_an_outcome_completes_its_reservation_and_returns_the_key_changes():
    fk = keeper()
    fk.heartbeat(hb("w1", 2), T, True)
    record = handed_out(fk, "a1", "w1")
    out = fk.outcome("a1", "ignored-for-a-known-assignment", Outcome(kind=OutcomeKind.KEY_ERROR, status=401,
                                                                     code="invalid_api_key"), T + 1)
    snap = fk.scheduler.snapshot(T + 1)
    assert snap["keys"][record.key_id]["in_flight"] == 0 and snap["tiers"]["normal"]["in_flight"] == 0
    assert snap["keys"][record.key_id]["disabled"]
    assert [type(c) for c in out] == [Log, SaveKey] and out[1].key_id == record.key_id
    assert fk.fleet.workers["w1"].free == 2 and "a1" not in fk.fleet.by_assignment


def test_an_outcome_of_a_call_not_handed_out_feeds_the_key_unless_it_has_no_kind():
    fk = keeper()
    fk.heartbeat(hb("w1", 2), T, True)
    before = fk.scheduler.snapshot(T)["keys"]
    assert fk.outcome("ghost", "k2", Outcome(kind=OutcomeKind.NONE), T) == []
    assert fk.scheduler.snapshot(T)["keys"] == before
    fk.outcome("ghost", "k2", Outcome(kind=OutcomeKind.RATE_LIMITED, status=429, retry_after_s=7.0), T)
    keys = fk.scheduler.snapshot(T)["keys"]
    assert (keys["k2"]["rate_limited"], keys["k1"]["rate_limited"]) == (1, 0)
    assert keys["k2"]["cooldown_s"] >= 7.0 and keys["k2"]["in_flight"] == 0


def test_a_lost_assignment_goes_back_with_a_nak_only_when_the_leader_owns_the_ack():
    for owned, naks in ((True, [Nak("ack-a1")]), (False, [])):
        fk = keeper()
        fk.heartbeat(hb("w1", 2), T, owned)
        record = handed_out(fk, "a1", "w1")
        assert fk.heartbeat(hb("w1", 2), T + 3, owned) == []  # one beat without it: not yet
        out = fk.heartbeat(hb("w1", 2), T + 4, owned)
        warnings = [c for c in out if isinstance(c, Log)]
        assert [(c.level, c.fields) for c in warnings] == [("warning", {"job_id": "job-a1", "worker": "w1"})]
        assert "lost" in warnings[0].message
        assert [c for c in out if isinstance(c, Nak)] == naks
        snap = fk.scheduler.snapshot(T + 4)
        assert snap["keys"][record.key_id]["in_flight"] == 0 and snap["tiers"]["normal"]["in_flight"] == 0
        assert snap["keys"][record.key_id]["calls"] == 0  # LOST counts as no call
        assert fk.fleet.workers["w1"].free == 2


def test_give_back_of_an_adopted_call_naks_nothing():
    fk = keeper()
    fk.heartbeat(hb("w1", 2, (("a1", "k1"),)), T, True)
    assert fk.give_back(fk.fleet.by_assignment["a1"], T + 1, True) == []
    assert in_flight(fk) == {"k1": 0, "k2": 0}
    assert LOST == Outcome(kind=OutcomeKind.NONE)


def test_a_silent_worker_s_jobs_go_back_each_with_its_nak():
    fk = keeper(timeout_s=5.0)
    fk.heartbeat(hb("w1", 3), T, True)
    fk.heartbeat(hb("w2", 3), T + 4, True)
    for aid in ("a1", "a2"):
        handed_out(fk, aid, "w1")
    handed_out(fk, "b1", "w2", T + 4)
    assert fk.expire(T + 5.0, True) == []
    out = fk.expire(T + 6.0, True)
    assert [(c.level, c.fields) for c in out if isinstance(c, Log)] == [("warning", {"worker": "w1", "jobs": 2})]
    assert "silent" in out[0].message
    assert out[1:] == [Nak("ack-a1"), Nak("ack-a2")]
    snap = fk.scheduler.snapshot(T + 6)
    assert snap["tiers"]["normal"]["in_flight"] == 1 and sum(k["in_flight"] for k in snap["keys"].values()) == 1
    assert list(fk.fleet.workers) == ["w2"] and list(fk.fleet.by_assignment) == ["b1"]
    fenced = fk.expire(T + 20.0, False)
    assert [type(c) for c in fenced] == [Log]  # a fenced leader naks nothing
    assert fk.scheduler.snapshot(T + 20)["tiers"]["normal"]["in_flight"] == 0


def test_a_joining_worker_s_news_about_missing_secrets_is_kept_with_its_welcome():
    fk = keeper()
    beat = Heartbeat(worker="w1", slots=2, unusable_keys={"k1": "K1 not set"},
                     in_flight=[InFlight(assignment="a1", key_id="k2", job_id="job-a1")])
    out = fk.heartbeat(beat, T, True)
    assert [(c.level, c.fields) for c in out] == [("error", {"key_id": "k1", "problem": "K1 not set"}),
                                                   ("info", {"worker": "w1", "slots": 2, "in_flight": 1})]
    assert "a1" in fk.fleet.by_assignment
