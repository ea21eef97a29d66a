"""What intake makes of one JOBS delivery: a schedulable job, or the refusal that ends it.

The shell reads the message (`dispatcher/shell/intake.py` `read_message`); the leader's
state machine (`leader.py`) decides what happens to it.
"""

from __future__ import annotations

from dataclasses import dataclass

from ratefleet.schemas import ErrorCode, Job


@dataclass(frozen=True)
class Incoming:
    """A validated job with everything the dispatcher needs to run and finish it.

    `submitted_at`: epoch seconds (the JOBS message timestamp); `stream_seq`: the message's
    sequence in RATEFLEET_JOBS; `ack`: its reply subject (any connection may ack it); `repeat`:
    the message may repeat a job id stored before, past the dedup window (its producer set
    the `Ratefleet-Repeat` header): its Result is looked up before a call, as for a redelivery."""

    job: Job
    job_id: str
    tier: str
    upstream: str
    ack: str
    reply_to: str | None
    attempt: int
    max_attempts: int
    submitted_at: float
    stream_seq: int
    rate_limited: int = 0
    max_rate_limited: int = 50
    # the job's W3C traceparent (from the JOBS message, or a fresh one derived from it) and tracestate
    traceparent: str | None = None
    tracestate: str | None = None
    repeat: bool = False


@dataclass(frozen=True)
class Refused:
    """A message that ends here: an invalid, expired or exhausted job, or a poison message."""

    status: str  # invalid, expired, failed
    code: ErrorCode
    message: str
    job_id: str
    batch: str | None
    tier: str
    ack: str
    reply_to: str | None
    attempt: int
    raw: bytes
    job: Job | None = None


def cancelled_job(incoming: Incoming) -> Refused:
    """A job of a cancelled batch (ratefleet/runtime/cancels.py), ended before any call: `failed`
    / `cancelled`, with no dead letter (nothing is wrong with it)."""
    return Refused("failed", ErrorCode.CANCELLED,
                   f"batch {incoming.job.batch} was cancelled (`ratefleet cancel`) before this job was called",
                   incoming.job_id, incoming.job.batch, incoming.tier, incoming.ack, incoming.reply_to,
                   incoming.attempt, b"", incoming.job)
