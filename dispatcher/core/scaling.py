"""The scaling signal: how many worker processes the fleet should run now.

Pure: callers pass `now` (monotonic seconds) and the observed figures; nothing here reads
a clock. The leader feeds a `ScalingMeter` from the events it already handles (a job
delivered to it = an arrival, an outcome report = one call with its latency) and the
metrics endpoint publishes `desired_workers(...)` as the gauge `ratefleet_desired_workers`,
which an autoscaler (KEDA's Prometheus trigger, a Kubernetes HPA on external metrics)
follows. See examples/keda/scaledobject.yaml.

The rule (Little's law, L = lambda * W):

    demand     = arrival_rate + backlog / drain_s             jobs/s wanted
    served     = min(demand, key_capacity_rps)                 the keys cannot carry more
    slots      = served * latency_s                            calls in flight needed for it
    slots      = min(slots, key_concurrency)                   when every key caps concurrency
    desired    = ceil(slots / slots_per_worker)                clamped to [min_workers, max_workers]

so the signal rises with backlog and arrivals and never asks for more workers than the
keys' total rate (or total concurrency) can feed; with any work waiting it is at least 1.
"""

from __future__ import annotations

import math
from collections.abc import Collection
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class ScalingInputs:
    """What the signal is computed from.

    `backlog`: jobs queued and not yet dispatched (all tiers); `in_flight`: jobs assigned
    to a worker; `arrival_rate`: jobs/s entering the queue; `latency_s`: the mean upstream
    call time in seconds; `slots_per_worker`: concurrent calls one worker makes;
    `key_capacity_rps`: the sum of the usable keys' effective request rates (requests/s);
    `key_concurrency`: the sum of the keys' concurrency caps, None when any key has none.
    """

    backlog: int
    in_flight: int
    arrival_rate: float
    latency_s: float
    slots_per_worker: int
    key_capacity_rps: float
    key_concurrency: int | None = None


def desired_workers(inputs: ScalingInputs, *, drain_s: float = 60.0, min_workers: int = 0,
                    max_workers: int | None = None) -> int:
    """Worker processes needed to clear `backlog` within `drain_s` seconds while keeping up
    with arrivals, capped by what the keys can carry (the rule in the module docstring).

    Returns an int in [min_workers, max_workers]. Raises ValueError for a non-positive
    `drain_s` or `slots_per_worker`, or negative inputs.
    """
    if drain_s <= 0 or inputs.slots_per_worker < 1:
        raise ValueError("drain_s must be > 0 and slots_per_worker >= 1")
    if min(inputs.backlog, inputs.in_flight, inputs.arrival_rate, inputs.latency_s, inputs.key_capacity_rps) < 0:
        raise ValueError(f"scaling inputs must not be negative: {inputs}")
    # arrivals count while at least one job is expected per drain window: the meter's average
    # decays exponentially and never reaches 0, so any rate above 0 held one worker for hours
    arriving = inputs.arrival_rate * drain_s >= 1.0
    demand = (inputs.arrival_rate if arriving else 0.0) + inputs.backlog / drain_s
    served = min(demand, inputs.key_capacity_rps)
    slots = served * inputs.latency_s
    if inputs.key_concurrency is not None:
        slots = min(slots, float(inputs.key_concurrency))
    wanted = math.ceil(slots / inputs.slots_per_worker - 1e-9)
    if (inputs.backlog or inputs.in_flight or arriving) and inputs.key_capacity_rps > 0:
        wanted = max(wanted, 1)
    wanted = max(wanted, min_workers)
    return wanted if max_workers is None else min(wanted, max_workers)


class ScalingMeter:
    """Arrival rate and call latency as exponentially weighted moving averages.

    `half_life_s`: after this many seconds an old observation counts half (seconds).
    `default_latency_s`: the latency assumed before the first call is seen (seconds).
    Feed `arrived(now, n)` for jobs entering the queue and `called(now, latency_s)` for each
    finished call; read `arrival_rate(now)` (jobs/s) and `latency_s`.
    """

    def __init__(self, *, half_life_s: float = 30.0, default_latency_s: float = 1.0) -> None:
        if half_life_s <= 0 or default_latency_s <= 0:
            raise ValueError("half_life_s and default_latency_s must be > 0")
        self._tau = half_life_s / math.log(2)
        self._rate = 0.0
        self._at: float | None = None
        self._latency: float | None = None
        self._default_latency = default_latency_s

    def arrived(self, now: float, n: int = 1) -> None:
        """Count `n` jobs that entered the queue at `now`."""
        self._decay(now)
        self._rate += n / self._tau

    def arrival_rate(self, now: float) -> float:
        """Jobs/s, averaged over about `half_life_s`."""
        self._decay(now)
        return self._rate

    def called(self, latency_s: float) -> None:
        """Take one call's duration (seconds) into the average latency."""
        if latency_s < 0:
            return
        self._latency = latency_s if self._latency is None else 0.9 * self._latency + 0.1 * latency_s

    @property
    def latency_s(self) -> float:
        """The average call duration in seconds (`default_latency_s` before the first call)."""
        return self._default_latency if self._latency is None else self._latency

    def _decay(self, now: float) -> None:
        if self._at is not None and now > self._at:
            self._rate *= math.exp(-(now - self._at) / self._tau)
        self._at = now if self._at is None else max(self._at, now)


def inputs_from_status(status: dict[str, Any], meter: ScalingMeter, now: float, *, backlog: int,
                       default_slots: int = 8, pools: Collection[str] | None = None) -> ScalingInputs:
    """`ScalingInputs` from the leader's status answer (`LeaderMachine.status`) and its meter.

    `backlog`: jobs waiting in the JOBS stream and held by the leader (the shell counts the
    stream; the leader's own `pending` is only its pull window). Keys that are disabled or
    whose circuit breaker is open add no capacity; a worker's `slots` come from its
    heartbeats (`default_slots` when no worker is known). `pools`: the pools the tiers with work
    may use (None: every pool); the keys of other pools add no capacity (an operator's trial: an
    idle key of a vip-only pool raised the signal for a backlog of normal jobs it never serves).
    """
    usable = [k for k in status.get("keys", {}).values() if not k.get("disabled") and k.get("breaker") != "open"
              and (pools is None or k.get("pool") is None or k.get("pool") in pools)]
    capacity = sum(float(k.get("effective_rps") or 0.0) for k in usable)
    caps = [k.get("concurrency") for k in usable]
    concurrency = sum(int(c) for c in caps if c is not None) if caps and None not in caps else None
    workers = status.get("workers", [])
    slots = round(sum(w["slots"] for w in workers) / len(workers)) if workers else default_slots
    in_flight = sum(int(t.get("in_flight", 0)) for t in status.get("tiers", {}).values())
    return ScalingInputs(backlog=backlog, in_flight=in_flight, arrival_rate=meter.arrival_rate(now),
                         latency_s=meter.latency_s, slots_per_worker=max(1, slots),
                         key_capacity_rps=capacity, key_concurrency=concurrency)
