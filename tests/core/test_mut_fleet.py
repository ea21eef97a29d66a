"""The leader's view of the worker fleet (dispatcher/core/fleet.py) driven at named instants:
free slots per worker, which worker gets the next call (most free slots, holding the key's
secret), when an assignment counts as lost (two heartbeats in a row older than 2 s that do
not list it), keys no worker can call, silent workers and the status snapshot. A wrong count
here spends a token without a free slot (invariant 3) or returns a running job to the queue."""

from __future__ import annotations

import pytest

from ratefleet.dispatcher.core.fleet import AssignmentRecord, Fleet
from ratefleet.dispatcher.core.types import PendingJob, Reservation
from ratefleet.schemas.internal import Heartbeat, InFlight

T = 1_000.0


def hb(worker: str = "w1", slots: int = 4, listed: tuple[str, ...] = (), **kw) -> Heartbeat:
    items = [InFlight(assignment=a, key_id="k1", job_id=f"j-{a}") for a in listed]
    return Heartbeat(worker=worker, slots=slots, in_flight=items, **kw)


def record(aid: str, worker: str = "w1", at: float = T) -> AssignmentRecord:
    job = PendingJob(f"j-{aid}", "normal", "u")
    reservation = Reservation(1, job, "k1", "p", 1.0, 0, at, False)
    return AssignmentRecord(aid, worker, job.job_id, "normal", "k1", f"ack-{aid}", reservation, at)


def fleet_with(*beats: Heartbeat, at: float = T, timeout_s: float = 10.0) -> Fleet:
    fleet = Fleet(timeout_s)
    for beat in beats:
        fleet.beat(beat, at)
    return fleet


def test_a_new_worker_is_announced_once_and_keeps_its_assignments():
    fleet = Fleet(10.0)
    assert fleet.beat(hb(slots=3), T) == (True, [])
    fleet.assign(record("a1"))
    assert fleet.beat(hb(slots=5, listed=("a1",)), T + 1) == (False, [])
    worker = fleet.workers["w1"]
    assert (worker.id, worker.slots, worker.last_seen, worker.free) == ("w1", 5, T + 1, 4)
    assert fleet.by_assignment["a1"] is worker.assigned["a1"] is not None
    assert fleet.free_slots() == 4


def test_free_slots_are_announced_slots_minus_assignments_and_none_while_draining():
    fleet = fleet_with(hb("w1", 3), hb("w2", 2))
    for aid in ("a1", "a2"):
        fleet.assign(record(aid, "w1"))
    assert [w.free for w in fleet.workers.values()] == [1, 2] and fleet.free_slots() == 3
    fleet.beat(hb("w2", 2, draining=True), T)
    assert fleet.free_slots() == 1
    fleet.beat(hb("w1", 1, listed=("a1", "a2")), T)  # fewer slots than calls: none free, not -1
    assert fleet.free_slots() == 0


# times (seconds after the assignment) of the heartbeats, which of them list it, and the beat
# (index) at which it is reported lost (None: never)
@pytest.mark.parametrize("beats, lost_at", [
    ([(2.5, False), (3.0, False)], 1),
    ([(2.5, False)], None),  # one beat is not enough
    ([(1.0, False), (1.5, False), (2.0, False)], None),  # 2 s old or younger: not counted
    ([(2.0, False), (2.5, False)], None),  # exactly 2 s: not counted yet
    ([(2.5, False), (2.9, False)], 1),
    ([(2.5, True), (3.0, True), (4.0, True)], None),  # listed: never lost
    ([(2.5, False), (3.0, True), (3.5, False)], None),  # a listing beat resets the count
    ([(2.5, False), (3.0, True), (3.5, False), (4.0, False)], 3),
    ([(2.5, False), (2.8, False), (3.0, False)], 1),
])
def test_an_assignment_is_lost_after_two_heartbeats_in_a_row_without_it(beats, lost_at):
    fleet = fleet_with(hb())
    fleet.assign(record("a1", at=T))
    got = None
    for i, (after, listed) in enumerate(beats):
        is_new, lost = fleet.beat(hb(listed=("a1",) if listed else ()), T + after)
        assert not is_new
        if lost:
            assert got is None and [r.id for r in lost] == ["a1"]
            got = i
    assert got == lost_at
    assert ("a1" in fleet.by_assignment) == (lost_at is None)
    assert fleet.free_slots() == (3 if lost_at is None else 4)


def test_every_assignment_is_checked_not_only_the_first():
    fleet = fleet_with(hb())
    fleet.assign(record("young", at=T + 2))
    fleet.assign(record("listed", at=T))
    fleet.assign(record("gone", at=T))
    lost = []
    for now in (T + 3, T + 3.5):
        lost += fleet.beat(hb(listed=("listed",)), now)[1]
    assert [r.id for r in lost] == ["gone"]
    assert sorted(fleet.by_assignment) == sorted(fleet.workers["w1"].assigned) == ["listed", "young"]


