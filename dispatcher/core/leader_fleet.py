"""The leader's worker decisions: heartbeats, outcome reports, silent workers, adoption of
calls in flight, and jobs returned to the queue (invariants 3 and 6)."""

from __future__ import annotations

from ratefleet.schemas.internal import Heartbeat
from ratefleet.schemas.outcome import OutcomeKind

from .commands import Command, Log, Nak
from .fleet import AssignmentRecord, Fleet
from .leader_keys import KeyKeeper
from .scheduler import Scheduler
from .types import Outcome

LOST = Outcome(kind=OutcomeKind.NONE)


class FleetKeeper:
    """Feeds what workers say into the fleet view and the scheduler."""

    def __init__(self, scheduler: Scheduler, fleet: Fleet, keys: KeyKeeper) -> None:
        self.scheduler, self.fleet, self.keys = scheduler, fleet, keys

    def heartbeat(self, beat: Heartbeat, now: float, owned: bool) -> list[Command]:
        """Record a beat; adopt a new worker's calls in flight; return lost assignments."""
        is_new, lost = self.fleet.beat(beat, now)
        out = self.keys.sync_secrets()
        if is_new:
            out += self._adopt(beat, now)
            out.append(Log("info", "worker joined", {"worker": beat.worker, "slots": beat.slots,
                                                     "in_flight": len(beat.in_flight)}))
        for record in lost:
            out.append(Log("warning", "assignment lost on its way; job goes back to the queue",
                           {"job_id": record.job_id, "worker": record.worker}))
            out += self.give_back(record, now, owned)
        return out

    def _adopt(self, beat: Heartbeat, now: float) -> list[Command]:
        """Calls a worker already has in flight (from an earlier leader) count against their keys."""
        out: list[Command] = []
        for item in beat.in_flight:
            if item.assignment in self.fleet.by_assignment:
                continue
            try:
                adopted = self.scheduler.adopt_in_flight(item.key_id, 1, now)
            except ValueError:
                out.append(Log("error", "worker runs a key this dispatcher does not know; deploy one config to "
                                        "the whole fleet", {"worker": beat.worker, "key_id": item.key_id}))
                continue
            for reservation in adopted:
                self.fleet.assign(AssignmentRecord(item.assignment, beat.worker, item.job_id, "?", item.key_id,
                                                   "", reservation, now))
        return out

    def outcome(self, assignment: str, key_id: str, outcome: Outcome, now: float) -> list[Command]:
        """A worker's report: frees the slot, feeds the key (also for calls we did not hand out)."""
        record = self.fleet.finish(assignment, now)
        if record is not None:
            self.scheduler.complete(record.reservation, outcome, now)
        elif outcome.kind != OutcomeKind.NONE:
            self.scheduler.complete_unknown(key_id, outcome, now)
        return self.keys.flush(now)

    def expire(self, now: float, owned: bool) -> list[Command]:
        """Workers silent past the timeout are forgotten; their jobs go back to the queue."""
        out: list[Command] = []
        for worker, records in self.fleet.expire(now):
            out.append(Log("warning", "worker silent; returning its jobs to the queue",
                           {"worker": worker.id, "jobs": len(records)}))
            for record in records:
                out += self.give_back(record, now, owned)
        return out

    def give_back(self, record: AssignmentRecord, now: float, owned: bool) -> list[Command]:
        """Give a job back to the queue. It counts as an attempt: a call may have been made
        (its worker went silent mid-call, or only the outcome report went missing). An adopted
        call has no ack of ours; a fenced leader naks nothing (the message may be another's)."""
        self.scheduler.complete(record.reservation, LOST, now)
        return [Nak(record.ack)] if record.ack and owned else []
