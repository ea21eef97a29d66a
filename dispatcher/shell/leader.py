"""The leader's session: pull jobs, ask the core what to dispatch, hand jobs to workers.

It lives while this dispatcher holds the lease. It is the only writer of key state
(invariant 2); it spends a token only when a worker slot is free (invariant 3); the
decisions come from the pure core (invariant 4) and outcomes flow back into it (6).
"""

from __future__ import annotations

import contextlib
import itertools
import json
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import anyio
from nats.aio.client import Client as NatsClient
from nats.aio.msg import Msg
from nats.errors import MaxPayloadError

from ratefleet.dispatcher.core import (
    Dispatch,
    Idle,
    Outcome,
    OutcomeKind,
    PendingJob,
    Reject,
    Scheduler,
    WaitUntil,
)
from ratefleet.dispatcher.fleet import AssignmentRecord, Fleet
from ratefleet.dispatcher.shell.intake import Incoming, Refused, read_message, unreadable
from ratefleet.dispatcher.shell.keycontrol import KeyControl
from ratefleet.dispatcher.shell.puller import HANDBACK_MARGIN_S, PULL_EXPIRES_S, TierPuller
from ratefleet.dispatcher.shell.refusals import finish_refused, refuse_incoming
from ratefleet.dispatcher.spec import scheduler_spec
from ratefleet.runtime.finish import Finisher, auth_headers
from ratefleet.runtime.handbacks import DeliveryCounts, Handbacks
from ratefleet.runtime.logs import get_logger
from ratefleet.runtime.store import read_result
from ratefleet.runtime.streams import tier_consumer, tier_max_deliver
from ratefleet.schemas import Config, ErrorCode, Subjects
from ratefleet.schemas.internal import Assignment, Heartbeat, LeaderAnnounce, OutcomeReport

log = get_logger("ratefleet.leader")
LOST = Outcome(kind="lost")


@dataclass
class Held:
    incoming: Incoming
    touched: float


