"""The worker process: takes assignments, calls the upstream, finishes jobs, reports outcomes.

Slots bound the upstream calls in flight. The dispatcher only assigns to a free slot
(heartbeats carry the slot count and the calls in flight), so assignments never queue
up here. On SIGTERM the worker stops taking jobs, lets calls finish for `grace_s`, and
naks the calls still running so another worker runs them at once. A call that is done is
never thrown away: its Result is stored (the drain waits for that, up to
FINISH_BOUND_S seconds more).
"""

from __future__ import annotations

import contextlib
import os
import socket
import time
import uuid
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from functools import partial

import anyio
import structlog
from nats.aio.client import Client as NatsClient
from prometheus_client import CollectorRegistry
from pydantic import ValidationError

from ratefleet.runtime.cache import ResultCache, cache_key, wants_write
from ratefleet.runtime.config_kv import ConfigFollower
from ratefleet.runtime.finish import Finisher, auth_headers
from ratefleet.runtime.handbacks import Handbacks
from ratefleet.runtime.logs import get_logger
from ratefleet.runtime.metrics import new_registry, register_cache
from ratefleet.runtime.store import read_result
from ratefleet.runtime.streams import Rebuilder
from ratefleet.runtime.tracing import TRACEPARENT, TRACESTATE, trace_headers
from ratefleet.schemas import Config, ErrorCode, ErrorInfo, Job, Result, Subjects, Timings, UpstreamConfig
from ratefleet.schemas.config_store import fleet_view
from ratefleet.schemas.errors import ConfigError, InvalidRequest, SecretUnavailable
from ratefleet.schemas.internal import (
    UNLISTED_LOST_S,
    Assignment,
    Epoch,
    Heartbeat,
    InFlight,
    LeaderAnnounce,
    OutcomeReport,
    read_assignments,
)
from ratefleet.schemas.job import describe_validation_error
from ratefleet.schemas.outcome import OutcomeKind, is_retryable
from ratefleet.schemas.result import calls_before, expired_before_call
from ratefleet.workers.executor import CallResult, UpstreamExecutor, build_client
from ratefleet.workers.lateness import Lateness
from ratefleet.workers.metrics import WorkerMetrics
from ratefleet.workers.outbox import ReportOutbox
from ratefleet.workers.pairing import pairing_problem
from ratefleet.workers.relay import chunk_relay
from ratefleet.workers.secrets import SecretResolver
from ratefleet.workers.spans import note_result, run_span
from ratefleet.workers.unstored import refused, unstorable

log = get_logger("ratefleet.worker")
STORED_LOOKUP_S = 2.0  # a late assignment's stored-Result lookup; past it the assignment is dropped


# after grace_s, a drain waits up to this long (seconds) for the Results of calls that are
# done to be stored (a 60 MB body takes seconds to upload); `ratefleet up` waits for it
FINISH_BOUND_S = 10.0
# seconds a reply waits for the answer cache's write of its Result (a slow cache bucket holds replies at most
# this long, not cache.IO_TIMEOUT_S); the write itself goes on after it
CACHE_SETTLE_S = 0.25
RATE_LIMITED_DELAY_S = (0.25, 5.0)  # a 429'd job's nak delay: doubling from 0.25 s, at most 5 s


def retry_delay(kind: str, attempt: int, retry_after_s: float | None, rate_limited: int = 0) -> float:
    """How long a retryable job waits before its next delivery, in seconds.

    401/403 (and a model's 404) go back at once: the dispatcher disables that key or weighs the refusal
    (dispatcher/core/denials.py), and the job runs on another key. A 429 goes back after a short delay that doubles with
the job's own 429s
    (`rate_limited`, this one included: 0.25, 0.5, 1, 2, 4, 5, 5 ... s). The key's wait is
    the dispatcher's business (its cooldown honours Retry-After and backs off
    exponentially), so a job need not wait out one key's Retry-After when another key is
    free; the delay only keeps a job that every key refuses from circling. 5xx, timeouts
    and connection errors back off exponentially (Retry-After when given).
    """
    if kind in ("key_error", "denied"):
        return 0.0
    if kind == "rate_limited":
        first, cap = RATE_LIMITED_DELAY_S
        return min(cap, first * 2 ** max(0, min(rate_limited - 1, 16)))
    if retry_after_s is not None:
        return min(retry_after_s, 300.0)
    return min(30.0, 0.25 * 2 ** (attempt - 1))


