"""The leader's session: NATS in, events to the state machine, its commands out to NATS.

It lives while this dispatcher holds the lease. Every decision is the pure state machine's
(dispatcher/core/leader.py); this shell only translates. Heartbeats, outcome reports,
operator commands and pull-inbox deliveries become events (events.py) on ONE queue
(`post`); one reader in the session's task group takes them a burst at a time, hands them
with the monotonic time to `LeaderMachine.handle_all`, and carries the commands out through a
LeaderBus (bus.py). No NATS callback changes the leader's state. The reader also keeps time:
when nothing arrives before `wake_at()`, it hands in a `Tick`.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import json
import math
import time
from collections.abc import Awaitable, Callable, Container, Sequence
from typing import Any

import anyio
from anyio.abc import TaskGroup

from ratefleet.dispatcher.core import Outcome, OutcomeKind
from ratefleet.dispatcher.core import commands as cmd
from ratefleet.dispatcher.core import events as ev
from ratefleet.dispatcher.core.leader import LeaderMachine, LeaderSettings
from ratefleet.dispatcher.core.leader_fleet import LOST
from ratefleet.dispatcher.shell.assign_out import send_assignments
from ratefleet.dispatcher.shell.bus import LeaderBus
from ratefleet.dispatcher.shell.puller import TierInbox
from ratefleet.dispatcher.spec import scheduler_spec
from ratefleet.runtime.logs import get_logger
from ratefleet.runtime.streams import tier_consumer, tier_max_deliver
from ratefleet.schemas import Config
from ratefleet.schemas.internal import Heartbeat, OutcomeReport, read_reports

log = get_logger("ratefleet.leader")
BURST = 256  # events handed to the machine at once (one dispatch pass)
PASS_GRACE_S = 30.0  # longest a dispatch pass may hold off a stop (only a stalled NATS takes that long)
STOP_GRACE_S = 10.0  # at a stop, how much longer the jobs' ends and hand-backs under way may take
Renew = Callable[[], Awaitable[float | None]]  # extends the lease: its new end (monotonic), None: lost


def leader_settings(config: Config, leader_id: str, epoch: tuple[int, int], max_payload: int) -> LeaderSettings:
    """The state machine's settings from the config (seconds, bytes)."""
    return LeaderSettings(
        leader_id=leader_id, epoch=epoch, windows={tier: config.dispatcher.window for tier in config.tiers},
        max_deliver={tier: tier_max_deliver(config, tier) for tier in config.tiers},
        ready_after_s=config.workers.heartbeat_s * 1.5,
        housekeeping_s=max(0.2, min(1.0, config.workers.heartbeat_s / 2)),
        keep_alive_after_s=config.streams.ack_wait_s / 3, worker_timeout_s=config.dispatcher.worker_timeout_s,
        max_payload=max_payload, since=time.time())


def _wake(waiter: asyncio.Future[None]) -> None:
    """Ends the reader's wait (an event posted, or its timeout)."""
    if not waiter.done():
        waiter.set_result(None)


