"""A fake-clock fleet around the REAL leader state machine (dispatcher/core/leader.py),
for property tests.

Jobs arrive at given times as JOBS deliveries; one worker with `slots` slots beats once;
every Assign the machine emits becomes a call that ends after a latency with a scripted
outcome (reported back as the worker would) or is not made at all (the worker reports "no
call" and hands the job back: the server delivers it again). Retryable outcomes are
delivered again too, up to MAX_ATTEMPTS; a job the machine ends (EndJob) is rejected. The
clock jumps to the next arrival, call end or the machine's `wake_at()`. Everything the
properties need is recorded as the run goes, and invariants that must hold at every step
(concurrency, one probe, one place per job) are asserted inline.
"""

from __future__ import annotations

import heapq
import itertools
from dataclasses import dataclass, field

from ratefleet.dispatcher.core import Outcome, PendingJob, Reject, Reservation, SchedulerSpec
from ratefleet.dispatcher.core import commands as cmd
from ratefleet.dispatcher.core import events as ev
from ratefleet.dispatcher.core.delivery import Incoming
from ratefleet.dispatcher.core.leader import LeaderMachine, LeaderSettings
from ratefleet.schemas import Job
from ratefleet.schemas.internal import Heartbeat

NEVER = 1e12  # seconds: no housekeeping, no worker timeout in a simulated run
MAX_ATTEMPTS = 3
MAX_CANCELS = 2  # then the scripted cancel becomes an ok, so every run ends


@dataclass(frozen=True)
class Script:
    """What happens to one call: its outcome (None = the worker cancels it) and latency."""

    outcome: Outcome | None
    latency: float
    actual_fraction: float | None = None  # actual cost = fraction * reserved cost


@dataclass(eq=False)
class Call:
    key_id: str
    at: float
    cost: float


@dataclass
class Record:
    """What a run produced, per key and per job."""

    calls: dict[str, list[Call]] = field(default_factory=dict)
    state: dict[str, str] = field(default_factory=dict)  # pending|in_flight|done|rejected
    rejects: list[Reject] = field(default_factory=list)
    dispatches: int = 0
    probes: int = 0


