"""The Python client: submit jobs, await one reply, follow a batch's results.

    async with await Client.connect("nats://127.0.0.1:4222") as client:
        await client.submit(job, tier="normal")                 # durable once it returns
        result = await client.request(job, tier="vip", timeout=30)
        async for result in client.results(batch="nightly-0412"): ...

A Result whose body was too large to travel inside it (`response.body_ref`) comes back from
every method here with the body fetched from the fleet's Object Store and filled in.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
from collections import deque
from collections.abc import AsyncIterator, Callable, Iterable
from dataclasses import dataclass
from typing import Any

from nats.aio.client import Client as NatsClient
from nats.errors import NoRespondersError
from nats.js.api import DeliverPolicy
from nats.js.errors import NotFoundError
from pydantic import ValidationError

from ratefleet.runtime.bodies import BodyStore
from ratefleet.runtime.connect import connect, denial_expected, refused
from ratefleet.runtime.edge import translated
from ratefleet.runtime.pubpipe import PublishPipe
from ratefleet.runtime.replies import ReplyInbox
from ratefleet.runtime.store import (
    MSG_ID,
    READ_RETRY_S,
    REPEAT_HEADER,
    TRANSIENT,
    publish_job,
    publish_job_ack,
    read_result,
    retrying,
)
from ratefleet.runtime.tracing import current_headers
from ratefleet.schemas import Job, Result, Subjects
from ratefleet.schemas.config import DEFAULT_NATS_URL
from ratefleet.schemas.config_nats import NatsAuthConfig
from ratefleet.schemas.errors import (
    DispatcherUnavailable,
    JobInvalid,
    JobRejected,
    NatsError,
    NatsUnavailable,
    RequestTimeout,
    SubmitError,
)
from ratefleet.schemas.job import describe_validation_error, job_size_limit
from ratefleet.schemas.subjects import is_token

JobLike = Job | dict[str, Any]
WHY_TIMEOUT_S = 0.5  # the status request that says why a `request` timed out
WHY_SHARED_S = 1.0  # a status answer saying why requests time out serves those timing out within this
CLOSE_GRACE_S = 5.0  # how long `close()` lets the single publishes under way get their acknowledgements


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
    and the job is serialised once, so that whatever this returns can be sent."""
    try:
        data = job.model_dump(by_alias=True) if isinstance(job, Job) else job
        if batch is not None and isinstance(data, dict) and data.get("batch") is None:
            data = {**data, "batch": batch}  # validated with the job (model_copy would not check it)
        model = Job.model_validate(data)
    except ValidationError as exc:
        raise JobInvalid(describe_validation_error(exc)[1]) from None
    try:
        model.to_json()
    except JobRejected as exc:
        raise JobInvalid(exc.message) from None
    return model.with_id()


