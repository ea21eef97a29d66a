"""The leader as a state machine: `handle(event, now) -> commands`, no I/O, no clock.

Everything the leader decides lives here; the shell (dispatcher/shell/leader.py) only turns
NATS messages, lease renewals and timers into events (events.py), hands them in one at a
time from one task, and carries out the commands (commands.py) in order.

Rules it keeps (design invariants 1-3, 6, 8):
* Fencing: the lease is ours until `LeaseRenewed.until`. Past it (a paused-then-woken
  leader) nothing is dispatched, nak'd, handed back or ended: the message may be another
  leader's by now. Held jobs stay held, and run only if the lease turns out to be ours.
* The last delivery: a delivery the server will not repeat (`delivered >= max_deliver`) is
  never handed back or dropped; intake ends it (as a poison message) whatever the fence says.
* Readiness: nothing is pulled or dispatched until `ready_after_s` after the start, so the
  fleet and the calls in flight on each key are known before a token is spent.
* A token is spent only while a worker slot is free, on a worker holding the key's secret.
* Step-down: stop pulling, hand back every held job at once (after the open pull requests
  expired, if any are open, or they would come straight back), and hand back late arrivals.
* A redelivered job whose Result is stored is answered from the store, never called again.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable
from typing import Any

from ratefleet.schemas import ErrorCode
from ratefleet.schemas.internal import LeaderAnnounce
from ratefleet.schemas.job import requested_model

from . import events as ev
from .commands import (
    Announce,
    AnswerStored,
    Assign,
    Command,
    EndCopy,
    EndJob,
    EndRefused,
    HandBack,
    InProgress,
    Linger,
    Log,
)
from .delivery import Incoming, cancelled_job
from .fleet import AssignmentRecord, Fleet
from .handout import Held, HeldJobs, LeaderSettings, assignment_payload, next_number
from .leader_config import apply_config
from .leader_fleet import LOST, FleetKeeper
from .leader_keys import KeyKeeper
from .pulls import HANDBACK_MARGIN_S, PULL_EXPIRES_S, PullBook
from .scaling import ScalingMeter
from .scheduler import Scheduler
from .types import Dispatch, PendingJob, Reject, SchedulerSpec, WaitUntil

LOOKUP_RETRY_S = 2.0  # seconds before a redelivery whose Result lookup got no answer comes back


class LeaderMachine:
    """One leadership's state: scheduler, fleet, held jobs, pulls, lease; see the module docstring."""

    def __init__(self, settings: LeaderSettings, spec: SchedulerSpec, now: float, *, conservative: bool = True,
                 lease_until: float = float("inf")) -> None:
        self.settings = settings
        self.scheduler = Scheduler(spec, now, conservative=conservative)
        self.fleet = Fleet(settings.worker_timeout_s)
        self.keys = KeyKeeper(self.scheduler, self.fleet)
        self.workers = FleetKeeper(self.scheduler, self.fleet, self.keys)
        self.pulls = PullBook(dict(settings.windows), now)
        self.held = HeldJobs()
        self.lease_until = lease_until
        self.ready_at = float("inf")  # SessionStarted sets it
        self.ready = False
        self.stepping_down = False
        self.next_housekeeping = now + settings.housekeeping_s
        self.dispatch_at = float("inf")  # set by each dispatch pass once ready
        self._sequence = itertools.count(1)
        self.scaling = ScalingMeter()  # arrivals and call latency for the scaling signal
        self.config_revision: int | None = None  # the fleet config revision applied (None: the local file's)

    # -- the one entry point -----------------------------------------------------------------

    def handle(self, event: ev.Event, now: float) -> list[Command]:
        """Apply one event at `now` (monotonic seconds); return what the shell must do, in order."""
        return self.handle_all((event,), now)

    def handle_all(self, events: Iterable[ev.Event], now: float) -> list[Command]:
        """Apply events that arrived together, then dispatch once (a burst of deliveries or
        outcomes costs one pass over the queue, not one per event)."""
        out: list[Command] = []
        changed = False
        for event in events:
            out += self._apply(event, now)
            changed = changed or not isinstance(event, ev.Tick | ev.PullStatus)
        if not self.stepping_down:
            out += self._timers(now)
            if changed or now >= self.dispatch_at:  # a Tick before a WaitUntil changes nothing
                out += self._dispatch(now)
        return out

    def wake_at(self) -> float:
        """When the machine wants a `Tick` at the latest (monotonic seconds; inf: never)."""
        if self.stepping_down:
            return float("inf")
        soonest = min(self.next_housekeeping, self.dispatch_at)
        return soonest if self.ready else min(soonest, self.ready_at)

    def owns(self, now: float) -> bool:
        """Whether the lease is surely still ours (False: fenced)."""
        return now < self.lease_until

    def _apply(self, event: ev.Event, now: float) -> list[Command]:
        if isinstance(event, ev.JobDelivered):
            if event.delivered == 1:
                self.scaling.arrived(now)
            return self._on_job(event, now)
        if isinstance(event, ev.HeartbeatReceived):
            return self.workers.heartbeat(event.beat, now, self.owns(now))
        if isinstance(event, ev.OutcomeReported):
            if event.outcome.latency_ms is not None:
                self.scaling.called(event.outcome.latency_ms / 1000)
            return self.workers.outcome(event.assignment, event.key_id, event.outcome, now)
        if isinstance(event, ev.PullStatus):
            return self._on_pull_status(event, now)
        if isinstance(event, ev.LeaseRenewed):
            self.lease_until = event.until
        elif isinstance(event, ev.LeaseLost):
            self.lease_until = float("-inf")
        elif isinstance(event, ev.SessionStarted):
            self.ready_at = now + self.settings.ready_after_s  # learn the fleet before spending a token
            return [*self.keys.restore(event.key_records, event.wall, now), *self._announce(now)]
        elif isinstance(event, ev.BatchCancelled):
            return self._on_batch_cancelled(event.batch, now)
        elif isinstance(event, ev.KeyCommand):
            return self.keys.command(event.request, event.reply, event.error, now) if self.owns(now) else []
        elif isinstance(event, ev.AssignFailed):
            return self._on_assign_failed(event, now)
        elif isinstance(event, ev.ConfigChanged):
            return apply_config(self, event, now)
        elif isinstance(event, ev.StepDown):
            return self._step_down(now)
        return []

    # -- intake ------------------------------------------------------------------------------

    def _on_job(self, event: ev.JobDelivered, now: float) -> list[Command]:
        if event.tier not in self.pulls.tiers:
            return self._on_removed_tier(event, now)
        self.pulls.delivered(event.tier, now)
        final = event.delivered >= self.settings.max_deliver[event.tier]
        owned = self.owns(now)
        if self.stepping_down and not final:
            # handed back only after our open pull requests expired, or it comes straight back;
            # fenced: it may be the new leader's by now, and a stale nak would deliver it again
            return [HandBack(event.seq, event.ack, PULL_EXPIRES_S + HANDBACK_MARGIN_S)] if owned else []
        if event.seq in self.held and not final:
            return []  # a redelivery of a job we still hold (its keep-alive came late)
        job_id = event.verdict.job_id if event.verdict is not None else None
        if self.fleet.calling(event.seq, job_id) and not final:
            # a worker is calling it: a JetStream consumer whose leader changed (a cluster server
            # restarted) redelivers at once what it had not replicated as delivered. Handing it
            # out again would pay twice; the worker's ack, nak or in-progress (by stream sequence)
            # settles the message, and if the worker dies its jobs are nak'd as usual. A call
            # adopted from an earlier leadership is known by its job id (heartbeats carry no sequence)
            return [Log("info", "redelivery of a job a worker is calling; not handed out again",
                        {"job_id": job_id, "tier": event.tier, "attempt": event.delivered})]
        verdict = event.verdict
        if verdict is None:
            return []  # not read (the shell reads every delivery but late ones at step-down)
        if not isinstance(verdict, Incoming):
            # the last delivery ends here whatever the fence says: nobody else will get it
            # and the tier pulls on at once: a run of refused jobs (a cancelled batch) would
            # otherwise be read one window per housekeeping tick (~128 jobs/s)
            return [EndRefused(verdict), *self._top_up(event.tier, now)] if final or owned else []
        if event.stored is not None:  # its worker stored the Result and died before the ack
            if not owned:
                return []  # its owner finds the Result too
            said = ("answered from the cache; acked without a call" if event.cached
                    else "redelivered job already has its result; acked without a second call")
            return [Log("info", said, {"job_id": verdict.job_id, "tier": verdict.tier, "attempt": verdict.attempt}),
                    AnswerStored(event.stored, verdict.ack, verdict.reply_to), *self._top_up(event.tier, now)]
        copy_of = self.held.seq_of(verdict.job_id, verdict.job.batch)
        if copy_of is None:
            copy_of = self.fleet.calling_seq(verdict.job_id, verdict.job.batch)
        if copy_of is not None and copy_of != event.seq:
            # the same job (id and batch) in a second message (sent again past the dedup window, or a
            # copy whose first was handed back): one call, one Result; the first message's. (An id
            # reused by another batch is that batch's own job: it gets its own Result there.)
            if not owned:
                return []
            return [Log("info", "a second message of a job held or being called; ended without a call",
                        {"job_id": verdict.job_id, "tier": verdict.tier, "first_seq": copy_of, "seq": event.seq}),
                    EndCopy(verdict), *self._top_up(event.tier, now)]
        if (event.looked_up_at is not None and not final
                and self.fleet.ended_since(verdict.job_id, verdict.job.batch, event.looked_up_at)):
            # looked up while a call of the same job ran, and that call ended since: its Result may
            # be stored now, unseen by the lookup. Called now, it would be paid twice; handed back,
            # it is looked up again when it comes back
            return self._look_up_again(event, now, owned, Log(
                "info", "a job's Result lookup was older than the end of its call; handed back, not called",
                {"job_id": verdict.job_id, "tier": verdict.tier, "seq": event.seq}))
        if event.unknown and not final:
            # its worker may have stored the Result and died before the ack: called now, it could
            # be paid twice. Handed back, it is looked up again when it comes back
            return self._look_up_again(event, now, owned, Log(
                "warning", "redelivered job's Result could not be looked up; handed back, not called",
                {"job_id": verdict.job_id, "tier": verdict.tier, "attempt": verdict.attempt}))
        if self.stepping_down:
            return []  # the last delivery of a job intake accepted: cannot happen (intake ends it)
        self.held[event.seq] = Held(verdict, now, now, event.wall)
        self.scheduler.add(PendingJob(job_id=verdict.job_id, tier=event.tier, upstream=verdict.upstream,
                                      cost=verdict.job.charge(), estimated=verdict.job.cost is None,
                                      handle=event.seq,
                                      model=requested_model(verdict.job.request)), now)
        return []

    def _look_up_again(self, event: ev.JobDelivered, now: float, owned: bool, why: Log) -> list[Command]:
        """Hand a delivery back for LOOKUP_RETRY_S (no call), to be looked up again; nothing without the lease."""
        if not owned:
            return []
        return [why, HandBack(event.seq, event.ack, LOOKUP_RETRY_S), *self._top_up(event.tier, now)]

    def _on_batch_cancelled(self, batch: str, now: float) -> list[Command]:
        """End the held jobs of a cancelled batch that wait for a key (uncalled: `failed` /
        `cancelled`, no dead letter); those handed out finish. Intake ends the rest as it
        reads them."""
        if not self.owns(now):
            return []
        handles = {seq for seq, held in self.held.items() if held.incoming.job.batch == batch}
        removed = self.scheduler.remove_pending(handles)
        if not removed:
            return []
        out: list[Command] = [Log("info", "cancelled batch: its held jobs end without a call",
                                  {"batch": batch, "jobs": len(removed)})]
        out += [EndRefused(cancelled_job(self.held.pop(job.handle).incoming)) for job in removed]
        for tier in sorted({job.tier for job in removed}):
            out += self._top_up(tier, now)
        return out

    def _on_removed_tier(self, event: ev.JobDelivered, now: float) -> list[Command]:
        """A late delivery on the inbox of a tier a config change removed: handed back (no
        call; it waits in JetStream for the tier to come back), ended if it is the last one."""
        if not self.owns(now):
            return []
        if event.delivered < self.settings.max_deliver.get(event.tier, 1 << 30):
            return [HandBack(event.seq, event.ack, 0.0)]
        if isinstance(event.verdict, Incoming):
            return [EndJob(event.verdict, ErrorCode.UNKNOWN_TIER, f"tier {event.tier!r} is no longer configured")]
        return [EndRefused(event.verdict)] if event.verdict is not None else []

    def _on_pull_status(self, event: ev.PullStatus, now: float) -> list[Command]:
        if event.tier not in self.pulls.tiers:
            return []
        if event.status not in ("408", "409", "404"):
            return []
        self.pulls.status(event.tier, event.unfilled, now)
        out: list[Command] = []
        if event.status == "409":
            out.append(Log("warning", "pull request ended by the server",
                           {"tier": event.tier, "reason": event.description}))
        return [*out, *self._top_up(event.tier, now)]

    def _top_up(self, tier: str, now: float) -> list[Command]:
        if tier not in self.pulls.tiers:
            return []  # removed by a config change
        return list(self.pulls.top_up(tier, self.scheduler.pending(tier), now, self.owns(now)))

    # -- dispatch ----------------------------------------------------------------------------

    def _dispatch(self, now: float) -> list[Command]:
        """Dispatch while workers have free slots; set when to look again."""
        if not self.ready:
            return []
        out: list[Command] = []
        self.dispatch_at = now + 1.0
        total = self.fleet.total_slots()  # (a pass changes what is free, not what there is)
        while (free := self.fleet.free_slots()) > 0:
            if not self.owns(now):
                self.dispatch_at = now + 0.1
                break
            decision = self.scheduler.next(now, self.fleet.keys_without_free_holder(self.keys.key_ids),
                                           free_slots=free, total_slots=total)
            if isinstance(decision, Dispatch):
                out += self._hand_out(decision, now)
            elif isinstance(decision, Reject):
                held = self.held.pop(decision.job.handle, None)
                if held is not None:
                    out.append(EndJob(held.incoming, decision.code, decision.message))
            elif isinstance(decision, WaitUntil):
                self.dispatch_at = max(now, decision.at)
                break
            else:  # Idle
                break
        return out

    def _hand_out(self, decision: Dispatch, now: float) -> list[Command]:
        held = self.held.pop(decision.job.handle, None)
        worker = self.fleet.pick(decision.key_id)
        if held is None or worker is None:  # cannot happen while slots are free; never leak tokens
            self.scheduler.cancel(decision.reservation, now)
            return []
        incoming = held.incoming
        try:
            assignment_id, payload = assignment_payload(self.settings, held, decision, now, self._number(),
                                                        now - worker.last_seen)
        except Exception as exc:  # noqa: BLE001 - a validated job always serialises; if not, it alone ends
            return [*self._unsendable(incoming, decision, now, f"job cannot be serialised ({type(exc).__name__})"),
                    *self._top_up(incoming.tier, now)]
        if len(payload) > self.settings.max_payload:  # intake bounds jobs below this; one that grew ends
            why = (f"the job's assignment to a worker is {len(payload)} bytes, more than the NATS server's "
                   f"max_payload = {self.settings.max_payload}; make the job smaller")
            return [*self._unsendable(incoming, decision, now, why), *self._top_up(incoming.tier, now)]
        self.fleet.assign(AssignmentRecord(assignment_id, worker.id, incoming.job_id, incoming.tier,
                                           decision.key_id, incoming.ack, decision.reservation, now,
                                           seq=incoming.stream_seq, batch=incoming.job.batch))
        return [Assign(worker.id, assignment_id, payload, incoming, decision.key_id, decision.pool),
                *self._top_up(incoming.tier, now)]

    def _number(self) -> int:
        """The next hand-out number; skips ids of calls still running from an earlier leadership."""
        return next_number(self._sequence, self.settings.leader_id, self.fleet.by_assignment)

    def _unsendable(self, incoming: Incoming, decision: Dispatch, now: float, why: str) -> list[Command]:
        """A job that cannot reach a worker: its reservation ends as LOST (no call made: the
        slot is freed and the key learns nothing; a cancel would requeue the job, which is no
        longer held, and the dispatch loop would spin on it) and it alone ends `invalid`."""
        self.scheduler.complete(decision.reservation, LOST, now)
        return [Log("error", "job cannot be sent to a worker; ended as invalid",
                    {"job_id": incoming.job_id, "reason": why}),
                EndJob(incoming, ErrorCode.INVALID_JOB, why, "invalid")]

    def _on_assign_failed(self, event: ev.AssignFailed, now: float) -> list[Command]:
        """Too large for the server: the job alone ends. NATS away: the slot is freed (not a
        cancel: that requeues a job no longer held; its message comes back) and the session ends."""
        record = self.fleet.finish(event.assignment)
        if record is None:
            return []
        self.scheduler.complete(record.reservation, LOST, now)
        if not event.too_large:
            return []
        why = (f"the job's assignment to a worker ({event.size} bytes) is more than the NATS server "
               "takes in one message; make the job smaller")
        return [Log("error", "job cannot be sent to a worker; ended as invalid",
                    {"job_id": event.incoming.job_id, "reason": why}),
                EndJob(event.incoming, ErrorCode.INVALID_JOB, why, "invalid")]

    # -- time --------------------------------------------------------------------------------

    def _timers(self, now: float) -> list[Command]:
        out: list[Command] = []
        if not self.ready and now >= self.ready_at:
            self.ready = True
            self.pulls.active = True
            for tier in self.settings.windows:
                out += self._top_up(tier, now)
        if now >= self.next_housekeeping:
            self.next_housekeeping = now + self.settings.housekeeping_s
            if self.owns(now):  # fenced (woken after a pause): the lease check ends this session
                out += self._housekeeping(now)
        return out

    def _housekeeping(self, now: float) -> list[Command]:
        out = self.workers.expire(now, True)
        out += self.keys.sync_secrets()
        for held in self.held.values():
            if now - held.touched > self.settings.keep_alive_after_s:
                held.touched = now
                out.append(InProgress(held.incoming.ack))
        out += self._announce(now)  # for workers that joined (or reconnected) since
        if self.ready:
            for tier in self.settings.windows:
                self.pulls.forget_stale(tier, now)
                out += self._top_up(tier, now)
        return out

    def _announce(self, now: float) -> list[Command]:
        """Tell the workers our epoch: from now on they drop assignments of earlier leaders."""
        if not self.owns(now):
            return []
        announce = LeaderAnnounce(leader=self.settings.leader_id, epoch=self.settings.epoch,
                                  config_revision=self.config_revision)
        return [Announce(announce.model_dump_json().encode())]

    # -- step-down ---------------------------------------------------------------------------

    def _step_down(self, now: float) -> list[Command]:
        """Stop pulling; if the lease is still ours, hand back every held job at once."""
        self.stepping_down = True
        self.pulls.active = False
        out: list[Command] = []
        if self.owns(now):
            pulling = self.pulls.open()
            # while our pull requests are open, a job handed back at once would come back to us
            delay = PULL_EXPIRES_S + HANDBACK_MARGIN_S if pulling else 0.0
            out += [HandBack(seq, held.incoming.ack, delay) for seq, held in self.held.items()]
            if pulling:
                out.append(Linger(PULL_EXPIRES_S))  # late arrivals are handed back meanwhile
        self.held.clear()
        self.scheduler.discard_pending()
        return out

    # -- status ------------------------------------------------------------------------------

    def status(self, now: float) -> dict[str, Any]:
        """The leader's part of the status answer: keys, tiers, workers. Until SessionStarted
        (the persisted key records loaded) it is `{"leader", "leader_since", "starting": True,
        "config_revision"}` without keys or workers: the keys' state is not known yet, and an
        operator-disabled key must not read as enabled in the first moments of a new leader."""
        if self.ready_at == float("inf"):  # SessionStarted not applied yet (it sets ready_at; ready follows it)
            return {"leader": self.settings.leader_id, "leader_since": self.settings.since, "starting": True,
                    "config_revision": self.config_revision}
        snap = self.scheduler.snapshot(now)
        return {"leader": self.settings.leader_id, "leader_since": self.settings.since, "keys": snap["keys"],
                "tiers": snap["tiers"], "workers": self.fleet.snapshot(now), "config_revision": self.config_revision}