class FleetSim:
    """Drives one LeaderMachine over scripted arrivals and outcomes; see the module docstring."""

    def __init__(self, spec: SchedulerSpec, *, start: float, slots: int, conservative: bool) -> None:
        self.spec = spec
        self.keys = {k.id: k for p in spec.pools for k in p.keys}
        tiers = [t.name for t in spec.tiers]
        settings = LeaderSettings(
            leader_id="sim", epoch=(1, 1), windows={t: 1_000_000 for t in tiers},
            max_deliver={t: 1_000_000 for t in tiers}, ready_after_s=0.0, housekeeping_s=NEVER,
            keep_alive_after_s=NEVER, worker_timeout_s=NEVER, max_payload=1 << 30)
        self.machine = LeaderMachine(settings, spec, start, conservative=conservative)
        self.scheduler = self.machine.scheduler
        self.clock = start
        self.slots = slots
        self.events: list[tuple] = []  # (time, seq, kind, payload)
        self.seq = itertools.count()
        self.in_flight: dict[str, tuple[Reservation, Call, Script]] = {}  # by assignment id
        self.probes: dict[str, int] = {}
        self.disabled: set[str] = set()
        self.key_probes: set[str] = set()
        self.attempts: dict[str, int] = {}
        self.cancels: dict[str, int] = {}
        self.deliveries: dict[str, int] = {}
        self.stream_seq: dict[str, int] = {}
        self.bodies: dict[str, Job] = {}
        self.script: itertools.cycle[Script] = itertools.cycle([Script(Outcome("ok", 200), 0.0)])
        self.record = Record()
        self._handle(ev.SessionStarted())

    def arrive(self, at: float, job: PendingJob) -> None:
        self.record.state[job.job_id] = "scheduled"
        self.stream_seq[job.job_id] = len(self.stream_seq) + 1
        heapq.heappush(self.events, (at, next(self.seq), "arrive", job))

    def run(self, scripts: list[Script], *, stop_after: int | None = None, max_steps: int = 5_000) -> Record:
        """Run until nothing is left to do (or `stop_after` dispatches); scripts repeat."""
        self.script = itertools.cycle(scripts)
        for step in range(max_steps):
            self._deliver_due()
            if step == 0:  # the worker beats once the first arrivals are in: they go out by tier weight
                self._handle(ev.HeartbeatReceived(Heartbeat(worker="w", slots=self.slots)))
            if stop_after is not None and self.record.dispatches >= stop_after:
                return self.record
            self._handle(ev.Tick())
            if not self._advance():
                return self.record
        raise AssertionError("simulation did not finish: a job is stuck")

    def _handle(self, *events: ev.Event) -> None:
        for command in self.machine.handle_all(events, self.clock):
            if isinstance(command, cmd.Assign):
                self._on_dispatch(command)
            elif isinstance(command, cmd.EndJob):
                self._on_reject(command)
            else:
                assert isinstance(command, cmd.Pull | cmd.Announce | cmd.Log | cmd.SaveKey), command

    def _advance(self) -> bool:
        upcoming = [self.events[0][0]] if self.events else []
        if any(self.scheduler.pending(t.name) for t in self.spec.tiers):
            assert self.machine.wake_at() > self.clock, "the machine must wake in the future"
            upcoming.append(self.machine.wake_at())
        if not upcoming:
            assert not self.in_flight
            return False
        self.clock = max(self.clock, min(upcoming))
        return True

    def _deliver_due(self) -> None:
        """Everything due now reaches the machine together, as the shell hands in a burst."""
        events: list[ev.Event] = []
        while self.events and self.events[0][0] <= self.clock:
            _, _, kind, payload = heapq.heappop(self.events)
            if kind == "arrive":
                events.append(self._delivery(payload))
            else:
                events += self._finish(payload)
        if events:
            self._handle(*events)

    def _delivery(self, job: PendingJob) -> ev.JobDelivered:
        """One more delivery of the job's JOBS message, as intake reads it."""
        n = self.deliveries[job.job_id] = self.deliveries.get(job.job_id, 0) + 1
        seq = self.stream_seq[job.job_id]
        body = self.bodies.get(job.job_id)
        if body is None:
            body = self.bodies[job.job_id] = Job(id=job.job_id, upstream=job.upstream, request={"path": "/x"},  # type: ignore[arg-type]
                                                 cost=job.cost)
        ack = f"ack.{seq}.{n}"
        incoming = Incoming(job=body, job_id=job.job_id, tier=job.tier, upstream=job.upstream, ack=ack,
                            reply_to=None, attempt=n, max_attempts=1_000, submitted_at=0.0, stream_seq=seq)
        self.record.state[job.job_id] = "pending"
        return ev.JobDelivered(job.tier, seq, n, ack, incoming, wall=self.clock)

    def _on_dispatch(self, assign: cmd.Assign) -> None:
        res = self.machine.fleet.by_assignment[assign.assignment].reservation
        key_id, job_id, key = res.key_id, res.job.job_id, self.keys[res.key_id]
        assert self.record.state[job_id] == "pending", "job dispatched twice"
        # a disabled key takes a job only as its key probe (after ProbePolicy.base_s), one at a time
        assert key_id not in self.disabled or res.key_probe, "dispatch on a disabled key that is no probe"
        if res.key_probe:
            assert key_id not in self.key_probes, "two key probes in flight"
            self.key_probes.add(key_id)
        assert key_id not in self.probes, "dispatch on a key whose half-open probe is in flight"
        if res.probe:
            self.probes[key_id] = res.id
            self.record.probes += 1
        busy = sum(1 for r, _, _ in self.in_flight.values() if r.key_id == key_id)
        assert key.concurrency is None or busy < key.concurrency, "concurrency cap exceeded"
        assert len(self.in_flight) < self.slots, "more calls than worker slots"
        script = next(self.script)
        cost = res.job.cost if script.actual_fraction is None else res.job.cost * script.actual_fraction
        call = Call(key_id, self.clock, cost)
        self.record.calls.setdefault(key_id, []).append(call)
        self.record.state[job_id] = "in_flight"
        self.record.dispatches += 1
        self.in_flight[assign.assignment] = (res, call, script)
        heapq.heappush(self.events, (self.clock + script.latency, next(self.seq), "finish", assign.assignment))

    def _finish(self, assignment: str) -> list[ev.Event]:
        """The call's end: the worker's report, and the job's next delivery when it goes back."""
        res, call, script = self.in_flight.pop(assignment)
        if self.probes.get(res.key_id) == res.id:
            del self.probes[res.key_id]
        job_id = res.job.job_id
        if script.outcome is None and self.cancels.get(job_id, 0) < MAX_CANCELS:
            # no call made: the worker says so and hands the job back; the server delivers it again
            self.cancels[job_id] = self.cancels.get(job_id, 0) + 1
            if res.key_probe:
                self.key_probes.discard(res.key_id)
            self.record.calls[res.key_id].remove(call)
            return [ev.OutcomeReported(assignment, res.key_id, Outcome("lost")), self._delivery(res.job)]
        outcome = script.outcome or Outcome("ok", 200)
        if script.actual_fraction is not None:
            outcome = Outcome(outcome.kind, outcome.status, outcome.retry_after_s,
                              outcome.ratelimit, actual_cost=call.cost)
        if res.key_probe:
            self.key_probes.discard(res.key_id)
            if outcome.kind in ("ok", "rate_limited", "bad_request"):
                self.disabled.discard(res.key_id)  # the probe brought it back
        if outcome.kind == "key_error":
            self.disabled.add(res.key_id)
        self.attempts[job_id] = self.attempts.get(job_id, 0) + 1
        retry = outcome.kind in ("rate_limited", "upstream_error") and self.attempts[job_id] < MAX_ATTEMPTS
        self.record.state[job_id] = "done"
        report = ev.OutcomeReported(assignment, res.key_id, outcome)
        return [report, self._delivery(res.job)] if retry else [report]  # retry: the worker naks it

    def _on_reject(self, end: cmd.EndJob) -> None:
        incoming = end.incoming
        job = PendingJob(incoming.job_id, incoming.tier, incoming.upstream, incoming.job.charge())
        assert self.record.state[job.job_id] == "pending"
        tier = next(t for t in self.spec.tiers if t.name == job.tier)
        pools = [p for p in self.spec.pools if p.name in tier.pools and p.upstream == job.upstream]
        usable = [k for p in pools for k in p.keys if k.id not in self.disabled]
        fits = [k for k in usable if k.cost_per_minute is None or k.cost_per_minute >= job.cost]
        assert not fits, f"rejected a runnable job: {end.message}"
        self.record.state[job.job_id] = "rejected"
        self.record.rejects.append(Reject(job, end.code, end.message))


def max_window_excess(times_costs: list[tuple[float, float]], rate: float) -> float:
    """max over windows [t_i, t_j] of (sum of costs in it) - rate * (t_j - t_i).

    Uses a running minimum so the check is linear: sum_i..j - rate*(t_j - t_i)
    = (S_j - rate*t_j) - (S_{i-1} - rate*t_i).
    """
    worst, prefix, best_start = float("-inf"), 0.0, float("inf")
    for at, cost in times_costs:
        best_start = min(best_start, prefix - rate * at)
        prefix += cost
        worst = max(worst, prefix - rate * at - best_start)
    return worst
