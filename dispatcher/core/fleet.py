"""The leader's view of the worker fleet: slots, assignments in flight, liveness.

Invariant 3: a token is spent only for a free worker slot. Free slots are the slots a
worker announced minus the assignments this dispatcher handed it and has not seen finish.

Workers report the keys whose secret they cannot use (`Heartbeat.unusable_keys`); a job on
such a key goes only to a worker that holds it, and a key no live worker holds is out of
rotation (`missing_everywhere`).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from ratefleet.schemas.internal import UNLISTED_LOST_S, Heartbeat

from .types import Reservation

# seconds a call's end is remembered (Fleet.ended_since): longer than a delivery's Result lookup
# may take (puller.py: STORED_LOOKUP_S, then the answer cache's, 2 s each)
ENDED_KEPT_S = 30.0
ADOPTED = "\x00adopted"  # Fleet.ended's batch of a call adopted from a heartbeat (its batch not known)


@dataclass
class AssignmentRecord:
    id: str
    worker: str
    job_id: str
    tier: str
    key_id: str
    ack: str
    reservation: Reservation
    at: float
    missed: int = 0  # heartbeats in a row that did not list it
    seq: int | None = None  # the JOBS message's stream sequence (None: a call adopted from a heartbeat)
    batch: str | None = None  # the job's batch (known for the calls this leader handed out)


@dataclass
class WorkerState:
    id: str
    slots: int
    last_seen: float
    draining: bool = False
    assigned: dict[str, AssignmentRecord] = field(default_factory=dict)
    info: dict[str, Any] = field(default_factory=dict)
    unusable: dict[str, str] = field(default_factory=dict)  # key id -> why its secret is unusable here

    @property
    def free(self) -> int:
        return 0 if self.draining else max(0, self.slots - len(self.assigned))


class Fleet:
    def __init__(self, timeout_s: float) -> None:
        self.timeout_s = timeout_s
        self.workers: dict[str, WorkerState] = {}
        self.by_assignment: dict[str, AssignmentRecord] = {}
        self.by_seq: dict[int, str] = {}  # stream sequence -> the assignment calling it
        self.adopted: dict[str, str] = {}  # job id -> a call adopted from a heartbeat (its sequence unknown)
        self.by_job: dict[tuple[str, str | None], int] = {}  # (job id, batch) -> the sequence being called
        # (job id, batch) -> when (monotonic) its call last ended here, the last ENDED_KEPT_S seconds
        self.ended: OrderedDict[tuple[str, str | None], float] = OrderedDict()

    def calling(self, seq: int, job_id: str | None = None) -> bool:
        """Whether a worker has the JOBS message `seq` in hand (handed out, not finished): one
        this leader handed out, or a call of an earlier leadership (known by its job id only)."""
        return seq in self.by_seq or (job_id is not None and job_id in self.adopted)

    def calling_seq(self, job_id: str, batch: str | None = None) -> int | None:
        """The stream sequence of the message of job `job_id` in `batch` a worker is calling
        (handed out by this leader), or None."""
        return self.by_job.get((job_id, batch))

    def ended_since(self, job_id: str, batch: str | None, at: float) -> bool:
        """Whether a call of job `job_id` in `batch` handed out here ended at or after `at`
        (monotonic seconds; remembered for ENDED_KEPT_S): a Result lookup sent at `at` may have
        missed the Result that call stored."""
        ended = self.ended.get((job_id, batch))
        if ended is None:  # a call adopted from an earlier leadership is known by its job id only
            ended = self.ended.get((job_id, ADOPTED))
        return ended is not None and ended >= at

    def beat(self, hb: Heartbeat, now: float) -> tuple[bool, list[AssignmentRecord]]:
        """Record a heartbeat. Returns (is_new_worker, assignments the worker no longer has).

        An assignment older than UNLISTED_LOST_S (2 s) that two heartbeats in a row do not list was
        lost on the way (or its outcome was): the caller returns the job to the queue. One
        heartbeat is not enough: heartbeats and outcome reports are read by different tasks,
        so a heartbeat may be read before the outcome that was sent ahead of it.
        """
        state = self.workers.get(hb.worker)
        is_new = state is None
        if state is None:
            state = self.workers[hb.worker] = WorkerState(hb.worker, hb.slots, now)
        state.slots, state.last_seen, state.draining = hb.slots, now, hb.draining
        state.info = {"pid": hb.pid, "host": hb.host, "calls": hb.calls, "started_at": hb.started_at, "http": hb.http,
                      "config_revision": hb.config_revision}
        state.unusable = dict(hb.unusable_keys)
        listed = {item.assignment for item in hb.in_flight}
        lost: list[AssignmentRecord] = []
        for record in state.assigned.values():
            if record.id in listed or now - record.at <= UNLISTED_LOST_S:
                record.missed = 0
                continue
            record.missed += 1
            if record.missed >= 2:
                lost.append(record)
        for record in lost:
            self.finish(record.id, now)
        return is_new, lost

    def free_slots(self) -> int:
        return sum(w.free for w in self.workers.values())

    def total_slots(self) -> int:
        return sum(w.slots for w in self.workers.values() if not w.draining)

    def pick(self, key_id: str | None = None) -> WorkerState | None:
        """The worker with the most free slots (among those holding `key_id`'s secret)."""
        holders = (w for w in self.workers.values() if key_id is None or key_id not in w.unusable)
        best = max(holders, key=lambda w: w.free, default=None)
        return best if best is not None and best.free > 0 else None

    def keys_without_free_holder(self, key_ids: Iterable[str]) -> frozenset[str]:
        """Keys no worker with a free slot can call now (cheap when every worker holds every key)."""
        if not any(w.unusable for w in self.workers.values()):
            return frozenset()
        free = [w for w in self.workers.values() if w.free > 0]
        return frozenset(k for k in key_ids if all(k in w.unusable for w in free))

    def missing_everywhere(self, key_ids: Iterable[str]) -> dict[str, str]:
        """{key id: reason} for keys whose secret no live worker can use (none when no worker
        is known: then nothing can be said)."""
        live = [w for w in self.workers.values() if not w.draining] or list(self.workers.values())
        if not live:
            return {}
        out: dict[str, str] = {}
        for key_id in key_ids:
            reasons = [w.unusable[key_id] for w in live if key_id in w.unusable]
            if len(reasons) == len(live):
                out[key_id] = "; ".join(sorted(set(reasons)))
        return out

    def assign(self, record: AssignmentRecord) -> None:
        self.workers[record.worker].assigned[record.id] = record
        self.by_assignment[record.id] = record
        if record.seq is not None:
            self.by_seq[record.seq] = record.id
            self.by_job[(record.job_id, record.batch)] = record.seq
        else:
            self.adopted[record.job_id] = record.id

    def finish(self, assignment_id: str, now: float | None = None) -> AssignmentRecord | None:
        """Forget a call (ended, lost, or never sent); `now`: when, for `ended_since`."""
        record = self.by_assignment.pop(assignment_id, None)
        if record is not None:
            self._forget_seq(record, now)
            if record.worker in self.workers:
                self.workers[record.worker].assigned.pop(assignment_id, None)
        return record

    def _forget_seq(self, record: AssignmentRecord, now: float | None) -> None:
        if record.seq is not None and self.by_seq.get(record.seq) == record.id:
            del self.by_seq[record.seq]
            if self.by_job.get((record.job_id, record.batch)) == record.seq:
                del self.by_job[(record.job_id, record.batch)]
            if now is not None:
                self._ended(record.job_id, record.batch, now)
        elif record.seq is None and self.adopted.get(record.job_id) == record.id:
            del self.adopted[record.job_id]
            if now is not None:
                self._ended(record.job_id, ADOPTED, now)

    def _ended(self, job_id: str, batch: str | None, now: float) -> None:
        key = (job_id, batch)
        self.ended[key] = now
        self.ended.move_to_end(key)  # kept in the order they ended: the oldest go first
        while self.ended:
            if next(iter(self.ended.values())) > now - ENDED_KEPT_S:
                break
            self.ended.popitem(last=False)

    def expire(self, now: float) -> list[tuple[WorkerState, list[AssignmentRecord]]]:
        """Remove workers silent for longer than the timeout; return them with their assignments."""
        dead = [w for w in self.workers.values() if now - w.last_seen > self.timeout_s]
        out: list[tuple[WorkerState, list[AssignmentRecord]]] = []
        for worker in dead:
            records = list(worker.assigned.values())
            for record in records:
                self.by_assignment.pop(record.id, None)
                self._forget_seq(record, now)
            del self.workers[worker.id]
            out.append((worker, records))
        return out

    def snapshot(self, now: float) -> list[dict[str, Any]]:
        return [{"id": w.id, "slots": w.slots, "in_flight": len(w.assigned), "free": w.free, "draining": w.draining,
                 "last_seen_s": round(now - w.last_seen, 2), "unusable_keys": w.unusable, **w.info}
                for w in self.workers.values()]
