"""The Client's submitting side: `submit`, `submit_many`, `submit_stream` (a mixin of Client).

Jobs are validated (`as_job`) and stored durably in RATEFLEET_JOBS; a single publish rides out
a NATS restart with the same id, and many are pipelined with a bounded window of PubAcks.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import deque
from collections.abc import AsyncIterator, Callable, Iterable
from dataclasses import dataclass
from typing import Any

from nats.aio.client import Client as NatsClient
from nats.js import JetStreamContext
from pydantic import ValidationError

from ratefleet.runtime.edge import translated
from ratefleet.runtime.pubpipe import PublishPipe
from ratefleet.runtime.store import MSG_ID, REPEAT_HEADER, TRANSIENT, publish_job, publish_job_ack
from ratefleet.runtime.tracing import current_headers
from ratefleet.schemas import Job, Subjects
from ratefleet.schemas.errors import JobInvalid, JobRejected, JobTooLarge, NatsUnavailable, SubmitError
from ratefleet.schemas.job import describe_validation_error, job_size_limit

JobLike = Job | dict[str, Any]


@dataclass(frozen=True)
class _Checked:
    """A job `checked_job` made, with its payload (`submit_many` checks every job before the
    first publish): sent as it is. A private type, so nothing a caller passes is taken for one."""

    job: Job
    payload: bytes


@dataclass(frozen=True)
class Stored:
    """One job as JetStream acknowledged it. `duplicate`: its id was already stored inside the
    dedup window (`streams.duplicate_window_s`), so this publish added nothing; `seq`: the
    JOBS stream sequence (for a duplicate, that of the message stored first)."""

    job: Job
    duplicate: bool
    seq: int


def as_job(job: JobLike, *, batch: str | None = None) -> Job:
    """Validate a job (model or dict) and give it an id; raise JobInvalid naming the field.

    A Job model is validated again (its fields may have been changed since it was built),
    and the job is serialised once, so that whatever this returns can be sent (`checked_job`
    keeps that JSON for the publish)."""
    return checked_job(job, batch=batch)[0]


def checked_job(job: JobLike, *, batch: str | None = None) -> tuple[Job, bytes]:
    """`as_job`, and the job's JSON (UTF-8 bytes): the one serialisation that proves it can be
    sent is the payload sent, not dumped again per use. Raises JobInvalid."""
    try:
        data = job.model_dump(by_alias=True) if isinstance(job, Job) else job
        if batch is not None and isinstance(data, dict) and data.get("batch") is None:
            data = {**data, "batch": batch}  # validated with the job (model_copy would not check it)
        model = Job.model_validate(data).with_id()
    except ValidationError as exc:
        raise JobInvalid(describe_validation_error(exc)[1]) from None
    try:
        return model, model.to_json()
    except JobRejected as exc:
        raise JobInvalid(exc.message) from None


class Submitting:
    """Client's submit methods; Client provides the connection and `_open`."""

    nc: NatsClient
    js: JetStreamContext
    subjects: Subjects
    _pipes: set[PublishPipe]
    _publishing: int
    _published: asyncio.Event

    def _open(self) -> None:
        raise NotImplementedError  # Client's

    @translated("storing a job")
    async def submit(self, job: JobLike, tier: str, *, batch: str | None = None) -> str:
        """Store one job durably and return its id. Raises QueueFull, JobInvalid, SubmitError,
        NatsUnavailable (this Client is closed)."""
        self._open()
        model, payload = checked_job(job, batch=batch)
        # own id: maybe resent past the dedup window
        await self._publish(tier, model, payload=payload, repeat=_has_own_id(job))
        return model.id

    async def submit_for_reply(self, job: JobLike, tier: str, reply_to: str) -> Job:
        """Store one job durably whose Result is then also published to `reply_to` (subscribe
        there first); a streamed answer's chunks go to `<reply_to>.s` as they are read
        (workers/relay.py). Returns the job as stored. Raises QueueFull, JobInvalid, SubmitError,
        NatsUnavailable (this Client is closed)."""
        self._open()
        model, payload = checked_job(job)
        await self._publish(tier, model, reply_to=reply_to, payload=payload)
        return model

    async def _publish(self, tier: str, model: Job, reply_to: str | None = None, *, payload: bytes,
                       repeat: bool = False) -> bool:
        """Store `model`, whose JSON `checked_job` made (`payload`), after the size check (`_payload`)."""
        payload = self._payload(model, payload)
        async with self._under_way():
            return await publish_job(self.js, self.subjects, tier, model.id, payload, reply_to=reply_to, repeat=repeat)

    @contextlib.asynccontextmanager
    async def _under_way(self) -> AsyncIterator[None]:
        """One single operation (a publish, a stored-Result read) that `close()` lets finish.
        One starting after `close()` began raises NatsUnavailable (closed) at once: it would race
        the drain, which drops its answer (a request's read of its own id's Result then said,
        after 5 s, 'NATS did not answer ... check that NATS runs', while NATS was fine). One
        failing because the Client was closed meanwhile says so too."""
        self._open()
        self._publishing += 1
        self._published.clear()
        try:
            yield
        except Exception:
            self._open()
            raise
        finally:
            self._publishing -= 1
            if not self._publishing:
                self._published.set()

    def _payload(self, model: Job, payload: bytes | None = None) -> bytes:
        """The job's JSON (`payload`, when `checked_job` made it already); JobInvalid when it is
        larger than a job can be on this fleet's NATS server (`job_size_limit`: the server's
        max_payload less what the assignment adds)."""
        payload = payload if payload is not None else model.to_json()
        limit, source = job_size_limit(None, self.nc.max_payload)
        if len(payload) > limit:
            raise JobTooLarge(f"job {model.id} is {len(payload)} bytes; the limit is {limit} ({source})")
        return payload

    @translated("storing jobs")
    async def submit_many(self, jobs: Iterable[JobLike], tier: str, *, batch: str | None = None,
                          concurrency: int = 256, progress: Callable[[int], None] | None = None,
                          repeat: bool = False) -> list[str]:
        """Store many jobs, `concurrency` publishes in flight; returns their ids in order.

        Every job is validated before anything is sent (JobInvalid names the bad one). Each
        publish rides out a NATS restart with the same id. On the first refusal (QueueFull,
        unknown tier) no further job is sent and the error says how many were stored.
        `repeat`: as for `submit_stream` (jobs sent again under ids stored before).
        """
        self._open()
        checked = [_Checked(*checked_job(job, batch=batch)) for job in jobs]
        for item in checked:
            self._payload(item.job, item.payload)  # JobInvalid for a job too large, before anything is sent
        stored = 0
        try:
            # pipelined (one reply subscription, up to `concurrency` PubAcks outstanding): 1.2-2.3x
            # the jobs/s of `concurrency` tasks each awaiting its publish, ~35 % less client CPU
            async with contextlib.aclosing(self._stream(checked, tier, window=max(1, concurrency),
                                                        repeat=repeat)) as stream:
                async for _ in stream:
                    stored += 1
                    if progress:
                        progress(1)
        except (SubmitError, NatsUnavailable) as exc:
            raise type(exc)(f"{exc} ({stored} of {len(checked)} jobs stored before that)") from None
        return [item.job.id for item in checked]

    @translated("storing jobs")
    async def submit_stream(self, jobs: Iterable[JobLike], tier: str, *, window: int = 1024,
                            ack_timeout: float = 10.0, repeat: bool = False) -> AsyncIterator[Stored]:
        """Store jobs as they come, yielding a `Stored` for each, in order. A Job model with an
        id is sent as it is (`as_job` made it); a dict, or a Job without an id, is validated and
        given an id first, as `submit` does (JobInvalid when it fails, nothing more sent).

        Publishes are pipelined with at most `window` unacknowledged at a time, so memory
        stays bounded whatever the length of `jobs`. A publish whose acknowledgement fails or
        takes over `ack_timeout` seconds is redone one by one (same id: dedup-safe; rides out
        a NATS restart). Raises QueueFull / SubmitError on the first refusal; the `Stored`
        already yielded are the jobs stored before it. `repeat`: these jobs may repeat ids
        stored longer ago than `streams.duplicate_window_s` (a batch run again): each is
        marked so that the leader calls it only when it has no Result and no other message of
        its id is held or being called (one Result lookup per job at intake; see README, Wire
        contract).
        """
        async with contextlib.aclosing(self._stream(jobs, tier, window=window, ack_timeout=ack_timeout,
                                                    repeat=repeat)) as stream:
            async for stored in stream:  # (closed with this one: its pipe is let go at once)
                yield stored

    @translated("storing jobs")  # (a NATS error as ours before submit_many counts what was stored)
    async def _stream(self, jobs: Iterable[JobLike | _Checked], tier: str, *, window: int = 1024,
                      ack_timeout: float = 10.0, repeat: bool = False) -> AsyncIterator[Stored]:
        """`submit_stream`, also taking the `_Checked` jobs of `submit_many` (sent as they are)."""
        self._open()
        pending: deque[tuple[Job, bytes, asyncio.Future | None]] = deque()
        async with PublishPipe(self.nc) as pipe:
            self._pipes.add(pipe)
            try:
                self._open()  # closed while the pipe subscribed: it was not there to be abandoned
                async for stored in self._pipeline(pipe, jobs, tier, pending, window, ack_timeout, repeat):
                    yield stored
            finally:
                self._pipes.discard(pipe)
                for _, _, future in pending:  # stopped early: the rest is not waited for
                    if future is not None and not future.cancel() and not future.cancelled():
                        future.exception()  # settled: mark it seen (no "never retrieved" noise)

    async def _pipeline(self, pipe: PublishPipe, jobs: Iterable[JobLike | _Checked], tier: str,
                        pending: deque, window: int, ack_timeout: float, repeat: bool) -> AsyncIterator[Stored]:
        subject = self.subjects.jobs(tier)
        trace = current_headers()  # the caller's span, if any: each job's traceparent
        if repeat:
            trace = {**trace, REPEAT_HEADER: "1"}
        for item in jobs:
            if isinstance(item, _Checked):
                job, payload = item.job, item.payload
            elif isinstance(item, Job) and item.id is not None:
                job, payload = item, self._payload(item)
            else:
                job, payload = checked_job(item)
                payload = self._payload(job, payload)
            try:
                future = await pipe.publish(subject, payload, headers={**trace, MSG_ID: job.id})
            except TRANSIENT:
                future = None  # settled below with the one-by-one publish that retries
            pending.append((job, payload, future))
            while pending and (len(pending) >= window or _settled(pending[0][2])):
                yield await self._settle(tier, *pending.popleft(), ack_timeout, trace)
        while pending:
            yield await self._settle(tier, *pending.popleft(), ack_timeout, trace)

    async def _settle(self, tier: str, job: Job, payload: bytes, future: asyncio.Future | None,
                      ack_timeout: float, trace: dict[str, str]) -> Stored:
        if future is not None:
            try:
                ack = future.result() if future.done() else await asyncio.wait_for(asyncio.shield(future), ack_timeout)
                return Stored(job, bool(ack.duplicate), ack.seq)
            except Exception:  # noqa: BLE001 - refused, lost or late: the one-by-one path says which
                pass
            except asyncio.CancelledError:
                if not future.cancelled() or _being_cancelled():
                    raise
                # (the future alone was cancelled: this Client closing, `_open` below says so)
        self._open()
        ack = await publish_job_ack(self.js, self.subjects, tier, job.id, payload, trace=trace)
        return Stored(job, bool(ack.duplicate), ack.seq)


def _has_own_id(job: JobLike) -> bool:
    """Whether the caller gave the job its id (a generated one cannot have a Result yet)."""
    return (job.id if isinstance(job, Job) else job.get("id")) is not None


def _being_cancelled() -> bool:
    """Whether the current task has a cancellation pending (its own, not a future it awaits)."""
    task = asyncio.current_task()
    return task is not None and task.cancelling() > 0


def _settled(future: asyncio.Future | None) -> bool:
    return future is None or future.done()
