"""Ending jobs the dispatcher will not run: each gets its one Result (and reply), a dead
letter when it is worth a look, and its JOBS message acked."""

from __future__ import annotations

import time
from datetime import UTC, datetime

from ratefleet.dispatcher.core.delivery import Incoming, Refused
from ratefleet.runtime.finish import Finisher
from ratefleet.runtime.logs import get_logger
from ratefleet.runtime.tracing import trace_id_of
from ratefleet.schemas import ErrorCode, ErrorInfo, Result, Timings
from ratefleet.schemas.result import calls_before

log = get_logger("ratefleet.leader")


async def refuse_incoming(finisher: Finisher, incoming: Incoming, code: ErrorCode, message: str,
                          status: str = "failed") -> None:
    """A valid job the scheduler can never run (e.g. no pool for its upstream): `failed`;
    or one that turned out unsendable after all: `invalid`."""
    log.warning("job refused", job_id=incoming.job_id, tier=incoming.tier, code=code, reason=message)
    submitted = incoming.submitted_at
    result = Result(job_id=incoming.job_id, status=status, tier=incoming.tier, batch=incoming.job.batch,
                    error=ErrorInfo(code=code, message=message), attempts=calls_before(incoming.attempt),
                    metadata=incoming.job.metadata, trace_id=trace_id_of(incoming.traceparent),
                    timings=Timings(submitted_at=datetime.fromtimestamp(submitted, UTC),
                                    total_ms=max(0.0, (time.time() - submitted) * 1000)))
    if await finisher.finish(result, ack=incoming.ack, reply_to=incoming.reply_to):
        await _letter(finisher, incoming.tier, result, job=incoming.job.model_dump(mode="json", by_alias=True))


async def finish_refused(finisher: Finisher, refused: Refused) -> None:
    """A message that ends at intake: invalid, expired, out of attempts, poison, or of a
    cancelled batch (neither logged one by one nor dead-lettered: the cancel is logged once)."""
    cancelled = refused.code == ErrorCode.CANCELLED
    (log.debug if cancelled else log.warning)("job ended at intake", job_id=refused.job_id, tier=refused.tier,
                                              status=refused.status, code=str(refused.code), reason=refused.message)
    job = refused.job
    result = Result(job_id=refused.job_id, status=refused.status, tier=refused.tier, batch=refused.batch,
                    error=ErrorInfo(code=refused.code, message=refused.message), attempts=calls_before(refused.attempt),
                    metadata=job.metadata if job else {})
    stored = await finisher.finish(result, ack=refused.ack, reply_to=refused.reply_to)
    if stored and refused.status != "expired" and not cancelled:
        await _letter(finisher, refused.tier, result, job=job.model_dump(mode="json", by_alias=True) if job else None,
                      raw=None if job else refused.raw)


async def _letter(finisher: Finisher, tier: str, result: Result, **payload) -> None:
    """The dead letter of a job whose Result is stored and acked: a failure here is logged
    (the job is done; nothing comes back), never raised as if the job were not ended."""
    try:
        await finisher.dead(tier, result, **payload)
    except Exception as exc:  # noqa: BLE001 - see docstring
        log.error("dead letter not stored; the job's Result is", job_id=result.job_id, error=type(exc).__name__)