class LeaderSession:
    def __init__(self, config: Config, bus: LeaderBus, dispatcher_id: str, *, conservative: bool = True,
                 epoch: tuple[int, int] = (0, 0), lease_until: float = math.inf, renew: Renew | None = None,
                 config_revision: int | None = None):
        self.config, self.bus, self.id = config, bus, dispatcher_id
        self.subjects = bus.subjects
        settings = leader_settings(config, dispatcher_id, epoch, bus.max_payload)
        self.machine = LeaderMachine(settings, scheduler_spec(config), time.monotonic(), conservative=conservative,
                                     lease_until=lease_until)
        self.machine.config_revision = config_revision
        self.renew = renew  # extends the lease while stepping down (the renewal loop has ended)
        # the events waiting for the reader, and the future it sleeps on while there are none: an
        # anyio memory stream (a receive under move_on_after) cost 30-40 µs a wake-up here, a
        # deque and one future 10-20; at 500 requests/s the reader wakes twice a job
        self._events: collections.deque[ev.Event] = collections.deque()
        self._waiter: asyncio.Future[None] | None = None
        self._ended = False  # after step-down: events posted are dropped
        # called with what is missing when a pull request finds no consumer (NATS lost its store)
        self.gone: Callable[[str], None] = lambda what: None
        self._cancelled: Container[str] = frozenset()
        self.inboxes = {tier: self._inbox(config, tier) for tier in config.tiers}
        self.subs: list[Any] = []
        self._finishing: set[anyio.CancelScope] = set()  # the ends and hand-backs under way (`_background`)
        self._stop_at: float | None = None  # (anyio clock) their deadline once the session stops

    # -- events in ------------------------------------------------------------------------

    def post(self, event: ev.Event) -> None:
        """Queue an event for the session's reader (never blocks; callable from any callback).
        Once the session has ended, dropped."""
        if self._ended:
            return
        self._events.append(event)
        if self._waiter is not None:
            _wake(self._waiter)

    async def reconfigure(self, config: Config, revision: int) -> None:
        """A new fleet config revision: pull inboxes for new tiers first, then the change goes
        to the machine as an event, in order with everything else (core/leader_config.py).
        A removed tier's inbox stays subscribed (its late deliveries are handed back; it is
        reused if the tier comes back) until the session ends."""
        for tier in config.tiers:
            if tier not in self.inboxes:
                inbox = self._inbox(config, tier)
                await inbox.start()
                self.inboxes[tier] = inbox
            self.inboxes[tier].max_deliver = tier_max_deliver(config, tier)
        for tier in config.tiers:  # a removed tier's inbox keeps the config that knew it
            self.inboxes[tier].config = config
        self.config = config
        settings = leader_settings(config, self.id, (0, 0), 0)
        self.post(ev.ConfigChanged(revision, scheduler_spec(config), settings.windows, settings.max_deliver))

    def _inbox(self, config: Config, tier: str) -> TierInbox:
        return TierInbox(self.bus, config, tier, self.subjects.jobs_stream, tier_consumer(tier),
                         tier_max_deliver(config, tier), self.post, gone=lambda what: self.gone(what),
                         cancelled=self._cancelled)

    @property
    def cancelled(self) -> Container[str]:
        """The names of cancelled batches (ratefleet/runtime/cancels.py CancelledBatches, kept
        current by its watch): the pull inboxes' intake ends their jobs uncalled."""
        return self._cancelled

    @cancelled.setter
    def cancelled(self, names: Container[str]) -> None:
        self._cancelled = names
        for inbox in self.inboxes.values():  # (an inbox made later, for a new tier, gets it too)
            inbox.cancelled = names

    def lease_renewed(self, until: float) -> None:
        self.post(ev.LeaseRenewed(until))

    def lease_lost(self) -> None:
        self.post(ev.LeaseLost())

    async def _on_heartbeat(self, msg: Any) -> None:
        try:
            self.post(ev.HeartbeatReceived(Heartbeat.model_validate_json(msg.data)))
        except ValueError:
            return

    async def _on_outcome(self, msg: Any) -> None:
        """One report, or a worker's batch of them (schemas/internal.py): each its own event."""
        try:
            reports = read_reports(msg.data)
        except ValueError:
            return
        for report in reports:
            self.post(ev.OutcomeReported(report.assignment, report.key_id, _outcome(report)))

    async def _on_keys_command(self, msg: Any) -> None:
        try:
            self.post(ev.KeyCommand(json.loads(msg.data), msg.reply))
        except (ValueError, TypeError) as exc:
            self.post(ev.KeyCommand(None, msg.reply, type(exc).__name__))

    async def _on_status_request(self, msg: Any) -> None:
        await self.bus.publish(msg.reply, json.dumps(self.status()).encode())

    # -- lifecycle --------------------------------------------------------------------------

    async def run(self) -> None:
        """Lead until cancelled (lease lost or shutdown); then step down."""
        try:
            subscribe = self.bus.subscribe
            self.subs.append(await subscribe(self.subjects.heartbeat, self._on_heartbeat))
            self.subs.append(await subscribe(self.subjects.outcome, self._on_outcome))
            self.subs.append(await subscribe(self.subjects.leader_status, self._on_status_request))
            records = await self.bus.load_keys()  # disabled keys and their reasons, from earlier leaders
            self.post(ev.SessionStarted(records, time.time()))  # (applied before any operator command)
            self.subs.append(await subscribe(self.subjects.admin_keys, self._on_keys_command))
            for inbox in self.inboxes.values():
                await inbox.start()
            async with anyio.create_task_group() as tg:
                try:
                    await self._read(tg)
                finally:
                    self._stopping()  # the ends under way get STOP_GRACE_S more; then the group is left
        finally:
            with anyio.CancelScope(shield=True):
                await self._step_down()

    async def _read(self, tg: TaskGroup, until: float = math.inf) -> None:
        """Hand events (or a Tick when none comes in time) to the machine, a burst at a time;
        carry out its commands."""
        while time.monotonic() < until:
            events = self._queued()
            if not events:
                await self._posted(min(until, self.machine.wake_at()) - time.monotonic())
                events = self._queued() or [ev.Tick()]
            await self._carry_out(self.machine.handle_all(events, time.monotonic()), tg)

    async def _posted(self, timeout: float) -> None:
        """Sleep until an event is posted or `timeout` seconds have passed. At 0 or less it still
        yields to the loop once: a machine whose wake_at stays in the past would else spin the
        reader without ever letting the callbacks that post events (or anything else) run."""
        if timeout <= 0:
            await asyncio.sleep(0)
            return
        loop = asyncio.get_running_loop()
        waiter = self._waiter = loop.create_future()
        timer = loop.call_later(timeout, _wake, waiter) if timeout < math.inf else None
        try:
            await waiter
        finally:
            self._waiter = None
            if timer is not None:
                timer.cancel()

    def _queued(self, most: int = BURST) -> list[ev.Event]:
        events = self._events
        if len(events) <= most:
            taken = list(events)
            events.clear()
            return taken
        return [events.popleft() for _ in range(most)]

    async def _read_queued(self, tg: TaskGroup) -> None:
        while events := self._queued():
            await self._carry_out(self.machine.handle_all(events, time.monotonic()), tg)

    async def _handle(self, event: ev.Event, tg: TaskGroup) -> None:
        await self._carry_out(self.machine.handle(event, time.monotonic()), tg)

    async def _step_down(self) -> None:
        """Stop pulling and give back every held job at once, if the lease is still ours
        (best effort: NATS may be away; the jobs then come back after ack_wait)."""
        try:
            await self._renew()
            commands = self.machine.handle(ev.StepDown(), time.monotonic())
            for inbox in self.inboxes.values():
                inbox.reading = False
            async with anyio.create_task_group() as tg:  # all at once: one round trip, not one per job
                await self._carry_out(commands, tg)
                for linger in (c for c in commands if isinstance(c, cmd.Linger)):
                    await self._read(tg, time.monotonic() + linger.seconds)
                    await self._renew()
        except Exception as exc:  # noqa: BLE001 - see docstring
            log.warning("could not hand back held jobs; they return after ack_wait", error=type(exc).__name__)
        for inbox in self.inboxes.values():
            with contextlib.suppress(Exception):
                await inbox.stop()
        with contextlib.suppress(Exception):
            async with anyio.create_task_group() as tg:
                await self._read_queued(tg)  # what the drains turned into events
        for sub in self.subs:
            with contextlib.suppress(Exception):
                await sub.unsubscribe()
        with contextlib.suppress(Exception):
            await self.bus.flush(timeout=2)
        self.subs.clear()
        self._end_events()

    def _end_events(self) -> None:
        """Drop what is still queued and every event posted from now on (a late callback)."""
        self._ended = True
        self._events.clear()

    async def _renew(self) -> None:
        """Keep the lease through step-down, so late arrivals are still handed back (best
        effort: if it fails, the fence turns and they return after ack_wait)."""
        if self.renew is None or not self.machine.owns(time.monotonic()):
            return
        until: float | None = math.nan
        with contextlib.suppress(Exception), anyio.fail_after(1.0):
            until = await self.renew()
        if until is None:
            self.machine.handle(ev.LeaseLost(), time.monotonic())
        elif not math.isnan(until):
            self.machine.handle(ev.LeaseRenewed(until), time.monotonic())

    # -- commands out -----------------------------------------------------------------------

    async def _carry_out(self, commands: Sequence[cmd.Command], tg: TaskGroup) -> None:
        """Carry out `commands` in order, except the assignments: they go last, one message
        per worker for the whole pass (assign_out.py).

        Shielded from cancellation: the machine counts a pass's assignments as sent once it
        returns them, so a stop (SIGTERM, lease lost) in the middle of a pass would leave those
        jobs with no worker and no hand-back until ack_wait. A stop waits for the pass instead,
        PASS_GRACE_S at most (a stalled NATS): what such a pass left undone comes back as NATS
        being away does (an assignment no heartbeat lists is returned; the rest after ack_wait).
        A pass with nothing to do (most outcome reports) makes no scope and no timer."""
        if not commands:
            return
        with anyio.CancelScope(shield=True, deadline=anyio.current_time() + PASS_GRACE_S) as scope:
            assigns: dict[str, list[cmd.Assign]] = {}
            for command in commands:
                if isinstance(command, cmd.Assign):
                    assigns.setdefault(command.worker, []).append(command)
                    continue
                try:
                    await self._do(command, tg)
                except Exception as exc:  # noqa: BLE001 - NATS away: what was not done comes back after ack_wait
                    log.warning("leader command failed", command=type(command).__name__, error=type(exc).__name__)
            for worker, batch in assigns.items():
                await self._assign(worker, batch, tg)
        if scope.cancelled_caught:
            log.warning("a dispatch pass was cut after PASS_GRACE_S (NATS stalled); what it did not send comes back "
                        "after ack_wait", seconds=PASS_GRACE_S)

    async def _assign(self, worker: str, batch: list[cmd.Assign], tg: TaskGroup) -> None:
        """Send a worker its assignments; one too large: that job alone ends. NATS away ends
        the session (after the machine learnt which were not sent)."""
        failed, error = await send_assignments(self.bus, self.subjects.assign(worker), batch)
        for event in failed:
            await self._handle(event, tg)
        if error is not None:
            raise error

    async def _do(self, command: cmd.Command, tg: TaskGroup) -> None:
        bus = self.bus
        if isinstance(command, cmd.Pull):
            await self.inboxes[command.tier].pull(command.batch, command.expires_s)
        elif isinstance(command, cmd.Nak):
            await bus.nak(command.ack, command.delay_s)
        elif isinstance(command, cmd.InProgress):
            await bus.in_progress(command.ack)
        elif isinstance(command, cmd.HandBack):
            tg.start_soon(self._background, "hand back", None, bus.hand_back, command.seq, command.ack, command.delay_s)
        elif isinstance(command, cmd.EndRefused):
            tg.start_soon(self._background, "end", command.refused.job_id, bus.end_refused, command.refused)
        elif isinstance(command, cmd.EndJob):
            c = command
            tg.start_soon(self._background, "end", c.incoming.job_id, bus.end_job, c.incoming, c.code, c.message,
                          c.status)
        elif isinstance(command, cmd.AnswerStored):
            await bus.answer_stored(command.stored, command.ack, command.reply_to)
        elif isinstance(command, cmd.EndCopy):
            # off the pass: its follow reads the Result first (retried up to rpc.FALLBACK_READ_S)
            tg.start_soon(self._background, "end a copy of", command.incoming.job_id, bus.end_copy, command.incoming)
        elif isinstance(command, cmd.Announce):
            await bus.publish(self.subjects.leader_announce, command.payload)
        elif isinstance(command, cmd.SaveKey):
            await bus.save_key(command.key_id, command.record)
        elif isinstance(command, cmd.Respond):
            await self._respond(command)
        elif isinstance(command, cmd.Log):
            getattr(log, command.level)(command.message, **command.fields)

    async def _respond(self, command: cmd.Respond) -> None:
        answer = dict(command.answer)
        if command.saves:
            persisted = True
            for save in command.saves:
                persisted = await self.bus.save_key(save.key_id, save.record) and persisted
            answer["persisted"] = persisted
        await self.bus.publish(command.reply, json.dumps(answer).encode())

    async def _background(self, what: str, job_id: str | None, work: Callable[..., Awaitable[None]],
                          *args: Any) -> None:
        """Ending or handing back a job takes round trips: off the reader, and finished even when
        the session stops (shielded; the stop then allows STOP_GRACE_S more at most). The
        machine counts it as done once it asked: cut at a stop, the job would wait out ack_wait,
        and a last delivery (max_deliver) that is not ended never comes back at all. A failure
        leaves its JOBS message to come back after ack_wait."""
        with anyio.CancelScope(shield=True) as scope:
            self._finishing.add(scope)
            if self._stop_at is not None:
                scope.deadline = self._stop_at
            try:
                await work(*args)
            except Exception as exc:  # noqa: BLE001 - its JOBS message comes back after ack_wait
                log.warning(f"could not {what} a job; it comes back after ack_wait", job_id=job_id,
                            error=type(exc).__name__)
            finally:
                self._finishing.discard(scope)
        if scope.cancelled_caught:
            log.warning(f"could not {what} a job within STOP_GRACE_S of the stop; it comes back after ack_wait",
                        job_id=job_id, seconds=STOP_GRACE_S)

    def _stopping(self) -> None:
        """The session stops: the ends and hand-backs under way (and any started from now on)
        get STOP_GRACE_S seconds more at most."""
        if self._stop_at is None:
            self._stop_at = anyio.current_time() + STOP_GRACE_S
        for scope in self._finishing:
            scope.deadline = min(scope.deadline, self._stop_at)

    # -- status -----------------------------------------------------------------------------

    def status(self) -> dict[str, Any]:
        """The leader's view (read only): keys, tiers, workers, and its cache lookups
        (`cache`: hits, misses, writes, errors; see ratefleet/runtime/cache.py)."""
        return {**self.machine.status(time.monotonic()), "cache": self.bus.cache_stats()}


def _outcome(report: OutcomeReport) -> Outcome:
    return LOST if report.kind == OutcomeKind.NONE else Outcome.from_report(report)
