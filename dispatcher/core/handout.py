"""What the leader hands out: its settings, the jobs it holds, and the Assignment a worker
gets for a dispatched job (schemas/internal.py)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from ratefleet.schemas.internal import Assignment

from .delivery import Incoming
from .types import Dispatch


@dataclass(frozen=True)
class LeaderSettings:
    """What the machine needs from the config. `windows`/`max_deliver`: per tier, jobs kept
    in memory and the server's last delivery (`tier_max_deliver`); times in seconds;
    `max_payload`: the NATS server's, bytes; `since`: epoch seconds the leadership began."""

    leader_id: str
    epoch: tuple[int, int]
    windows: Mapping[str, int]
    max_deliver: Mapping[str, int]
    ready_after_s: float
    housekeeping_s: float
    keep_alive_after_s: float
    worker_timeout_s: float
    max_payload: int
    since: float = 0.0


@dataclass
class Held:
    """A job taken in and waiting for a key; `at`/`wall`: when (monotonic/epoch seconds)."""

    incoming: Incoming
    touched: float
    at: float
    wall: float


def build_assignment(settings: LeaderSettings, held: Held, decision: Dispatch, now: float, number: int) -> Assignment:
    """The worker's Assignment for a dispatched held job; `number` makes its id unique in
    this leadership. Its queue time runs from the JOBS message's timestamp to `now`. The job
    goes as JSON text (`job_json`): dumped once here, validated once by the worker.
    `assignment_json` is what is sent: the shell adds the job's trace context (dispatch_spans)."""
    incoming = held.incoming
    queued_s = held.wall + (now - held.at) - incoming.submitted_at
    return Assignment.model_construct(  # every field is already valid: no second validation per hand-out
        id=f"{settings.leader_id}.{number}", job={}, job_json=incoming.job.model_dump_json(by_alias=True, exclude_none=True),
        job_id=incoming.job_id, tier=incoming.tier, upstream=incoming.upstream, key_id=decision.key_id,
        pool=decision.pool, ack=incoming.ack, reply_to=incoming.reply_to, attempt=incoming.attempt,
        max_attempts=incoming.max_attempts, submitted_at=incoming.submitted_at,
        queued_ms=max(0.0, queued_s * 1000), epoch=settings.epoch, seq=incoming.stream_seq,
        denial_final=decision.reservation.denial_final, rate_limited=incoming.rate_limited,
        max_rate_limited=incoming.max_rate_limited, variant=decision.variant)


_NOT_SENT = frozenset({"job", "traceparent", "tracestate"})


def assignment_json(assignment: Assignment) -> bytes:
    """The assignment's JSON without `job` (it goes as `job_json`) and without its trace
    context, which the shell adds in front (`dispatcher/shell/leader.py`), so no key repeats."""
    return assignment.model_dump_json(exclude=_NOT_SENT).encode()
