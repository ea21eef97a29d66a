"""The leader's fleet view: when an assignment a worker does not list counts as lost."""

from __future__ import annotations

from ratefleet.dispatcher.core.fleet import AssignmentRecord, Fleet
from ratefleet.schemas.internal import Heartbeat, InFlight


def beat(*listed: str) -> Heartbeat:
    return Heartbeat(worker="w1", slots=4, in_flight=[InFlight(assignment=a, key_id="k1", job_id=a) for a in listed])


def fleet_with(assignment: str, at: float) -> Fleet:
    fleet = Fleet(timeout_s=3.0)
    fleet.beat(beat(), at)
    fleet.assign(AssignmentRecord(assignment, "w1", "j1", "normal", "k1", "$JS.ACK.x", None, at))
    return fleet


def test_missing_from_two_heartbeats_in_a_row_is_lost():
    fleet = fleet_with("d1.1", at=0.0)
    assert fleet.beat(beat(), 2.5)[1] == []  # one heartbeat may be read before the outcome
    lost = fleet.beat(beat(), 3.5)[1]
    assert [r.id for r in lost] == ["d1.1"]
    assert fleet.free_slots() == 4


def test_outcome_read_after_the_heartbeat_is_not_a_loss():
    fleet = fleet_with("d1.1", at=0.0)
    assert fleet.beat(beat(), 2.5)[1] == []
    assert fleet.finish("d1.1") is not None  # the outcome report, read late
    assert fleet.beat(beat(), 3.5)[1] == []


def test_listed_again_starts_the_count_over():
    fleet = fleet_with("d1.1", at=0.0)
    assert fleet.beat(beat(), 2.5)[1] == []
    assert fleet.beat(beat("d1.1"), 3.5)[1] == []
    assert fleet.beat(beat(), 4.5)[1] == []
    assert [r.id for r in fleet.beat(beat(), 5.5)[1]] == ["d1.1"]


def test_young_assignment_is_never_lost():
    fleet = fleet_with("d1.1", at=0.0)
    assert fleet.beat(beat(), 1.0)[1] == []
    assert fleet.beat(beat(), 1.9)[1] == []
    assert fleet.free_slots() == 3
