"""The leader's state machine on `BatchCancelled` (ratefleet cancel): the held jobs of the batch
that wait for a key end at once, uncalled (`failed` / `cancelled`), whatever their tier; the
others stay and are handed out; a fenced leader does nothing. A reviewer found the window's
jobs (64 per tier by default) still called after a cancel: half of a 100-job batch."""

from __future__ import annotations

from leader_helpers import T0, Run, ack, assigned, beat, incoming, machine

from ratefleet.dispatcher.core import commands as cmd
from ratefleet.dispatcher.core import events as ev
from ratefleet.schemas import ErrorCode


def delivered(seq: int, batch: str | None, tier: str = "normal") -> ev.JobDelivered:
    held = incoming(seq, tier=tier)
    held = type(held)(**{**held.__dict__, "job": held.job.model_copy(update={"batch": batch})})
    return ev.JobDelivered(tier, seq, 1, ack(seq, 1), held)


def test_the_held_jobs_of_a_cancelled_batch_end_uncalled_and_the_rest_run():
    run = Run(machine(rps=0.001, burst=1))  # one token: nothing more is handed out for a long while
    run.at(T0, beat("w1", slots=4))
    for seq, batch, tier in ((1, "b1", "normal"), (2, "other", "normal"), (3, "b1", "vip"), (4, None, "normal"),
                             (5, "b1", "normal")):
        run.at(T0 + 1, delivered(seq, batch, tier))
    run.at(T0 + 2, ev.Tick())
    taken = {a.incoming.stream_seq for a in assigned(run.log)}
    assert len(taken) == 1  # the one token
    out = run.at(T0 + 3, ev.BatchCancelled("b1"))
    ended = [c.refused for c in out if isinstance(c, cmd.EndRefused)]
    assert {r.job_id for r in ended} == {f"j{seq}" for seq in (1, 3, 5)} - {f"j{seq}" for seq in taken}
    assert all(r.code == ErrorCode.CANCELLED and r.status == "failed" and r.batch == "b1" for r in ended)
    assert "was cancelled (`ratefleet cancel`) before this job was called" in ended[0].message
    assert set(run.m.held) == {2, 4} - taken  # the other batches' jobs still wait for a key
    again = run.at(T0 + 3, ev.BatchCancelled("b1"))
    assert not [c for c in again if isinstance(c, cmd.EndRefused)]  # nothing left of it


def test_a_fenced_leader_ends_nothing():
    run = Run(machine(lease_until=T0 + 5, rps=0.001, burst=1))
    run.at(T0, delivered(1, "b1"))
    out = run.at(T0 + 10, ev.BatchCancelled("b1"))
    assert not [c for c in out if isinstance(c, cmd.EndRefused)]  # the next leader's to end
