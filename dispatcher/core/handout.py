"""What the leader hands out: its settings, the jobs it holds, and the Assignment a worker
gets for a dispatched job (schemas/internal.py `Assignment`)."""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass

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


def assignment_payload(settings: LeaderSettings, held: Held, decision: Dispatch, now: float,
                       number: int) -> tuple[str, bytes]:
    """The id and JSON of the worker's Assignment (schemas/internal.py) for a dispatched held
    job; `number` makes the id unique in this leadership. Its queue time runs from the JOBS
    message's timestamp to `now`. The job goes as JSON text (`job_json`): dumped once here,
    validated once by the worker. Every field is valid already, so the JSON is written
    straight from them (no model built per hand-out); `job` is left out (`job_json` has it)
    and so is the trace context, which the shell puts in front (dispatcher/shell/assign_out.py).
    The JSON is UTF-8, not ASCII-escaped. Raises pydantic's serialisation error for a job that
    cannot be dumped."""
    incoming = held.incoming
    queued_s = held.wall + (now - held.at) - incoming.submitted_at
    assignment_id = f"{settings.leader_id}.{number}"
    fields = {
        "id": assignment_id, "job_json": incoming.job.model_dump_json(by_alias=True, exclude_none=True),
        "job_id": incoming.job_id, "tier": incoming.tier, "upstream": incoming.upstream, "key_id": decision.key_id,
        "pool": decision.pool, "ack": incoming.ack, "reply_to": incoming.reply_to, "attempt": incoming.attempt,
        "max_attempts": incoming.max_attempts, "submitted_at": incoming.submitted_at,
        "queued_ms": max(0.0, queued_s * 1000), "epoch": settings.epoch, "seq": incoming.stream_seq,
        "denial_final": decision.reservation.denial_final, "rate_limited": incoming.rate_limited,
        "max_rate_limited": incoming.max_rate_limited, "variant": decision.variant,
    }
    # ensure_ascii=False: the job text stays UTF-8 inside the string (escaped, an emoji is 12
    # bytes instead of 4: a 600 KB job of emoji made a 1.8 MB assignment, over max_payload)
    return assignment_id, json.dumps(fields, separators=(",", ":"), allow_nan=False, ensure_ascii=False).encode()
