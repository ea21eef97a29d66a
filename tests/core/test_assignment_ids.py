"""Assignment ids stay unique when a dispatcher leads again.

A dispatcher keeps its id (`--id d1`, or the same process re-elected after a lost lease) and
each leadership numbers its hand-outs from 1 (`d1.1`, `d1.2`, ...), while the workers still
run calls of its earlier leadership under those very ids; the new leader adopts them from the
workers' heartbeats. A new hand-out under an adopted id replaced the adopted call in the
fleet view: the old call's outcome then freed the new call's slot and key reservation (the
key's count of calls in flight went wrong, so a call past its concurrency could go out,
invariant 3), the old call's worker kept a slot taken and logged "assignment lost" at every
heartbeat, and a worker given both would list only one of them."""

from __future__ import annotations

from leader_helpers import T0, Run, assigned, beat, delivery, machine, outcome

from ratefleet.dispatcher.core import events as ev


def test_a_new_leadership_never_hands_out_an_id_its_workers_still_run():
    run = Run(machine(concurrency=4))
    # the calls d1.1 and d1.3 of this dispatcher's earlier leadership still run on w1
    run.at(T0, beat("w1", 3, in_flight=(("d1.1", "k1"), ("d1.3", "k1"))))
    run.at(T0, beat("w2", 4))
    run.at(T0, ev.Tick())
    sent = []
    for seq in range(1, 4):
        sent += assigned(run.at(T0 + 0.1 * seq, delivery(seq)))
    ids = [a.assignment for a in sent]
    assert len(ids) == 2  # the key's 4 calls: 2 adopted, 2 new
    assert not {"d1.1", "d1.3"} & set(ids) and len(set(ids)) == 2
    fleet = run.m.fleet
    assert {fleet.by_assignment[i].worker for i in ("d1.1", "d1.3")} == {"w1"}
    # the earlier calls end: their slots and the key's are freed (the third job takes one),
    # the new calls keep theirs
    later = assigned(run.at(T0 + 1, outcome("d1.1"))) + assigned(run.at(T0 + 1, outcome("d1.3")))
    assert [a.assignment for a in later] == ["d1.5"]
    assert sorted(fleet.by_assignment) == ["d1.2", "d1.4", "d1.5"]
    assert run.m.scheduler.snapshot(T0 + 1)["keys"]["k1"]["in_flight"] == 3
    assert sum(len(w.assigned) for w in fleet.workers.values()) == 3
