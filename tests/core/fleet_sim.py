"""A fake-clock fleet that drives a Scheduler the way the shell does, for property tests.

Jobs arrive at given times; while a worker slot is free the driver asks `next`; a Dispatch
becomes a call that completes (or is cancelled) after a latency with a scripted outcome;
retryable outcomes requeue the job; WaitUntil and Idle advance the clock to the next
event. Everything the properties need is recorded as the run goes, and invariants that
must hold at every step (concurrency, one probe, one place per job) are asserted inline.
"""

from __future__ import annotations

import heapq
import itertools
from dataclasses import dataclass, field

from ratefleet.dispatcher.core import (
    Dispatch,
    Idle,
    Outcome,
    PendingJob,
    Reject,
    Reservation,
    Scheduler,
    SchedulerSpec,
    WaitUntil,
)

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
    """Drives one Scheduler over scripted arrivals and outcomes; see the module docstring."""

    def __init__(self, spec: SchedulerSpec, *, start: float, slots: int, conservative: bool) -> None:
        self.spec = spec
        self.keys = {k.id: k for p in spec.pools for k in p.keys}
        self.scheduler = Scheduler(spec, start, conservative=conservative)
        self.clock = start
        self.slots = slots
        self.events: list[tuple] = []  # (time, seq, kind, payload)
        self.seq = itertools.count()
        self.in_flight: dict[int, tuple[Reservation, Call | None]] = {}
        self.probes: dict[str, int] = {}
        self.disabled: set[str] = set()
        self.key_probes: set[str] = set()
        self.attempts: dict[str, int] = {}
        self.cancels: dict[str, int] = {}
        self.record = Record()

    def arrive(self, at: float, job: PendingJob) -> None:
        self.record.state[job.job_id] = "scheduled"
        heapq.heappush(self.events, (at, next(self.seq), "arrive", job))

    def run(self, scripts: list[Script], *, stop_after: int | None = None, max_steps: int = 5_000) -> Record:
        """Run until nothing is left to do (or `stop_after` dispatches); scripts repeat."""
        script_iter = itertools.cycle(scripts)
        for _ in range(max_steps):
            self._deliver_due()
            if stop_after is not None and self.record.dispatches >= stop_after:
                return self.record
            decision = self.scheduler.next(self.clock) if len(self.in_flight) < self.slots else None
            if isinstance(decision, Dispatch):
                self._on_dispatch(decision, next(script_iter))
            elif isinstance(decision, Reject):
                self._on_reject(decision)
            elif not self._advance(decision):
                return self.record
        raise AssertionError("simulation did not finish: a job is stuck")

    def _advance(self, decision: WaitUntil | Idle | None) -> bool:
        upcoming = [self.events[0][0]] if self.events else []
        if isinstance(decision, WaitUntil):
            assert decision.at > self.clock, "WaitUntil must lie in the future"
            upcoming.append(decision.at)
        if not upcoming:
            assert isinstance(decision, Idle)
            return False
        self.clock = max(self.clock, min(upcoming))
        return True

    def _deliver_due(self) -> None:
        while self.events and self.events[0][0] <= self.clock:
            _, _, kind, payload = heapq.heappop(self.events)
            if kind == "arrive":
                self.scheduler.add(payload, self.clock)
                self.record.state[payload.job_id] = "pending"
            else:
                self._finish(*payload)

    def _on_dispatch(self, d: Dispatch, script: Script) -> None:
        res, key = d.reservation, self.keys[d.key_id]
        assert self.record.state[d.job.job_id] == "pending", "job dispatched twice"
        # a disabled key takes a job only as its key probe (after ProbePolicy.base_s), one at a time
        assert d.key_id not in self.disabled or res.key_probe, "dispatch on a disabled key that is no probe"
        if res.key_probe:
            assert d.key_id not in self.key_probes, "two key probes in flight"
            self.key_probes.add(d.key_id)
        assert d.key_id not in self.probes, "dispatch on a key whose half-open probe is in flight"
        if res.probe:
            self.probes[d.key_id] = res.id
            self.record.probes += 1
        busy = sum(1 for r, _ in self.in_flight.values() if r.key_id == d.key_id)
        assert key.concurrency is None or busy < key.concurrency, "concurrency cap exceeded"
        cost = d.job.cost if script.actual_fraction is None else d.job.cost * script.actual_fraction
        call = Call(d.key_id, self.clock, cost)
        self.record.calls.setdefault(d.key_id, []).append(call)
        self.record.state[d.job.job_id] = "in_flight"
        self.record.dispatches += 1
        self.in_flight[res.id] = (res, call)
        at = self.clock + script.latency
        heapq.heappush(self.events, (at, next(self.seq), "finish", (res, script)))

    def _finish(self, res: Reservation, script: Script) -> None:
        _, call = self.in_flight.pop(res.id)
        if self.probes.get(res.key_id) == res.id:
            del self.probes[res.key_id]
        job_id = res.job.job_id
        if script.outcome is None and self.cancels.get(job_id, 0) < MAX_CANCELS:
            self.cancels[job_id] = self.cancels.get(job_id, 0) + 1
            self.scheduler.cancel(res, self.clock)
            if res.key_probe:
                self.key_probes.discard(res.key_id)
            self.record.calls[res.key_id].remove(call)
            self.record.state[job_id] = "pending"
            return
        outcome = script.outcome or Outcome("ok", 200)
        if script.actual_fraction is not None:
            outcome = Outcome(outcome.kind, outcome.status, outcome.retry_after_s,
                              outcome.ratelimit, actual_cost=call.cost)
        self.scheduler.complete(res, outcome, self.clock)
        if res.key_probe:
            self.key_probes.discard(res.key_id)
            if outcome.kind in ("ok", "rate_limited", "bad_request"):
                self.disabled.discard(res.key_id)  # the probe brought it back
        if outcome.kind == "key_error":
            self.disabled.add(res.key_id)
        self.attempts[job_id] = self.attempts.get(job_id, 0) + 1
        if outcome.kind in ("rate_limited", "upstream_error") and self.attempts[job_id] < MAX_ATTEMPTS:
            self.scheduler.add(res.job, self.clock)
            self.record.state[job_id] = "pending"
        else:
            self.record.state[job_id] = "done"

    def _on_reject(self, reject: Reject) -> None:
        job = reject.job
        assert self.record.state[job.job_id] == "pending"
        tier = next(t for t in self.spec.tiers if t.name == job.tier)
        pools = [p for p in self.spec.pools if p.name in tier.pools and p.upstream == job.upstream]
        usable = [k for p in pools for k in p.keys if k.id not in self.disabled]
        fits = [k for k in usable if k.cost_per_minute is None or k.cost_per_minute >= job.cost]
        assert not fits, f"rejected a runnable job: {reject.message}"
        self.record.state[job.job_id] = "rejected"
        self.record.rejects.append(reject)


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