class Client:
    """A producer's connection to the fleet: submit jobs, request one Result, read results,
    ask for the status. Every failure ratefleet knows about is raised as a RatefleetError
    subclass (schemas/errors.py); nats-py and httpx exceptions never reach the caller
    (they are translated at runtime/edge.py)."""

    def __init__(self, nc: NatsClient, prefix: str = "ratefleet"):
        self.nc = nc
        self.js = nc.jetstream()
        self.subjects = Subjects(prefix)
        self.bodies = BodyStore(self.js, self.subjects.bodies_bucket)
        self.replies = ReplyInbox(nc)  # one reply subscription for every `request`
        self._closed_here = False  # `close()` was called (else a closed connection gave up reconnecting)
        self._pipes: set[PublishPipe] = set()  # those of the `submit_stream`s under way, abandoned on close
        self._publishing = 0  # single publishes (submit, request) under way, which `close()` lets finish
        self._published = asyncio.Event()  # set whenever none is under way
        self._published.set()
        self._why: tuple[float, asyncio.Future[tuple[str | None, str]]] | None = None  # (asked at, answer)

    @classmethod
    async def connect(cls, url: str = DEFAULT_NATS_URL, *, prefix: str = "ratefleet",
                      name: str = "ratefleet-client", auth: NatsAuthConfig | None = None,
                      connect_timeout: float = 5.0, reconnect_forever: bool = True) -> Client:
        """Connect to the fleet's NATS at `url` (credentials may ride in it: `nats://user:password@host`;
        several servers: comma-separated).

        `auth`: credentials and TLS, e.g. `load_config(...).nats`, or
        `NatsAuthConfig(user="producer", password="env:NATS_PASSWORD", inbox_prefix="_INBOX.producer",
        tls_ca="ca.pem")` (secrets as `env:NAME`, `file:PATH` or the value itself). Raises
        NatsUnavailable (nothing answers: at once, or after `connect_timeout` seconds per server
        when something answers TCP but no NATS handshake comes; or the server refused the
        credentials: at once) and ConfigError (`url` is no NATS URL, or a secret reference cannot
        be read); neither message holds a credential.

        `reconnect_forever` (default True, what a long-lived service wants): a connection lost
        later is re-established for as long as NATS is away; meanwhile `submit` fails after its
        30 s of retries and `request` after its `timeout`, and both work again once NATS is back.
        False (the CLI's commands): give up after about 30 s of reconnecting; the Client is closed
        then and every call raises NatsUnavailable at once, saying so."""
        nc = await connect(url, name=name, forever=reconnect_forever, fail_fast=True, auth=auth,
                           connect_timeout=connect_timeout)
        return cls(nc, prefix)

    async def __aenter__(self) -> Client:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    @translated("closing the connection")
    async def close(self) -> None:
        """Close the connection. A `submit` under way (and a `request` storing its job) gets its
        acknowledgement first, for up to CLOSE_GRACE_S seconds while connected, so it returns as
        usual. Other calls under way end at once: a `request` waiting for its Result and a
        `submit_many` / `submit_stream` waiting for acknowledgements raise NatsUnavailable saying
        the Client was closed (their jobs stored so far still run); every later call raises it
        too. Never raises for NATS being away (then nothing is flushed or waited for)."""
        self._closed_here = True
        self.replies.abandon()
        for pipe in list(self._pipes):
            pipe.abandon()
        if self.nc.is_closed or self.nc.is_draining:
            return
        if self.nc.is_connected:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._published.wait(), CLOSE_GRACE_S)
        if self.nc.is_connected:
            try:
                await self.nc.drain()
                return
            except Exception:  # noqa: BLE001 - NATS went away while draining: close without it
                pass
        await self.nc.close()  # reconnecting: nothing can be flushed, and the reconnects must stop

    def _open(self) -> None:
        """NatsUnavailable at once when this Client's connection is closed or closing: nothing
        sent through it could arrive (before, a submit retried a closed connection for 30 s and
        then asked whether the NATS server was up)."""
        if not (self.nc.is_closed or self.nc.is_draining or self._closed_here):
            return
        why = ("Client.close() was called, or its `async with` block ended" if self._closed_here else
               "its connection was closed: it gives up after about 30 s of NATS unreachable with "
               "reconnect_forever=False")
        raise NatsUnavailable(f"this Client is closed ({why}); connect a new one with Client.connect")

    @translated("storing a job")
    async def submit(self, job: JobLike, tier: str, *, batch: str | None = None) -> str:
        """Store one job durably and return its id. Raises QueueFull, JobInvalid, SubmitError,
        NatsUnavailable (this Client is closed)."""
        self._open()
        model = as_job(job, batch=batch)
        await self._publish(tier, model, repeat=_has_own_id(job))  # own id: maybe resent past the dedup window
        return model.id

    async def submit_for_reply(self, job: JobLike, tier: str, reply_to: str) -> Job:
        """Store one job durably whose Result is then also published to `reply_to` (subscribe
        there first); a streamed answer's chunks go to `<reply_to>.s` as they are read
        (workers/relay.py). Returns the job as stored. Raises QueueFull, JobInvalid, SubmitError,
        NatsUnavailable (this Client is closed)."""
        self._open()
        model = as_job(job)
        await self._publish(tier, model, reply_to=reply_to)
        return model

    async def _publish(self, tier: str, model: Job, reply_to: str | None = None, payload: bytes | None = None,
                       *, repeat: bool = False) -> bool:
        payload = payload if payload is not None else self._payload(model)
        self._publishing += 1
        self._published.clear()
        try:
            return await publish_job(self.js, self.subjects, tier, model.id, payload, reply_to=reply_to, repeat=repeat)
        finally:
            self._publishing -= 1
            if not self._publishing:
                self._published.set()

    def _payload(self, model: Job) -> bytes:
        """The job's JSON; JobInvalid when it is larger than a job can be on this fleet's NATS
        server (`job_size_limit`: the server's max_payload less what the assignment adds)."""
        payload = model.to_json()
        limit, source = job_size_limit(None, self.nc.max_payload)
        if len(payload) > limit:
            raise JobInvalid(f"job {model.id} is {len(payload)} bytes; the limit is {limit} ({source})")
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
        models = [as_job(job, batch=batch) for job in jobs]
        for model in models:
            self._payload(model)  # JobInvalid for a job too large, before anything is sent
        stored = 0
        try:
            # pipelined (one reply subscription, up to `concurrency` PubAcks outstanding): 1.2-2.3x
            # the jobs/s of `concurrency` tasks each awaiting its publish, ~35 % less client CPU
            async for _ in self.submit_stream(models, tier, window=max(1, concurrency), repeat=repeat):
                stored += 1
                if progress:
                    progress(1)
        except (SubmitError, NatsUnavailable) as exc:
            raise type(exc)(f"{exc} ({stored} of {len(models)} jobs stored before that)") from None
        return [model.id for model in models]

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
        self._open()
        pending: deque[tuple[Job, bytes, asyncio.Future | None]] = deque()
        async with PublishPipe(self.nc) as pipe:
            self._pipes.add(pipe)
            try:
                async for stored in self._pipeline(pipe, jobs, tier, pending, window, ack_timeout, repeat):
                    yield stored
            finally:
                self._pipes.discard(pipe)
                for _, _, future in pending:  # stopped early: the rest is not waited for
                    if future is not None and not future.cancel() and not future.cancelled():
                        future.exception()  # settled: mark it seen (no "never retrieved" noise)

    async def _pipeline(self, pipe: PublishPipe, jobs: Iterable[JobLike], tier: str, pending: deque, window: int,
                        ack_timeout: float, repeat: bool) -> AsyncIterator[Stored]:
        subject = self.subjects.jobs(tier)
        trace = current_headers()  # the caller's span, if any: each job's traceparent
        if repeat:
            trace = {**trace, REPEAT_HEADER: "1"}
        for item in jobs:
            job = item if isinstance(item, Job) and item.id is not None else as_job(item)
            payload = self._payload(job)
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

    @translated("reading a queued job")
    async def queued_job(self, seq: int, *, retry_for: float = READ_RETRY_S) -> Job | None:
        """The job stored at JOBS stream sequence `seq`, or None when it is gone (acked or
        deleted: JetStream answered 404) or the message there is not a job. A server that does
        not answer is asked again for `retry_for` seconds, then its error is raised (as
        `read_result` does): a batch stop that took "no answer" for "gone" stopped waiting for
        a job still being called, or left one queued."""
        async def get() -> Any:
            return await self.js.get_msg(self.subjects.jobs_stream, seq)

        try:
            msg = await retrying(get, for_s=retry_for)
        except NotFoundError:
            return None
        try:
            return Job.model_validate_json(msg.data)
        except ValueError:  # (ValidationError is one) not a job: nothing queued there
            return None

    @translated("requesting a job's result")
    async def request(self, job: JobLike, tier: str, *, timeout: float = 30.0) -> Result:
        """Submit one job and wait for its Result (over the reply inbox), its body fetched
        when the reply carries a `body_ref`. `timeout`: seconds, above 0 (ValueError else, before
        anything is sent), for the whole call, storing the job included (a NATS outage too), plus
        at most 2 x WHY_TIMEOUT_S after it to say why. A job with its own `id` that already has a
        stored Result gets that Result and nothing is sent. Raises RequestTimeout (`job_id`,
        `reason`), BodyUnavailable, SubmitError (QueueFull, UnknownTier, JobInvalid: nothing
        stored), NatsUnavailable (this Client is closed). Cancelled (its task, a timeout or cancel
        scope around it), it stops waiting and leaves nothing behind; its job, once stored, runs
        (and is paid) as after a RequestTimeout: give the job a `deadline` to bound that."""
        if not math.isfinite(timeout) or timeout <= 0:  # before the job is stored: it would run (and be paid) unseen
            raise ValueError(f"timeout must be a number of seconds above 0, not {timeout!r}")
        self._open()
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        model = as_job(job)
        try:
            async with asyncio.timeout_at(deadline):  # storing it rides out a NATS restart, within `timeout`
                if _has_own_id(job):
                    # a repeat of an id with a Result: JetStream's dedup forgets the id after duplicate_window_s,
                    # and an id refused over rpc has a Result but no JOBS message; published, it would be paid again
                    # (not known, NATS not answering: NatsUnavailable, nothing sent; sent, it could be paid twice)
                    stored = await self.stored_result(model.id, retry_for=min(READ_RETRY_S, timeout / 2))
                    if stored is not None:
                        return stored
                inbox, reply = await self.replies.expect()
                try:
                    # an own id may be a retry past the dedup window while the first copy is queued or running
                    fresh = await self._publish(tier, model, reply_to=inbox, repeat=_has_own_id(job))
                except BaseException:
                    self.replies.discard(inbox)
                    raise
        except TimeoutError:
            away = not self.nc.is_connected  # else the time was too short for NATS's acknowledgement
            why = "the connection to NATS is away, reconnecting" if away else "its acknowledgement had not come"
            raise RequestTimeout(f"no result for job {model.id} within {timeout}s: NATS did not confirm storing it "
                                 f"({why}); it may {'still be stored once NATS is back' if away else 'be stored'}, "
                                 "and then runs (and is paid): collect it later with `ratefleet result "
                                 f"{model.id}` (or Client.stored_result), or request it again with the same id",
                                 job_id=model.id, reason="nats_unavailable" if away else None) from None
        try:
            if not fresh:  # (its stored Result was looked for just before: a duplicate has an own id)
                await self._follow_over_rpc(tier, model, inbox)  # answered once it is stored, also if meanwhile
            try:
                msg = await self._reply_or_stored(reply, model.id, deadline - loop.time(), duplicate=not fresh)
            except asyncio.CancelledError:
                if not (reply.cancelled() and self._closed_here) or _being_cancelled():
                    raise
                raise NatsUnavailable(f"this Client was closed while the request for job {model.id} waited for its "
                                      "Result; the job is stored and runs (and is paid) all the same: collect its "
                                      f"Result later with `ratefleet result {model.id}` (or Client.stored_result "
                                      "on a new Client)") from None
            if msg is None:
                reason, why = await self._why_unrun()
                raise RequestTimeout(f"no result for job {model.id} within {timeout}s; {why}: collect it later with "
                                     f"`ratefleet result {model.id}` (or Client.stored_result)",
                                     job_id=model.id, reason=reason) from None
            if isinstance(msg, Result):
                return msg
            return await self.bodies.resolve(Result.from_json(msg.data))
        finally:
            self.replies.discard(inbox)

    async def _reply_or_stored(self, reply: asyncio.Future, job_id: str, timeout: float,
                               *, duplicate: bool) -> Any:
        """The reply message, or the job's stored Result, whichever is seen first; None after
        `timeout` seconds with neither. The reply is core NATS (at most once): it is lost when
        this connection was away as it was sent (a NATS restart: 21 of 60 requests in flight
        waited their whole timeout in a trial), and a duplicate job id (a job already running)
        is answered to its first requester only. So the stored Result is read too, at the end
        of each slice of the wait (0.25 s for a duplicate, else 1 s, doubling to 5 s), but only
        for a duplicate or once this connection has reconnected since the request began
        (nats-py's `stats["reconnects"]`): an ordinary long call costs no reads."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        pause = 0.25 if duplicate else 1.0
        reconnects = self._reconnects()
        while True:
            remaining = deadline - loop.time()
            if remaining > 0:
                try:  # shielded: a slice that times out must not cancel the reply's future
                    return await asyncio.wait_for(asyncio.shield(reply), min(pause, remaining))
                except TimeoutError:  # (nats.errors.TimeoutError is one); other errors say what they are
                    pass
            out_of_time = deadline - loop.time() <= 0
            if self.nc.is_connected and (duplicate or out_of_time or self._reconnects() != reconnects):
                try:  # (a read waits for a reconnect: at most what is left of the wait, WHY_TIMEOUT_S at its end)
                    left = max(WHY_TIMEOUT_S, deadline - loop.time())
                    stored = await asyncio.wait_for(self.stored_result(job_id, retry_for=min(pause, left)), left)
                except (TimeoutError, NatsError):  # no answer: the wait goes on (NatsUnavailable is a NatsError)
                    stored = None
                if stored is not None:
                    return stored
            if out_of_time:
                return None
            pause = min(2 * pause, 5.0)

    async def _follow_over_rpc(self, tier: str, model: Job, inbox: str) -> None:
        """A job id already queued or running answers its first requester only. Sent to the
        dispatchers' rpc endpoint as well, the job is a duplicate there too (nothing is stored
        twice) and the endpoint answers `inbox` as soon as the job's Result is stored, where the
        store's own reads below come at doubling pauses. Best effort: no dispatcher, or a user not
        allowed to publish there, leaves those reads."""
        try:
            with denial_expected(self.subjects.rpc(tier)):
                await self.nc.publish(self.subjects.rpc(tier), self._payload(model), reply=inbox)
        except Exception:  # noqa: BLE001 - see docstring
            pass

    async def _why_unrun(self) -> tuple[str | None, str]:
        """After a request timed out (never on the way to a Result): whether the fleet can run
        the job at all, from one status request of at most WHY_TIMEOUT_S, shared by every request
        of this Client timing out within WHY_SHARED_S of it. (reason, text). Before, each asked:
        1,000 requests timing out together sent 1,000 status requests to the leader, which
        answers about 200 a second (a trial fleet), just when the fleet was already slow."""
        loop = asyncio.get_running_loop()
        if self._why is None or loop.time() - self._why[0] > WHY_SHARED_S:
            self._why = (loop.time(), asyncio.ensure_future(self._ask_why()))  # awaited below, by all who share it
        return await asyncio.shield(self._why[1])

    async def _ask_why(self) -> tuple[str | None, str]:
        """`_why_unrun`'s one status request (never raises)."""
        still_runs = "it is stored and still runs"
        if not self.nc.is_connected:
            return "nats_unavailable", ("the connection to NATS is away (reconnecting), so its Result cannot come "
                                        "yet; the job is stored and runs (and is paid) whether or not it is answered")
        try:
            with denial_expected(self.subjects.admin_status):
                reply = await self.nc.request(self.subjects.admin_status, b"", timeout=WHY_TIMEOUT_S)
            status = json.loads(reply.data)
        except NoRespondersError:
            return "no_dispatcher", (f"no dispatcher is running (nothing answers {self.subjects.admin_status}): the job "
                                     "is stored and runs (and is paid) once one starts (`ratefleet up`, or "
                                     "`ratefleet dispatcher` and workers)")
        except Exception:  # noqa: BLE001 - slow, refused or not JSON: nothing more is known
            return None, still_runs
        if not isinstance(status, dict) or status.get("leader") is None:
            return "no_leader", ("no dispatcher leads (a standby takes over within about lease_ttl_s): the job is "
                                 "stored and runs (and is paid) once one does")
        if not status.get("workers"):
            return "no_worker", ("the leader has no worker: the job is stored and runs (and is paid) once one "
                                 "starts (`ratefleet worker`)")
        keys = status.get("keys")
        if isinstance(keys, dict) and keys and not any(_key_ready(key) for key in keys.values()):
            return "no_key_ready", ("every key is cooling down after 429s, has an open breaker or is disabled "
                                    "(`ratefleet status` says which and for how long): the job is stored and runs "
                                    "(and is paid) once a key can take it")
        return None, still_runs

    def _reconnects(self) -> int:
        """How often this client's connection has reconnected (nats-py's count)."""
        return self.nc.stats["reconnects"]

    @translated("reading a stored result")
    async def stored_result(self, job_id: str, batch: str | None = None, *,
                            retry_for: float = READ_RETRY_S) -> Result | None:
        """The stored Result of one job (its body fetched when it has a `body_ref`), or None
        when it has none yet. A NATS that does not answer is asked again for `retry_for`
        seconds, then NatsUnavailable is raised (no answer is not "no Result"). Raises
        BodyUnavailable when the referenced body is gone, NatsUnavailable at once when this
        Client is closed."""
        self._open()
        data = await read_result(self.js, self.subjects, job_id, "*" if batch is None else batch, retry_for=retry_for)
        return None if data is None else await self.bodies.resolve(Result.from_json(data))

    @translated("reading results")
    async def results(self, batch: str | None = None, *, follow: bool = False,
                      idle_timeout: float = 1.0) -> AsyncIterator[Result]:
        """Results of a batch (`None`: jobs without a batch). Stops when caught up unless `follow`.

        Referenced bodies are fetched and filled in (BodyUnavailable when one is gone). ValueError
        for a `batch` that is no batch name (1-128 of A-Z a-z 0-9 _ -; `_` is None's), before anything
        is read: a wildcard such as `*` read every batch's Results."""
        if batch is not None and not is_token(batch):
            raise ValueError(f"batch must be a batch name (1-128 of A-Z a-z 0-9 _ -) or None (jobs without a "
                             f"batch), not {batch!r}")
        self._open()
        # the stream named: no $JS.API.STREAM.NAMES lookup (a producer's account permissions need not allow it)
        sub = await self.js.subscribe(self.subjects.batch_results(batch), stream=self.subjects.results_stream,
                                      ordered_consumer=True, deliver_policy=DeliverPolicy.ALL)
        try:
            while True:
                try:
                    msg = await sub.next_msg(timeout=idle_timeout)
                except TimeoutError:
                    if follow:
                        self._open()  # closed meanwhile: say so, not "the connection was lost"
                        continue
                    return
                except Exception:
                    self._open()
                    raise
                yield await self.bodies.resolve(Result.from_json(msg.data))
                if not follow and msg.metadata.num_pending == 0:
                    return
        finally:
            try:
                await sub.unsubscribe()
            except Exception:  # noqa: BLE001 - the connection is already closing: nothing to undo
                pass

    async def no_dispatcher(self, timeout: float = 1.0) -> bool:
        """True only when NATS says no dispatcher listens on the status subject (no responders,
        at once); an answer, a slow one (`timeout` seconds), or an account not allowed to ask
        (nats-server answers with an -ERR only) all give False: nothing is known then. That
        refusal is expected (the producer of examples/nats-accounts.conf may not ask), so it
        is no warning."""
        try:
            with denial_expected(self.subjects.admin_status):
                await self.nc.request(self.subjects.admin_status, b"", timeout=timeout)
        except NoRespondersError:
            return True
        except Exception:  # noqa: BLE001 - see docstring
            return False
        return False

    @translated("asking a dispatcher for the fleet's status")
    async def status(self, timeout: float = 3.0) -> dict:
        """The fleet's status (tiers, keys, workers) from the leader dispatcher. Raises
        DispatcherUnavailable when none answers within `timeout` seconds, NatsUnavailable
        when NATS itself is gone."""
        self._open()
        try:
            reply = await self.nc.request(self.subjects.admin_status, b"", timeout=timeout)
        except (NoRespondersError, TimeoutError) as exc:  # (nats' TimeoutError is a TimeoutError)
            if not self.nc.is_connected:  # the request never left: NATS itself is away, not the dispatchers
                raise NatsUnavailable(f"the connection to NATS is lost (reconnecting), so no status could be asked "
                                      f"for; check that nats-server runs ({type(exc).__name__})") from None
            if refused(self.subjects.admin_status):  # the CLI names the refusal first; no dispatcher is to blame
                raise DispatcherUnavailable(f"this user may not ask {self.subjects.admin_status}") from None
            raise DispatcherUnavailable(f"no dispatcher answered {self.subjects.admin_status} ({type(exc).__name__}); "
                                        "is `ratefleet up` or `ratefleet dispatcher` running?") from None
        return json.loads(reply.data)


def _key_ready(key: Any) -> bool:
    """Whether a key of the status answer could take a call now (not cooling, breaker not open, enabled)."""
    return (isinstance(key, dict) and not key.get("disabled") and key.get("breaker") != "open"
            and not (key.get("cooldown_s") or 0) > 0)


def _has_own_id(job: JobLike) -> bool:
    """Whether the caller gave the job its id (a generated one cannot have a Result yet)."""
    return (job.id if isinstance(job, Job) else job.get("id")) is not None


def _being_cancelled() -> bool:
    """Whether the current task has a cancellation pending (its own, not a future it awaits)."""
    task = asyncio.current_task()
    return task is not None and task.cancelling() > 0


def _settled(future: asyncio.Future | None) -> bool:
    return future is None or future.done()