class LeaderSession:
    def __init__(self, config: Config, nc: NatsClient, dispatcher_id: str, *, conservative: bool = True,
                 fence: Callable[[], bool] = lambda: True, epoch: tuple[int, int] = (0, 0),
                 renew: Callable[[], Awaitable[bool]] | None = None):
        self.config, self.nc, self.id = config, nc, dispatcher_id
        self.subjects = Subjects(config.nats.prefix)
        self.js = nc.jetstream()
        self.finisher = Finisher(nc, self.js, self.subjects, auth_headers(config))
        self.scheduler = Scheduler(scheduler_spec(config), time.monotonic(), conservative=conservative)
        self.fleet = Fleet(config.dispatcher.worker_timeout_s)
        self.held: dict[int, Held] = {}
        self.pullers = {tier: TierPuller(nc, self.subjects.jobs_stream, tier_consumer(tier), tier,
                                         config.dispatcher.window, self._on_job,
                                         held=lambda tier=tier: self.scheduler.pending(tier), fence=fence,
                                         max_deliver=tier_max_deliver(config, tier), hand_back=self._hand_back_late)
                        for tier in config.tiers}
        self.sequence = itertools.count(1)
        self.wake = anyio.Event()
        self.ready = False
        self.since = time.time()
        self.subs: list = []
        self._tasks: anyio.abc.TaskGroup | None = None  # the session's, for work off the dispatch loop
        # False once the lease may have lapsed: a paused-then-woken leader must not dispatch
        # or nak anything another leader may own by now
        self.fence = fence
        self.epoch = epoch  # fencing token on every assignment (see schemas/internal.py)
        self.renew = renew  # extends the lease while stepping down (the renewal loop has ended)
        self.handbacks = Handbacks(self.js, self.subjects.handbacks_bucket)
        self.keys = KeyControl(self.scheduler, self.fleet, self.js, self.subjects, fence)

    # -- lifecycle -------------------------------------------------------------------------

    async def run(self) -> None:
        """Dispatch until cancelled (lease lost or shutdown); then give back held jobs."""
        try:
            subscribe = self.nc.subscribe
            self.subs.append(await subscribe(self.subjects.heartbeat, cb=self._on_heartbeat, pending_msgs_limit=0))
            self.subs.append(await subscribe(self.subjects.outcome, cb=self._on_outcome, pending_msgs_limit=0))
            self.subs.append(await subscribe(self.subjects.leader_status, cb=self._on_status_request))
            await self.keys.restore()  # disabled keys and their reasons, from earlier leaders
            self.subs.append(await subscribe(self.subjects.admin_keys, cb=self._on_keys_command))
            await self._announce()
            async with anyio.create_task_group() as tg:
                self._tasks = tg
                tg.start_soon(self._housekeeping)
                tg.start_soon(self._schedule)
        finally:
            with anyio.CancelScope(shield=True):
                await self._step_down()

    async def _step_down(self) -> None:
        """Stop pulling and give back every held job at once, if the lease is still ours
        (best effort: NATS may be away; the jobs then come back after ack_wait)."""
        try:
            for puller in self.pullers.values():
                puller.stop_pulling()
            await self._renew()
            if self.fence():
                held = list(self.held.values())  # intake may still add to it while we wait
                pulling = any(p.outstanding for p in self.pullers.values())
                # while our pull requests are open, a job handed back at once would come back to us
                delay = PULL_EXPIRES_S + HANDBACK_MARGIN_S if pulling else 0.0
                async with anyio.create_task_group() as tg:  # all at once: one round trip, not one per job
                    for entry in held:
                        tg.start_soon(self.handbacks.hand_back, entry.incoming.stream_seq, self.finisher,
                                      entry.incoming.ack, delay)
                if pulling:
                    await anyio.sleep(PULL_EXPIRES_S)  # late arrivals are handed back by the pullers
                    await self._renew()
        except Exception as exc:  # noqa: BLE001 - see docstring
            log.warning("could not hand back held jobs; they return after ack_wait", error=type(exc).__name__)
        for puller in self.pullers.values():
            with contextlib.suppress(Exception):
                await puller.stop()
        for sub in self.subs:
            with contextlib.suppress(Exception):
                await sub.unsubscribe()
        with contextlib.suppress(Exception):
            await self.nc.flush(timeout=2)
        self.subs.clear()
        self.held.clear()
        self.scheduler.discard_pending()

    async def _renew(self) -> None:
        """Keep the lease through step-down, so late arrivals are still handed back (best
        effort: if it fails, the fence turns and they return after ack_wait)."""
        if self.renew is not None and self.fence():
            with contextlib.suppress(Exception), anyio.fail_after(1.0):
                await self.renew()

    # -- scheduling -------------------------------------------------------------------------

    async def _schedule(self) -> None:
        # learn the fleet (and the calls in flight on each key) before spending a token
        await anyio.sleep(self.config.workers.heartbeat_s * 1.5)
        self.ready = True
        for puller in self.pullers.values():
            await puller.start()
        while True:
            timeout = await self._dispatch_ready()
            with anyio.move_on_after(timeout):
                await self.wake.wait()
            self.wake = anyio.Event()

    async def _dispatch_ready(self) -> float:
        """Dispatch while workers have free slots; return how long to sleep."""
        while self.fleet.free_slots() > 0:
            if not self.fence():
                return 0.1
            now = time.monotonic()
            decision = self.scheduler.next(now, self.fleet.keys_without_free_holder(self.keys.key_ids))
            if isinstance(decision, Dispatch):
                await self._hand_out(decision, now)
            elif isinstance(decision, Reject):
                held = self.held.pop(decision.job.handle, None)
                if held is not None and self._tasks is not None:
                    # storing a Result and a dead letter takes round trips: not on the dispatch loop
                    self._tasks.start_soon(self._refuse, held.incoming, decision.code, decision.message)
            elif isinstance(decision, WaitUntil):
                return max(0.0, min(1.0, decision.at - now))
            else:
                assert isinstance(decision, Idle)
                return 1.0
        return 1.0

    async def _refuse(self, incoming: Incoming, code: str, message: str, status: str = "failed") -> None:
        try:
            await refuse_incoming(self.finisher, incoming, code, message, status)
        except Exception as exc:  # noqa: BLE001 - its JOBS message comes back after ack_wait
            log.warning("could not end a refused job; it comes back later", job_id=incoming.job_id,
                        error=type(exc).__name__)

    async def _hand_out(self, decision: Dispatch, now: float) -> None:
        held = self.held.pop(decision.job.handle, None)
        worker = self.fleet.pick(decision.key_id)
        if held is None or worker is None:  # cannot happen while slots are free; never leak tokens
            self.scheduler.cancel(decision.reservation, now)
            return
        incoming = held.incoming
        problem = await self._send(incoming, decision, worker.id, now)
        if problem is not None:
            self._unsendable(incoming, decision, now, problem)
        await self.pullers[incoming.tier].top_up()

    async def _send(self, incoming: Incoming, decision: Dispatch, worker_id: str, now: float) -> str | None:
        """Assign the job and send it to the worker; why it cannot be sent when it is the
        job's fault (too large for one NATS message, not serialisable), else None. NATS
        being away ends the session (re-raised, the assignment undone: no token spent)."""
        try:
            assignment, payload = self._assignment(incoming, decision)
        except Exception as exc:  # noqa: BLE001 - a validated job always serialises; if not, it alone ends
            return f"job cannot be serialised ({type(exc).__name__})"
        if len(payload) > self.nc.max_payload:  # intake bounds jobs below this; a job that grew is its own fault
            return (f"the job's assignment to a worker is {len(payload)} bytes, more than the NATS server's "
                    f"max_payload = {self.nc.max_payload}; make the job smaller")
        record = AssignmentRecord(assignment.id, worker_id, incoming.job_id, incoming.tier, decision.key_id,
                                  incoming.ack, decision.reservation, now)
        self.fleet.assign(record)
        try:
            await self.nc.publish(self.subjects.assign(worker_id), payload)
        except MaxPayloadError:  # the job's fault: it alone ends, the leader session goes on
            self.fleet.finish(record.id)
            return (f"the job's assignment to a worker ({len(payload)} bytes) is more than the NATS server "
                    "takes in one message; make the job smaller")
        except Exception:  # NATS away: the session ends; the job is not held, its message comes back
            self.fleet.finish(record.id)
            self.scheduler.complete(decision.reservation, LOST, now)  # not cancel: that requeues the job
            raise
        return None

    def _unsendable(self, incoming: Incoming, decision: Dispatch, now: float, why: str) -> None:
        """A job that cannot reach a worker: its reservation ends as LOST (no call made: the
        slot is freed and the key learns nothing; a cancel would requeue the job, which is no
        longer held, and the dispatch loop would spin on it) and it alone ends `invalid`."""
        self.scheduler.complete(decision.reservation, LOST, now)
        log.error("job cannot be sent to a worker; ended as invalid", job_id=incoming.job_id, reason=why)
        if self._tasks is not None:
            self._tasks.start_soon(self._refuse, incoming, ErrorCode.INVALID_JOB, why, "invalid")

    def _assignment(self, incoming: Incoming, decision: Dispatch) -> tuple[Assignment, bytes]:
        assignment = Assignment(
            id=f"{self.id}.{next(self.sequence)}", job=incoming.job.model_dump(mode="json", by_alias=True, exclude_none=True),
            job_id=incoming.job_id, tier=incoming.tier, upstream=incoming.upstream, key_id=decision.key_id,
            pool=decision.pool, ack=incoming.ack, reply_to=incoming.reply_to, attempt=incoming.attempt,
            max_attempts=incoming.max_attempts, submitted_at=incoming.submitted_at,
            queued_ms=max(0.0, (time.time() - incoming.submitted_at) * 1000), epoch=self.epoch,
            seq=incoming.stream_seq, denial_final=decision.reservation.denial_final,
            rate_limited=incoming.rate_limited, max_rate_limited=incoming.max_rate_limited)
        return assignment, assignment.model_dump_json().encode()

    async def _announce(self) -> None:
        """Tell the workers our epoch: from now on they drop assignments of earlier leaders."""
        if self.fence():
            announce = LeaderAnnounce(leader=self.id, epoch=self.epoch)
            await self.nc.publish(self.subjects.leader_announce, announce.model_dump_json().encode())

    # -- intake -----------------------------------------------------------------------------

    async def _on_job(self, tier: str, msg: Msg) -> None:
        """Take a delivery in. While the lease may have lapsed (fenced), nothing is ended, nak'd
        or dispatched: the message may be the new leader's by now. It is held, and dispatched
        only if the lease turns out to be ours. The server's last delivery (`max_deliver`) is
        the exception: nobody else will get it, so intake ends it whatever the fence says."""
        meta = msg.metadata
        final = meta.num_delivered >= tier_max_deliver(self.config, tier)
        if meta.sequence.stream in self.held and not final:
            return  # a redelivery of a job we still hold (its keep-alive came late)
        redelivered = meta.num_delivered > 1
        known = await self.handbacks.counts(meta.sequence.stream) if redelivered else DeliveryCounts()
        try:
            verdict = read_message(msg, tier, self.config, known.handbacks, known.rate_limited,
                                   max_payload=self.nc.max_payload)
        except Exception as exc:  # noqa: BLE001 - one message's content must never stop intake
            log.exception("could not read a job message; ended as invalid", tier=tier)
            verdict = unreadable(msg, tier, exc)
        if isinstance(verdict, Refused):
            if final or self.fence():
                await finish_refused(self.finisher, verdict)
            return
        if verdict.stream_seq in self.held:
            return  # taken in by an earlier delivery while we looked things up
        if redelivered and await self._finished_before(verdict):
            return
        if not self.pullers[tier].active:  # stepping down began while we looked things up
            if self.fence():
                await self._hand_back_late(msg, PULL_EXPIRES_S + HANDBACK_MARGIN_S)
            return
        self.held[verdict.stream_seq] = Held(verdict, time.monotonic())
        self.scheduler.add(PendingJob(job_id=verdict.job_id, tier=tier, upstream=verdict.upstream,
                                      cost=verdict.job.cost, handle=verdict.stream_seq), time.monotonic())
        self.wake.set()

    async def _finished_before(self, incoming: Incoming) -> bool:
        """A redelivered job may have its Result stored already: its worker stored it and
        died before the ack. Then it is answered and acked from the store, not called again."""
        stored = None
        with anyio.move_on_after(2.0):  # a slow store must not stall intake: then it is called
            stored = await read_result(self.js, self.subjects, incoming.job_id, incoming.job.batch)
        if stored is None:
            return False
        if self.fence():  # (fenced: leave the message alone; its owner finds the Result too)
            log.info("redelivered job already has its result; acked without a second call", job_id=incoming.job_id,
                     tier=incoming.tier, attempt=incoming.attempt)
            await self.finisher.finish_stored(stored, ack=incoming.ack, reply_to=incoming.reply_to)
        return True

    async def _hand_back_late(self, msg: Msg, delay_s: float) -> None:
        """A job that arrived while stepping down goes back to the queue; not an attempt."""
        await self.handbacks.hand_back(msg.metadata.sequence.stream, self.finisher, msg.reply, delay_s)

    # -- feedback ---------------------------------------------------------------------------

    async def _on_outcome(self, msg: Msg) -> None:
        try:
            report = OutcomeReport.model_validate_json(msg.data)
        except ValueError:
            return
        now = time.monotonic()
        record = self.fleet.finish(report.assignment)
        outcome = _outcome(report)
        if record is not None:
            self.scheduler.complete(record.reservation, outcome, now)
        elif report.kind != "none":
            self.scheduler.complete_unknown(report.key_id, outcome, now)
        await self.keys.flush()
        self.wake.set()

    async def _on_keys_command(self, msg: Msg) -> None:
        await self.keys.on_command(msg)
        self.wake.set()

    async def _on_heartbeat(self, msg: Msg) -> None:
        try:
            beat = Heartbeat.model_validate_json(msg.data)
        except ValueError:
            return
        now = time.monotonic()
        is_new, lost = self.fleet.beat(beat, now)
        self.keys.sync_secrets()
        if is_new:
            self._adopt(beat, now)
            log.info("worker joined", worker=beat.worker, slots=beat.slots, in_flight=len(beat.in_flight))
        for record in lost:
            log.warning("assignment lost on its way; job goes back to the queue", job_id=record.job_id,
                        worker=record.worker)
            await self._return(record, now)
        self.wake.set()

    def _adopt(self, beat: Heartbeat, now: float) -> None:
        """Calls a worker already has in flight (from an earlier leader) count against their keys."""
        for item in beat.in_flight:
            if item.assignment in self.fleet.by_assignment:
                continue
            try:
                adopted = self.scheduler.adopt_in_flight(item.key_id, 1, now)
            except ValueError:
                log.error("worker runs a key this dispatcher does not know; deploy one config to the whole fleet",
                          worker=beat.worker, key_id=item.key_id)
                continue
            for reservation in adopted:
                self.fleet.assign(AssignmentRecord(item.assignment, beat.worker, item.job_id, "?", item.key_id,
                                                   "", reservation, now))

    async def _return(self, record: AssignmentRecord, now: float) -> None:
        """Give a job back to the queue. It counts as an attempt: a call may have been made
        (its worker went silent mid-call, or only the outcome report went missing)."""
        self.scheduler.complete(record.reservation, LOST, now)
        if record.ack and self.fence():
            await self.finisher.nak(record.ack)

    async def _housekeeping(self) -> None:
        interval = max(0.2, min(1.0, self.config.workers.heartbeat_s / 2))
        keep_alive_after = self.config.streams.ack_wait_s / 3
        while True:
            await anyio.sleep(interval)
            if not self.fence():
                continue  # woken after a pause: the lease check ends this session
            now = time.monotonic()
            for worker, records in self.fleet.expire(now):
                log.warning("worker silent; returning its jobs to the queue", worker=worker.id, jobs=len(records))
                for record in records:
                    await self._return(record, now)
            self.keys.sync_secrets()
            for held in self.held.values():
                if now - held.touched > keep_alive_after:
                    held.touched = now
                    await self.finisher.in_progress(held.incoming.ack)
            await self._announce()  # for workers that joined (or reconnected) since
            if self.ready:
                for puller in self.pullers.values():
                    await puller.check_stale()
            self.wake.set()

    # -- status -----------------------------------------------------------------------------

    async def _on_status_request(self, msg: Msg) -> None:
        await msg.respond(json.dumps(self.status()).encode())

    def status(self) -> dict:
        now = time.monotonic()
        snap = self.scheduler.snapshot(now)
        return {"leader": self.id, "leader_since": self.since, "keys": snap["keys"], "tiers": snap["tiers"],
                "workers": self.fleet.snapshot(now)}


def _outcome(report: OutcomeReport) -> Outcome:
    return LOST if report.kind == OutcomeKind.NONE else Outcome.from_report(report)