class Worker:
    def __init__(self, config: Config, nc: NatsClient, *, slots: int | None = None, worker_id: str | None = None,
                 registry: CollectorRegistry | None = None, http: str | None = None, config_revision: int | None = None):
        """`registry`: where the worker's metrics go (workers/metrics.py; default: its own);
        `http`: the URL of its /metrics and probes, told to the leader in heartbeats;
        `config_revision`: the fleet config revision `config` comes from (None: the local file)."""
        self.config = config
        self.nc = nc
        self.subjects = Subjects(config.nats.prefix)
        self.slots = slots or config.workers.slots
        self.id = worker_id or f"{config.workers.id_prefix}-{uuid.uuid4().hex[:6]}"
        self.explicit_id = worker_id is not None  # an --id given by hand can be given twice
        self.finisher = Finisher(nc, nc.jetstream(), self.subjects, auth_headers(config))
        self.secrets = SecretResolver(config)
        self.in_flight: dict[str, InFlight] = {}
        self.draining = False
        self.calls = 0
        self.started_at = time.time()
        self._cancel_scopes: dict[str, anyio.CancelScope] = {}
        self.calling: dict[str, list] = {}  # assignment id -> [ack subject, last in-progress ack]
        self.epoch: Epoch = (0, 0)  # highest recent leader epoch; older assignments are stale
        self.epoch_seen_at = 0.0
        # a higher epoch not heard of for this long is forgotten (its leader is gone), so a
        # leader with a lower one (a lease bucket created anew with an older clock, or an
        # older dispatcher version) is followed again rather than ignored for good
        self.epoch_forget_s = 2 * config.dispatcher.lease_ttl_s + 2 * config.workers.heartbeat_s
        self.handbacks = Handbacks(nc.jetstream(), self.subjects.handbacks_bucket)
        self.cache = ResultCache.from_config(nc.jetstream(), config)  # written after 2xx calls of opted-in jobs
        self.rebuilder = Rebuilder(nc.jetstream(), lambda: self.config)  # a stream a Result needs is gone
        self.finisher.gone = lambda: self.rebuilder.rebuild("the stream or bucket a Result is stored in")
        self.unusable: dict[str, str] = {}  # key id -> why its secret cannot be used here (heartbeat)
        self.config_revision = config_revision  # the fleet config revision applied (None: the local file)
        self.key_versions: dict[str, str] = {}  # assignment id -> the key version its call uses
        self.http = http
        registry = registry or new_registry()
        self.metrics = WorkerMetrics(registry, lambda: (self.slots, len(self.in_flight)))
        register_cache(registry, lambda: self.cache.stats)
        # every Result this worker newly stores is counted once, whichever path ended the job
        self.finisher.on_stored = lambda result: self.metrics.job_ended(result.tier, result.status, result.variant)
        self.leader_heard_at: float | None = None  # monotonic time of the last leader announce
        # silence: a leader that hears no heartbeat for worker_timeout_s gives this worker's jobs to
        # others, so assignments read after such a silence may have been run elsewhere already
        self.beat_at: float | None = None  # monotonic time the last heartbeat was sent
        self.silence_ended_at = float("-inf")  # when a heartbeat found the last one past worker_timeout_s
        self.lateness = Lateness()  # how late an assignment arrives, the two machines' clock skew taken out
        self.reports = ReportOutbox(lambda payload: self.nc.publish(self.subjects.outcome, payload))

    async def id_in_use(self) -> Heartbeat | None:
        """Another live worker process heartbeating under this worker's id, else None (listens
        1.2 heartbeats). Two processes with one id both receive every assignment sent to it and
        both call it: 404 upstream calls for 200 jobs (an operator's trial with `--id` given twice)."""
        me = (os.getpid(), socket.gethostname())
        seen: list[Heartbeat] = []
        heard = anyio.Event()

        async def on_beat(msg) -> None:
            try:
                beat = Heartbeat.model_validate_json(msg.data)
            except ValueError:
                return
            if beat.worker == self.id and (beat.pid, beat.host) != me and not beat.draining:
                seen.append(beat)
                heard.set()

        sub = await self.nc.subscribe(self.subjects.heartbeat, cb=on_beat)
        try:
            with anyio.move_on_after(1.2 * self.config.workers.heartbeat_s):
                await heard.wait()
        finally:
            with contextlib.suppress(Exception):
                await sub.unsubscribe()
        return seen[0] if seen else None

    async def run(self, stop: anyio.Event) -> None:
        if self.explicit_id and (other := await self.id_in_use()) is not None:
            raise ConfigError(f"worker id {self.id!r} is already used by a running worker (pid {other.pid} on "
                              f"{other.host}): two processes with one id would both call every job sent to it; "
                              "give each worker its own --id, or leave --id out (a random one)")
        self.unusable = self.secrets.check_all()
        for key_id, reason in self.unusable.items():
            log.warning("secret unusable on this worker; the leader sends this key's jobs elsewhere",
                        key_id=key_id, problem=reason)
        self._warn_pending()
        client = build_client(self.config.workers.transport, self.slots,
                              [upstream.auth_header for upstream in self.config.upstreams.values()],
                              keepalive_s=self.config.workers.keepalive_s)
        executor = UpstreamExecutor(client, self.config.workers.max_response_bytes, validated=True)  # (job_model)
        leader_sub = await self.nc.subscribe(self.subjects.leader_announce, cb=self._on_leader)
        follower = ConfigFollower(self.nc.jetstream(), self.subjects, self._apply_config, role="worker",
                                  revision=self.config_revision)
        sub = None
        try:
            async with anyio.create_task_group() as tg:
                async def on_assignments(msg) -> None:
                    await self._on_assignments(msg, executor, tg)

                # a callback, not `sub.messages`: nats-py's iterator makes a task and waits at
                # least one loop iteration per message even when more are queued, so on a busy
                # worker assignments queued up behind each other (a vip job waited 60 ms on
                # average, up to 250 ms, between arriving and being started: bench/backlog.py)
                sub = await self.nc.subscribe(self.subjects.assign(self.id), cb=on_assignments,
                                              pending_msgs_limit=0)
                log.info("worker started", worker=self.id, slots=self.slots, transport=self.config.workers.transport)
                tg.start_soon(follower.run)
                tg.start_soon(self._heartbeats)
                tg.start_soon(self._keep_calls_alive)
                await stop.wait()
                await self._drain(sub)
                tg.cancel_scope.cancel()
        finally:
            if sub is not None:
                with contextlib.suppress(Exception):
                    await sub.unsubscribe()  # (done by the drain, unless the task group failed)
            await client.aclose()
            await leader_sub.unsubscribe()
            await self._send_heartbeat()

    async def _on_assignments(self, msg, executor: UpstreamExecutor, tg: anyio.abc.TaskGroup) -> None:
        """One message on this worker's assign subject: one assignment or the leader's batch
        for this worker (schemas/internal.py); each is started in `tg`."""
        try:
            assignments = read_assignments(msg.data)
        except ValueError:
            log.error("malformed assignment ignored", worker=self.id)
            return
        header = getattr(msg, "headers", None)  # an older leader's one assignment: its trace context
        for assignment in assignments:
            await self._take(assignment, executor, tg, header)

    async def _take(self, assignment: Assignment, executor: UpstreamExecutor, tg: anyio.abc.TaskGroup,
                    header: dict[str, str] | None) -> None:
        """Start one assignment, unless it is stale (an earlier leader's) or the worker is draining."""
        if assignment.traceparent is not None:  # the job's own trace context, in the batch entry
            header = {TRACEPARENT: assignment.traceparent}
            if assignment.tracestate:
                header[TRACESTATE] = assignment.tracestate
        if not self._note_epoch(assignment.epoch, announced=False):
            # sent by a leader that has been replaced (it was paused with this still in its
            # send buffer): the job was redelivered to the new leader; never call it twice
            log.warning("assignment from a former leader dropped", worker=self.id, job_id=assignment.job_id,
                        epoch=list(assignment.epoch), current_epoch=list(self.epoch))
            return
        if self._given_away_maybe():
            # read after this worker was silent past worker_timeout_s (frozen, starved of CPU): the
            # leader may have given it to another worker, which may have run it. Not called, not
            # nak'd (the message may be out again under another delivery); if the leader did not give
            # it away, the heartbeats not listing it make the leader return it to the queue
            log.warning("assignment read after a silence longer than worker_timeout_s dropped; the leader "
                        "gives the job to a worker again", worker=self.id, job_id=assignment.job_id)
            await self.handbacks.add(assignment.seq)  # no call: the delivery is not an attempt (best effort)
            return
        if self.draining:
            # not called: recorded as a handback, so the redelivery is not an attempt. The report
            # goes first: the nak (no delay) redelivers at once, and the leader does not hand out
            # again a job its assignment still holds (it waits ack_wait for it instead)
            await self._report(assignment, None, terminal=False, now=True)
            await self.handbacks.hand_back(assignment.seq, self.finisher, assignment.ack)
            return
        self.in_flight[assignment.id] = InFlight(assignment=assignment.id, key_id=assignment.key_id, job_id=assignment.job_id)
        tg.start_soon(self._run_assignment, assignment, executor, trace_headers(header))

    async def _apply_config(self, revision: int, stored: Config) -> None:
        """A new fleet config revision (runtime/config_kv.py): the upstream and key tables are
        rebuilt and the secrets resolved here, locally (invariant 5). Calls in flight keep the
        upstream and secret they started with; an assignment for a key this worker does not
        know (yet, or any more) is handed back unrun (`_execute`)."""
        config = fleet_view(self.config, stored)
        secrets = SecretResolver(config)
        unusable = secrets.check_all()
        self.config, self.secrets, self.unusable, self.config_revision = config, secrets, unusable, revision
        self.finisher.mask_headers = auth_headers(config)
        for key_id, reason in unusable.items():
            log.warning("secret unusable on this worker; the leader sends this key's jobs elsewhere",
                        key_id=key_id, problem=reason, revision=revision)
        self._warn_pending(revision)
        log.info("config revision applied", worker=self.id, revision=revision, keys=len(config.keys()))
        await self._send_heartbeat()

    def _warn_pending(self, revision: int | None = None) -> None:
        """Warn of each version not yet active whose secret this worker cannot use (at start and
        on every config revision, e.g. one written by `ratefleet keys rotate`), while there is
        still time to fix it: at the switch the key would leave rotation on this worker."""
        for version, reason in self.secrets.check_pending().items():
            log.warning("secret of a key version not yet active is unusable on this worker; fix it before "
                        "the version takes over", key_version=version, problem=reason, revision=revision)

    def _note_epoch(self, epoch: Epoch, *, announced: bool) -> bool:
        """Follow the highest recent leader epoch; False for an older one (a stale leader).
        Only a leader's announce can make the worker forget a silent higher epoch, never an
        assignment (which may be exactly the stale one, flushed late)."""
        now = time.monotonic()
        forget = announced and now - self.epoch_seen_at > self.epoch_forget_s
        if epoch >= self.epoch or forget:
            self.epoch, self.epoch_seen_at = epoch, now
            return True
        return False

    async def _on_leader(self, msg) -> None:
        try:
            announce = LeaderAnnounce.model_validate_json(msg.data)
        except ValueError:
            return
        self.leader_heard_at = time.monotonic()
        before = self.epoch
        if self._note_epoch(announce.epoch, announced=True) and announce.epoch != before:  # a new leader: rare
            log.info("worker follows a new leader epoch", leader=announce.leader,
                     epoch=f"{announce.epoch[0]}.{announce.epoch[1]}")

    async def not_ready(self) -> str | None:
        """/readyz: why this worker cannot take jobs now (None: it can). A leader must have
        announced itself within `epoch_forget_s` (2 lease TTLs + 2 heartbeats), and the worker
        must be able to call with at least one key (a worker holding no key's secret is sent no job)."""
        if self.draining:
            return "draining (stopping)"
        if self.leader_heard_at is None:
            return "no leader heard yet"
        silent = time.monotonic() - self.leader_heard_at
        if silent > self.epoch_forget_s:
            return f"no leader heard for {silent:.1f} s"
        keys = self.config.keys()
        if keys and all(key_id in self.unusable for key_id in keys):
            why = "; ".join(f"{key_id}: {self.unusable[key_id]}" for key_id in keys)
            return f"no key usable on this worker ({why})"
        return None

    async def _drain(self, sub) -> None:
        self.draining = True
        await self._send_heartbeat()
        grace = self.config.workers.grace_s
        log.info("worker draining", worker=self.id, in_flight=len(self.in_flight), grace_s=grace)
        # assignments sent before the leader read that heartbeat still arrive for a moment:
        # they are handed back (not an attempt), not dropped with the subscription
        listen_until = time.monotonic() + min(grace, 2 * self.config.workers.heartbeat_s)
        with anyio.move_on_after(grace):
            while self.in_flight or time.monotonic() < listen_until:
                await anyio.sleep(0.05)
        with contextlib.suppress(Exception):
            await sub.unsubscribe()
        for scope in list(self._cancel_scopes.values()):
            scope.cancel()
        # calls still running were cut short and naked; calls that are done are storing a
        # paid answer (a large body takes seconds to upload): they finish, up to a bound
        with anyio.move_on_after(FINISH_BOUND_S):
            while self.in_flight:
                await anyio.sleep(0.02)
        for entry in self.in_flight.values():
            log.error("shutdown before this job's Result was stored; it is delivered again after ack_wait",
                      worker=self.id, job_id=entry.job_id)

    async def _keep_calls_alive(self) -> None:
        """While slow calls run, keep their JOBS messages alive with in-progress acks
        (one loop for every call, rather than a task per call)."""
        interval = max(0.5, self.config.streams.ack_wait_s / 3)
        while True:
            await anyio.sleep(min(1.0, interval / 2))
            now = time.monotonic()
            for entry in list(self.calling.values()):
                ack, touched = entry
                if now - touched >= interval:
                    entry[1] = now
                    await self.finisher.in_progress(ack)

    async def _heartbeats(self) -> None:
        while True:
            # keys whose secret became usable (a fixed file, a version that took over) come back,
            # and one whose new version cannot be used here is reported before a job fails on it
            self.unusable = self.secrets.check_all()
            await self._send_heartbeat()
            await anyio.sleep(self.config.workers.heartbeat_s)

    def _given_away_maybe(self) -> bool:
        """True when this worker has been silent, or just was, for longer than the leader waits
        for a heartbeat (worker_timeout_s). An assignment read then may have been sent before the
        silence and handed to another worker since: its queued messages are read just after the
        first heartbeat once the process runs again, so the heartbeat_s that follow count too."""
        if self.beat_at is None:
            return False
        now = time.monotonic()
        silent = now - self.beat_at > self.config.dispatcher.worker_timeout_s
        return silent or now - self.silence_ended_at < self.config.workers.heartbeat_s

    async def _send_heartbeat(self) -> None:
        now = time.monotonic()
        if self.beat_at is not None and now - self.beat_at > self.config.dispatcher.worker_timeout_s:
            self.silence_ended_at = now
            log.warning("worker was silent longer than worker_timeout_s; the leader may have given its jobs "
                        "to other workers", worker=self.id, silent_s=round(now - self.beat_at, 1),
                        worker_timeout_s=self.config.dispatcher.worker_timeout_s)
        self.beat_at = now
        beat = Heartbeat(worker=self.id, slots=self.slots, in_flight=list(self.in_flight.values()),
                         draining=self.draining, pid=os.getpid(), host=socket.gethostname(),
                         started_at=self.started_at, calls=self.calls, unusable_keys=self.unusable, http=self.http,
                         config_revision=self.config_revision)
        await self.reports.flush()  # the reports of calls this beat no longer lists go first
        try:
            await self.nc.publish(self.subjects.heartbeat, beat.model_dump_json().encode())
        except Exception as exc:  # noqa: BLE001 - disconnected: the next beat retries
            log.debug("heartbeat not sent", error=type(exc).__name__)

    async def _run_assignment(self, a: Assignment, executor: UpstreamExecutor, trace: dict[str, str] | None = None) -> None:
        structlog.contextvars.bind_contextvars(job_id=a.job_id, tier=a.tier, key_id=a.key_id, attempt=a.attempt, worker=self.id)
        with run_span(a, self.id, trace or {}):  # the job's trace: its log lines, Result and upstream call carry it
            await self._run_traced(a, executor)

    async def _run_traced(self, a: Assignment, executor: UpstreamExecutor) -> None:
        try:
            await self._execute(a, executor)
        except Exception as exc:  # noqa: BLE001 - a fault of this worker or of NATS, not of the job: retried
            log.exception("assignment failed unexpectedly; job goes back to the queue", error=type(exc).__name__)
            try:
                await self.finisher.nak(a.ack, 1.0)
            except Exception as exc:  # noqa: BLE001 - then ack_wait brings it back
                log.warning("nak failed; the job returns after ack_wait", error=type(exc).__name__)
            await self._report(a, None, terminal=False)
        finally:
            self.in_flight.pop(a.id, None)

    async def _execute(self, a: Assignment, executor: UpstreamExecutor) -> None:
        try:
            job = a.job_model()  # the one validation of the job in this process, from its JSON text
            invalid = None
        except ValidationError as exc:  # e.g. a dispatcher of another version let it through
            job, invalid = None, exc
        problem = pairing_problem(self.config, a.key_id, a.upstream,
                                  {"upstream": job.upstream} if job is not None else a.job_data())
        if problem is not None:
            await self._refuse_pairing(a, problem)
            return
        if job is None:
            await self._end_invalid(a, ErrorCode.INVALID_JOB, describe_validation_error(invalid)[1])
            return
        if await self._stored_already(a):
            return
        if job.expired(datetime.now(UTC)):
            log.info("job expired before its call")
            await self.finisher.finish(self._result(a, "expired", error=ErrorInfo(
                code=ErrorCode.DEADLINE_EXCEEDED, message=expired_before_call(a.attempt, a.rate_limited)),
                called=False), ack=a.ack, reply_to=a.reply_to)
            await self._report(a, None, terminal=True)
            return
        try:
            version, secret = self.secrets.pick(a.key_id)
            structlog.contextvars.bind_contextvars(key_version=version)
            if a.upstream not in self.config.upstreams:  # a config revision this worker has not applied yet
                raise SecretUnavailable(f"upstream {a.upstream!r} is not in this worker's config",
                                        reason="upstream not in this worker's config")
        except SecretUnavailable as exc:
            # the leader had not heard yet: tell it (heartbeat), and hand the job back unrun,
            # not as an attempt; it then goes to a worker and key that can run it
            log.error("secret unusable; job handed back", problem=exc.reason)
            self.unusable[a.key_id] = exc.reason
            await self._send_heartbeat()
            await self.handbacks.hand_back(a.seq, self.finisher, a.ack)
            await self._report(a, None, terminal=False)
            return
        upstream = self.config.upstreams[a.upstream]
        queued_ms = max(0.0, (time.time() - a.submitted_at) * 1000)
        self.calling[a.id] = [a.ack, time.monotonic()]
        self.key_versions[a.id] = version
        self.metrics.call_started(a.tier, queued_ms / 1000)
        try:
            call = await self._call(a, executor, job, upstream, secret)
            if call is None:
                return
            self.calls += 1
            self.metrics.call_done(a.key_id, a.upstream, str(call.kind), call.latency_ms / 1000, tier=a.tier,
                                   variant=a.variant)
            # still kept alive while the Result is stored: a large body takes seconds to upload
            await self._conclude(a, call, queued_ms, job)
        except InvalidRequest as exc:  # raised by executor.call, before any call
            await self._end_invalid(a, ErrorCode.INVALID_REQUEST, str(exc))
        finally:
            self.calling.pop(a.id, None)
            self.key_versions.pop(a.id, None)

    async def _stored_already(self, a: Assignment) -> bool:
        """For an assignment that reached this worker late enough to have been given away meanwhile
        (the path through NATS stalled, e.g. a frozen server of a cluster; lateness measured against
        the fastest recent arrival, so the skew of the two wall clocks cancels out:
        workers/lateness.py): later than worker_timeout_s less the silence the leader had already
        seen when it handed it out (`silent_s`: this worker's heartbeats may have stopped first),
        or later than UNLISTED_LOST_S,
        or a later attempt (the first worker stalled or died mid-call, and may have stored the
        Result since the leader read the redelivery: a crash soak's seeds 603 and 702 called such
        jobs 1.9 and 3.75 s after their Result was stored): the leader may have given the job to
        another worker meanwhile, so its stored Result is looked up first (one read; a retry after
        a 429 costs that read, nothing else). When there is one, it is the answer: sent to the
        reply subject, the message acked, no call. True then. A lookup that gets no answer within
        STORED_LOOKUP_S is no "none": the assignment is dropped as one read after a silence is (a
        handback, no call, no nak; the heartbeats that no longer list it make the leader return
        the job): called, it was paid twice on a loaded machine where the read right after the
        held path opened took over 2 s. True then."""
        delay, now = time.time() - (a.submitted_at + a.queued_ms / 1000), time.monotonic()
        late_s = self.lateness.late_by(delay, now)
        # given away meanwhile? the leader gives a worker up after worker_timeout_s of silence, counted from its
        # last heartbeat (`silent_s` of it had passed when this was sent), and returns an assignment that two
        # heartbeats do not list once it is UNLISTED_LOST_S old
        late = late_s + a.silent_s > self.config.dispatcher.worker_timeout_s or late_s > UNLISTED_LOST_S
        if not late:
            self.lateness.record(delay, now)
            if a.attempt <= 1:
                return False
        try:
            with anyio.fail_after(STORED_LOOKUP_S):
                stored = await read_result(self.nc.jetstream(), self.subjects, a.job_id, _batch_and_metadata(a)[0])
        except Exception as exc:  # noqa: BLE001 - TimeoutError, or NATS errors after read_result's retries
            log.warning("an assignment whose Result could not be looked up dropped; the leader gives the job "
                        "to a worker again", error=type(exc).__name__, late_s=round(late_s, 1))
            await self.handbacks.add(a.seq)  # no call: the delivery is not an attempt (best effort)
            return True
        if stored is None:
            if late:  # not run elsewhere: a skewed clock, or held but not given away
                self.lateness.record(delay, now)
            return False
        log.warning("an assignment (late, or a later attempt) of a job whose Result is stored; answered with it, "
                    "not called",
                    late_s=round(late_s, 1))
        await self.finisher.finish_stored(stored, ack=a.ack, reply_to=a.reply_to)
        await self._report(a, None, terminal=True)
        return True

    async def _call(self, a: Assignment, executor: UpstreamExecutor, job: Job, upstream: UpstreamConfig,
                    secret: str) -> CallResult | None:
        """The upstream call: the only step a drain may cut short (after grace_s). Then the
        job goes back to the queue and None is returned. Once the call is done its answer is
        paid for, so storing its Result is never cancelled by the drain (see _drain)."""
        scope = anyio.CancelScope()
        self._cancel_scopes[a.id] = scope
        try:
            with scope:
                relay = chunk_relay(self.nc, a.reply_to, a.attempt, job, secret)  # "stream": true over request/reply
                if relay is None:
                    return await executor.call(job, upstream, secret)
                try:
                    return await executor.call(job, upstream, secret, relay, relay.answer)
                finally:
                    with anyio.CancelScope(shield=True):  # (a drain's cancel must not drop a paid CallResult)
                        await relay.end()
        finally:
            self._cancel_scopes.pop(a.id, None)
        log.warning("call abandoned at shutdown; job goes back to the queue")
        self.calling.pop(a.id, None)  # no in-progress ack after the nak
        await self._report(a, None, terminal=False, now=True)  # before the nak (no delay): see _take
        await self.finisher.nak(a.ack)
        return None

    async def _refuse_pairing(self, a: Assignment, problem: str) -> None:
        """A key paired with an upstream none of its pools serves: no secret is resolved, nothing
        is called or stored; the delivery is nak'd (it counts, so a leader that keeps pairing them
        ends the job `poison_message` after `streams.max_deliver`: it still ends exactly once)."""
        log.error("assignment refused: the key does not belong to a pool of the job's upstream; job handed back",
                  problem=problem, upstream=a.upstream, assignment=a.id)
        try:
            await self.finisher.nak(a.ack, 1.0)
        except Exception as exc:  # noqa: BLE001 - then ack_wait brings it back
            log.warning("nak failed; the job returns after ack_wait", error=type(exc).__name__)
        await self._report(a, None, terminal=False)

    async def _end_invalid(self, a: Assignment, code: ErrorCode, message: str) -> None:
        """The job's own fault, found before any call: `invalid` (this delivery is no attempt), a
        dead letter naming the error; the key is left alone (the report says no call was made)."""
        log.warning("job cannot be sent; ended as invalid without a call", code=str(code), reason=message)
        error = ErrorInfo(code=code, message=message)
        result = self._result(a, "invalid", error=error, called=False)
        if await self.finisher.finish(result, ack=a.ack, reply_to=a.reply_to):
            try:
                await self.finisher.dead(a.tier, result, job=a.job_data(), last_error=error.model_dump())
            except Exception as exc:  # noqa: BLE001 - the Result is stored and acked: the job is done
                log.error("dead letter not stored", error=type(exc).__name__)
        await self._report(a, None, terminal=True)

    async def _conclude(self, a: Assignment, call: CallResult, queued_ms: float, job: Job) -> None:
        """Finish or requeue the job, then report the outcome (so a worker killed in between
        still lists the assignment in flight and the dispatcher returns it at once). A 2xx
        answer of a job with `cache_ttl_s` is written to the cache while its Result is stored
        (not before: a cache that does not answer held the Result back up to cache.IO_TIMEOUT_S).
        The reply (and the ack) wait for the write up to CACHE_SETTLE_S, so a producer that sends
        the same job again the moment it reads the Result finds the entry."""
        retryable = is_retryable(call.kind, denial_final=a.denial_final)
        throttled = call.kind == "rate_limited"  # a wait, not an attempt: its own budget
        terminal = bool(call.code) or (a.rate_limited + 1 >= a.max_rate_limited if throttled
                                       else not retryable or a.attempt >= a.max_attempts)
        log.debug("call done", kind=call.kind, status=call.response.status if call.response else None,
                  latency_ms=round(call.latency_ms, 1))
        if not terminal:
            delay = retry_delay(call.kind, a.attempt, call.retry_after_s, a.rate_limited + 1)
            log.info("retrying job", kind=call.kind, delay_s=delay)
            self.calling.pop(a.id, None)  # no in-progress ack after the nak: it would postpone the retry
            if call.kind in ("denied", "key_error"):
                # the leader must know which key refused the job (or was disabled) before it comes
                # back, else it may pick that key again; a crash before the nak only delays it by ack_wait
                await self._report(a, call, terminal=False, now=True)
            if throttled:
                await self.handbacks.rate_limited(a.seq, self.finisher, a.ack, delay)
            else:
                await self.finisher.nak(a.ack, delay)
            if call.kind in ("denied", "key_error"):
                return
        else:
            result = self._call_result(a, call, queued_ms)
            # the terminal report goes right after the ack, in its write (`then`); the call stays in
            # flight until _store returns (_run_traced ends it), so a drain waits for its dead letter
            then = partial(self._report, a, call, terminal=True, ended=False)
            if result.ok and job.cache_ttl_s is not None and wants_write(job):
                # beside the Result's store, not before it: a cache bucket that does not answer
                # (cache.IO_TIMEOUT_S, 2 s) held every cached job's Result back that long. The reply
                # waits for the write up to CACHE_SETTLE_S: sent first, a caller sending the same job
                # again as it read the answer missed the entry and paid a second call (seen in CI once
                # the reply path was faster)
                written = anyio.Event()

                async def write() -> None:
                    try:
                        await self.cache.store(cache_key(a.upstream, job), result, job.cache_ttl_s)
                    finally:
                        written.set()

                async def settled() -> None:
                    with anyio.move_on_after(CACHE_SETTLE_S):
                        await written.wait()

                async with anyio.create_task_group() as tg:
                    tg.start_soon(write)
                    terminal = await self._store(a, result, then=then, before_answer=settled)
            else:
                terminal = await self._store(a, result, then=then)
            if terminal:
                return
        await self._report(a, call, terminal=terminal)

    async def _store(self, a: Assignment, result: Result,
                     then: Callable[[], Awaitable[None]] | None = None,
                     before_answer: Callable[[], Awaitable[None]] | None = None) -> bool:
        """Store the terminal Result (and its dead letter). True when stored (the job acked),
        False when it went back to the queue. `then` is the finisher's: awaited right after the
        ack, inside its shield, so the terminal outcome report it sends leaves in the same socket
        write as the reply and the ack (sent after `_store` returned, it came several loop
        iterations later in a write of its own: one of a worker's three NATS writes per job).

        NATS away (after the store's own retries): the job goes back to the queue, an
        infrastructure failure is retried, never blamed on the job. NATS refusing (a full
        Object Store bucket or results stream, error 10077 and the like) is final: the
        answer is paid for and asking again would meet the same wall, so the job ends
        `failed` with `result_not_stored`, its response without the body (`unstorable`)."""
        try:
            stored = await self.finisher.finish(result, ack=a.ack, reply_to=a.reply_to, then=then,
                                                before_answer=before_answer)
        except Exception as exc:  # noqa: BLE001 - see docstring
            if not refused(exc) or result.response is None:
                return await self._requeue(a, exc)
            log.error("NATS refused to store the Result of a paid call; the job ends without its answer",
                      error=type(exc).__name__, detail=str(exc)[:200])
            result = unstorable(result, exc)
            try:
                stored = await self.finisher.finish(result, ack=a.ack, reply_to=a.reply_to, then=then,
                                                    before_answer=before_answer)
            except Exception as again:  # noqa: BLE001 - nothing can be stored: retried later
                return await self._requeue(a, again)
        if stored and result.error and result.error.code in (ErrorCode.ATTEMPTS_EXHAUSTED, ErrorCode.RATE_LIMITED,
                                                             ErrorCode.RESULT_NOT_STORED):
            try:
                await self.finisher.dead(a.tier, result, job=a.job_data())
            except Exception as exc:  # noqa: BLE001 - the Result is stored and acked: the job is done
                log.error("dead letter not stored", error=type(exc).__name__)
        return True

    async def _requeue(self, a: Assignment, exc: BaseException) -> bool:
        log.error("could not store the Result; job goes back to the queue", error=type(exc).__name__,
                  detail=str(exc)[:200])
        self.calling.pop(a.id, None)  # no in-progress ack after the nak: it would postpone the retry
        with contextlib.suppress(Exception):  # else it returns after ack_wait
            await self.finisher.nak(a.ack, 1.0)
        return False

    def _call_result(self, a: Assignment, call: CallResult, queued_ms: float) -> Result:
        if call.code:  # the call settled the job by itself (e.g. response_too_large): final as it is
            return self._result(a, "failed", response=call.response, error=ErrorInfo(code=call.code, message=call.error),
                                queued_ms=queued_ms, upstream_ms=call.latency_ms)
        if call.kind == "ok":
            return self._result(a, "succeeded", response=call.response, queued_ms=queued_ms, upstream_ms=call.latency_ms)
        if call.kind == "rate_limited":
            error = ErrorInfo(code=ErrorCode.RATE_LIMITED, message=_rate_limited_message(a, call))
        elif call.kind == "denied" and a.denial_final:
            error = _request_denied(a, call)
        elif is_retryable(call.kind):
            what = call.error or f"HTTP {call.response.status}" if call.response else call.error
            error = ErrorInfo(code=ErrorCode.ATTEMPTS_EXHAUSTED, message=f"gave up after {a.attempt} attempts; last: {what}")
        else:
            error = ErrorInfo(code=ErrorCode.UPSTREAM_ERROR,
                              message=f"the upstream refused the request with HTTP {call.response.status}; not retried")
        return self._result(a, "failed", response=call.response, error=error, queued_ms=queued_ms, upstream_ms=call.latency_ms)

    def _result(self, a: Assignment, status: str, *, response=None, error=None, queued_ms=None, upstream_ms=None,
                called: bool = True) -> Result:
        """The Result of `a`; `called` False: this delivery ended without a call, so it is not
        counted in `attempts` (only the deliveries before it, which may have reached one)."""
        submitted = datetime.fromtimestamp(a.submitted_at, UTC)
        batch, metadata = _batch_and_metadata(a)
        return Result(job_id=a.job_id, status=status, tier=a.tier, batch=batch, response=response,
                      error=error, attempts=a.attempt if called else calls_before(a.attempt),
                      key_id=a.key_id, pool=a.pool, worker=self.id,
                      key_version=self.key_versions.get(a.id), variant=a.variant,
                      metadata=metadata, trace_id=note_result(status, error),
                      timings=Timings(submitted_at=submitted, queued_ms=queued_ms, upstream_ms=upstream_ms,
                                      total_ms=max(0.0, (time.time() - a.submitted_at) * 1000)))

    async def _report(self, a: Assignment, call: CallResult | None, *, terminal: bool, now: bool = False,
                      ended: bool = True) -> None:
        """Tell the leader what the assignment came to; sent with the other reports of this
        loop iteration (workers/outbox.py), or at once with `now`."""
        report = OutcomeReport(
            assignment=a.id, worker=self.id, key_id=a.key_id, job_id=a.job_id, terminal=terminal,
            kind=call.kind if call else OutcomeKind.NONE, status=call.response.status if call and call.response else None,
            retry_after_s=call.retry_after_s if call else None, ratelimit=call.ratelimit if call else None,
            actual_cost=call.actual_cost if call else None, latency_ms=call.latency_ms if call else None,
            code=call.provider_code if call else None,
            scope=call.scope.scope if call and call.scope else None)
        if ended:
            self.in_flight.pop(a.id, None)
        await self.reports.send(report.model_dump_json().encode(), now=now)