def test_heartbeat_details_and_the_snapshot():
    fleet = Fleet(10.0)
    fleet.beat(hb("w1", 4, pid=42, host="h1", calls=7, started_at=5.5, http="http://h1:9", config_revision=3,
                  unusable_keys={"k2": "K2 not set"}), T)
    fleet.assign(record("a1"))
    assert fleet.snapshot(T + 1.23456) == [{
        "id": "w1", "slots": 4, "in_flight": 1, "free": 3, "draining": False, "last_seen_s": 1.23,
        "unusable_keys": {"k2": "K2 not set"}, "pid": 42, "host": "h1", "calls": 7, "started_at": 5.5,
        "http": "http://h1:9", "config_revision": 3}]
    fleet.beat(hb("w1", 4, draining=True), T + 2)  # a beat without them clears the keys it named
    snap = fleet.snapshot(T + 2)[0]
    assert (snap["unusable_keys"], snap["draining"], snap["free"], snap["last_seen_s"]) == ({}, True, 0, 0.0)


def test_pick_takes_the_worker_with_most_free_slots_that_holds_the_key():
    fleet = fleet_with(hb("w1", 2), hb("w2", 5, unusable_keys={"k1": "no secret"}), hb("w3", 3))
    assert fleet.pick().id == "w2"
    assert fleet.pick("k1").id == "w3"
    assert fleet.pick("k9").id == "w2"
    fleet.assign(record("a1", "w3"))
    fleet.assign(record("a2", "w3"))
    assert fleet.pick("k1").id == "w1"  # 2 free beat 1 free


def test_pick_needs_a_free_slot_and_a_worker():
    assert Fleet(10.0).pick() is None and Fleet(10.0).pick("k1") is None
    fleet = fleet_with(hb("w1", 1), hb("w2", 1, unusable_keys={"k1": "no secret"}))
    assert fleet.pick("k1").id == "w1"  # exactly one free slot is enough
    fleet.assign(record("a1", "w1"))
    assert fleet.pick("k1") is None  # the only holder is full; w2 cannot call k1
    assert fleet.pick().id == "w2"
    fleet.assign(record("a2", "w2"))
    assert fleet.pick() is None


def test_keys_without_free_holder():
    fleet = fleet_with(hb("w1", 1), hb("w2", 2, unusable_keys={"k1": "no secret", "k2": "no secret"}))
    assert fleet.keys_without_free_holder(["k1", "k2", "k3"]) == frozenset()  # w1 (1 free) holds all
    fleet.assign(record("a1", "w1"))
    assert fleet.keys_without_free_holder(["k1", "k2", "k3"]) == frozenset({"k1", "k2"})
    # every worker holds every key: nothing is missing, even when all are full
    full = fleet_with(hb("w1", 1))
    full.assign(record("a1", "w1"))
    assert full.keys_without_free_holder(["k1"]) == frozenset()


def test_missing_everywhere_names_the_keys_no_live_worker_holds_with_their_reasons():
    assert Fleet(10.0).missing_everywhere(["k1"]) == {}
    fleet = fleet_with(hb("w1", unusable_keys={"k1": "K1 not set", "k2": "K2 not set"}),
                       hb("w2", unusable_keys={"k1": "K1 empty", "k2": "K2 not set"}),
                       hb("w3", draining=True))  # a draining worker does not count while others live
    assert fleet.missing_everywhere(["k1", "k2", "k3"]) == {"k1": "K1 empty; K1 not set", "k2": "K2 not set"}
    fleet.beat(hb("w2", unusable_keys={"k2": "K2 not set"}), T)
    assert fleet.missing_everywhere(["k1", "k2"]) == {"k2": "K2 not set"}
    draining = fleet_with(hb("w1", draining=True, unusable_keys={"k1": "K1 not set"}),
                          hb("w2", draining=True))  # all draining: they are the fleet
    assert draining.missing_everywhere(["k1"]) == {}
    draining.beat(hb("w2", draining=True, unusable_keys={"k1": "K1 not set"}), T)
    assert draining.missing_everywhere(["k1"]) == {"k1": "K1 not set"}


def test_finish_frees_the_slot_once_and_ignores_unknown_assignments():
    fleet = fleet_with(hb("w1", 2))
    fleet.assign(record("a1"))
    assert fleet.finish("nope") is None
    done = fleet.finish("a1")
    assert done is not None and done.id == "a1"
    assert fleet.free_slots() == 2 and fleet.by_assignment == {}
    assert fleet.finish("a1") is None


def test_a_worker_silent_past_the_timeout_is_removed_with_its_assignments():
    fleet = fleet_with(hb("w1", 2), hb("w2", 2), timeout_s=10.0)
    fleet.beat(hb("w2", 2), T + 5)
    fleet.assign(record("a1", "w1"))
    fleet.assign(record("a2", "w2"))
    assert fleet.expire(T + 10.0) == []  # exactly the timeout: still alive
    gone = fleet.expire(T + 10.5)
    assert [(w.id, [r.id for r in records]) for w, records in gone] == [("w1", ["a1"])]
    assert list(fleet.workers) == ["w2"] and list(fleet.by_assignment) == ["a2"]
    assert fleet.finish("a1") is None
