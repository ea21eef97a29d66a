"""The silent_s the leader puts in an assignment (the same monotonic frame as the worker's
last_seen): 0 for a brand-new worker, the time since its last beat later, 0 again once a worker
given up is re-learned (written in review)."""
from __future__ import annotations

import json

from leader_helpers import T0, Run, assigned, beat, delivery, machine


def silent(commands) -> list[float]:
    return [json.loads(a.payload)["silent_s"] for a in assigned(commands)]


def test_silent_s_new_worker_later_and_relearned():
    run = Run(machine(rps=1000.0, burst=100.0))
    assert silent(run.at(T0 + 0.1, beat("w1", slots=1))) == []
    assert silent(run.at(T0 + 0.1, delivery(1))) == [0.0]  # brand-new worker: heard this instant
    # w1 full; its next beat (1 s later) is the last; a slot frees 2.6 s after it
    run.at(T0 + 1.1, beat("w1", slots=2, in_flight=(("d1.1", "k1"),)))
    assert silent(run.at(T0 + 3.7, delivery(2))) == [2.6]
    # given up (housekeeping past worker_timeout_s 3.0), then heard again: silent_s is 0 again
    run.at(T0 + 4.5, delivery(3))
    assert "w1" not in run.m.fleet.workers
    out = run.at(T0 + 5.0, beat("w1", slots=2))
    assert silent(out) == [0.0]  # job 3 (job 2 was nak'd: it comes back as a new delivery)