def _batch_and_metadata(a: Assignment) -> tuple[str | None, dict]:
    """The job's batch and metadata for its Result: from the validated job, else its raw JSON."""
    try:
        job = a.job_model()
    except ValidationError:
        data = a.job_data()
        batch = data.get("batch")
        return (batch if isinstance(batch, str) else None), data.get("metadata") or {}
    return job.batch, job.metadata


def _request_denied(a: Assignment, call: CallResult) -> ErrorInfo:
    """A 401/403, or a 404 naming the model (`model_not_found`, `DeploymentNotFound`: see
    schemas/signals.py), on a second key (or on the only key that could take the job): the
    request is refused, not the key; the keys stay in rotation (dispatcher/core/denials.py)."""
    status = call.response.status if call.response else None
    code = f" ({call.provider_code})" if call.provider_code else ""
    return ErrorInfo(code=ErrorCode.REQUEST_DENIED,
                     message=f"the upstream refused this request with HTTP {status}{code} on key {a.key_id} after "
                             "another key refused it too (or no other key could take it): the request is at fault, "
                             "not the keys, which stay in rotation; not retried")


def _rate_limited_message(a: Assignment, call: CallResult) -> str:
    """Why a job ended `rate_limited`, from what its last 429 said (ratelimit_scope.py)."""
    head = (f"answered 429 {a.rate_limited + 1} times (max_rate_limited = {a.max_rate_limited}); "
            f"the last one, on key {a.key_id}, ")
    scope = call.scope
    if scope is None:
        return head + ("gave no rate-limit headers or error detail saying whether the key was out of room "
                       "or the provider refused this request; it was counted against the key")
    if scope.scope == "request":
        return head + (f"was about this request, not the key: {scope.reason}; the key kept serving other "
                       "jobs, so the provider refuses this request itself (check its size and model)")
    return head + f"said the key was out of room: {scope.reason}; the keys stayed busy for as long as it waited"
