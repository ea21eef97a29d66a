"""What the leader hands out: its settings, the jobs it holds, and the Assignment a worker
gets for a dispatched job (schemas/internal.py `Assignment`)."""

from __future__ import annotations

import math
from collections.abc import Container, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

from pydantic_core import to_json

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


class HeldJobs(dict[int, "Held"]):
    """The held jobs by stream sequence, with the sequence of each job (id and batch,
    `seq_of`): a second JOBS message of a job (its id sent again past the dedup window) is
    known at intake while the first is held. Only item assignment, `pop` and `clear` change it."""

    def __init__(self) -> None:
        super().__init__()
        self._seqs: dict[tuple[str, str | None], int] = {}  # (job id, batch) -> the sequence of its held message

    def __setitem__(self, seq: int, held: Held) -> None:
        super().__setitem__(seq, held)
        self._seqs[_job_key(held.incoming)] = seq

    def pop(self, seq: int, *default: Any) -> Any:
        held = super().pop(seq, *default)
        if isinstance(held, Held) and self._seqs.get(_job_key(held.incoming)) == seq:
            del self._seqs[_job_key(held.incoming)]
        return held

    def clear(self) -> None:
        super().clear()
        self._seqs.clear()

    def seq_of(self, job_id: str, batch: str | None = None) -> int | None:
        """The stream sequence of the held message of job `job_id` in `batch`, or None."""
        return self._seqs.get((job_id, batch))


def _job_key(incoming: Incoming) -> tuple[str, str | None]:
    return incoming.job_id, incoming.job.batch


def assignment_id(leader_id: str, number: int) -> str:
    """The id of a dispatcher's `number`-th hand-out in a leadership: `{leader_id}.{number}`."""
    return f"{leader_id}.{number}"


def next_number(numbers: Iterator[int], leader_id: str, running: Container[str]) -> int:
    """The next of `numbers` whose assignment id is not in `running` (the calls the fleet
    tracks). A dispatcher that leads again keeps its id and numbers from 1 while the workers
    still run calls of its earlier leadership under those ids; the leader adopts them from the
    workers' first heartbeats, before its first hand-out (`ready_after_s`), and a new call
    under one of them would be taken for the old one (its outcome, its slot)."""
    number = next(numbers)
    while assignment_id(leader_id, number) in running:
        number = next(numbers)
    return number


def assignment_payload(settings: LeaderSettings, held: Held, decision: Dispatch, now: float,
                       number: int, silent_s: float = 0.0) -> tuple[str, bytes]:
    """The id and JSON of the worker's Assignment (schemas/internal.py) for a dispatched held
    job; `number` makes the id unique in this leadership (`next_number`: and among the calls
    still running from an earlier one). Its queue time runs from the JOBS
    message's timestamp to `now`. The job goes as JSON text (`job_json`): dumped once here,
    validated once by the worker. Every field is valid already, so the JSON is written
    straight from them (no model built per hand-out); `job` is left out (`job_json` has it)
    and so is the trace context, which the shell puts in front (dispatcher/shell/assign_out.py).
    The JSON is UTF-8, not ASCII-escaped. Raises pydantic's serialisation error for a job that
    cannot be dumped, ValueError for a time that is NaN or infinite. `silent_s`: seconds
    since the leader last heard the receiving worker (`Assignment.silent_s`)."""
    incoming = held.incoming
    queued_s = held.wall + (now - held.at) - incoming.submitted_at
    new_id = assignment_id(settings.leader_id, number)
    queued_ms, silent_s = max(0.0, queued_s * 1000), round(max(0.0, silent_s), 3)
    if not (math.isfinite(incoming.submitted_at) and math.isfinite(queued_ms) and math.isfinite(silent_s)):
        # NaN and Infinity are not JSON (RFC 8259 section 6), and to_json below would write them
        raise ValueError(f"a time of the assignment is not a finite number: submitted_at {incoming.submitted_at}, "
                         f"queued_ms {queued_ms}, silent_s {silent_s}")
    fields = {
        "id": new_id, "job_json": incoming.job.model_dump_json(by_alias=True, exclude_none=True),
        "job_id": incoming.job_id, "tier": incoming.tier, "upstream": incoming.upstream, "key_id": decision.key_id,
        "pool": decision.pool, "ack": incoming.ack, "reply_to": incoming.reply_to, "attempt": incoming.attempt,
        "max_attempts": incoming.max_attempts, "submitted_at": incoming.submitted_at,
        "queued_ms": queued_ms, "epoch": settings.epoch, "seq": incoming.stream_seq,
        "denial_final": decision.reservation.denial_final, "rate_limited": incoming.rate_limited,
        "max_rate_limited": incoming.max_rate_limited, "variant": decision.variant,
        "silent_s": silent_s,
    }
    # pydantic-core's encoder, compact and UTF-8 (not ASCII-escaped: an emoji escaped is 12 bytes
    # instead of 4, and a 600 KB job of emoji made a 1.8 MB assignment, over max_payload), writes the
    # job's text into its string 3x faster than json.dumps (33 against 97 µs for a 32 KiB job); the
    # floats were checked above, the rest are counts
    return new_id, to_json(fields)
