"""A dispatcher's metrics, read from the leader's state when /metrics is scraped.

The core stays pure: nothing is counted inside it. `LeaderCollector.collect()` asks the
dispatcher for a `LeaderView` (the leader machine's status snapshot and the JetStream backlog
its service last read) and turns it into gauges; it runs on the event loop's thread (the
probes' uvicorn shares the role's loop), between two steps of the leader.

    ratefleet_is_leader                      1 on the leader, 0 on a standby
    ratefleet_desired_workers                worker processes the fleet should run now (core/scaling.py); 0 on a standby
    ratefleet_queue_depth{tier}              jobs waiting: not yet delivered by JetStream + held by the leader, undispatched
    ratefleet_key_in_flight{key}             calls in flight on the key
    ratefleet_key_tokens{key}                request tokens in the key's bucket now
    ratefleet_key_effective_rps{key}         the request rate the leader uses now (adapted to the provider)
    ratefleet_key_state{key,state}           1 for the key's state (closed, open, half-open, cooling, disabled), 0 for the others

Only the leader exports the queue and key gauges (a standby's would be stale), so a sum
over dispatchers is the fleet's value.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

from prometheus_client import CollectorRegistry
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from ratefleet.runtime.metrics import (
    DESIRED_WORKERS,
    IS_LEADER,
    KEY_EFFECTIVE_RPS,
    KEY_IN_FLIGHT,
    KEY_STATE,
    KEY_STATES,
    KEY_TOKENS,
    QUEUE_DEPTH,
    jobs_counter,
    key_state,
)


@dataclass(frozen=True)
class LeaderView:
    """What the collector reads: `status` is `LeaderMachine.status(now)` (None on a standby);
    `backlog` maps a tier to its consumer's `num_pending` (jobs JetStream has not delivered yet);
    `desired_workers`: the leader's scaling signal (None on a standby)."""

    status: Mapping[str, Any] | None
    backlog: Mapping[str, int] = field(default_factory=dict)
    desired_workers: int | None = None


class LeaderCollector(Collector):
    """Gauges from `read() -> LeaderView` at scrape time (see the module docstring)."""

    def __init__(self, read: Callable[[], LeaderView]) -> None:
        self.read = read

    def collect(self) -> Iterator[GaugeMetricFamily]:
        view = self.read()
        leader = GaugeMetricFamily(IS_LEADER, "1 when this dispatcher holds the leader lease")
        leader.add_metric([], 1 if view.status is not None else 0)
        yield leader
        desired = GaugeMetricFamily(DESIRED_WORKERS, "Worker processes needed to clear the backlog within a minute "
                                    "while keeping up with arrivals, capped by the keys (0 on a standby)")
        desired.add_metric([], view.desired_workers or 0)
        yield desired
        if view.status is None:
            return
        yield _queue_depth(view)
        keys: Mapping[str, Mapping[str, Any]] = view.status.get("keys", {})
        yield _per_key(KEY_IN_FLIGHT, "Calls in flight on the key", keys, "in_flight")
        yield _per_key(KEY_TOKENS, "Request tokens in the key's token bucket", keys, "tokens")
        yield _per_key(KEY_EFFECTIVE_RPS, "Requests per second the leader allows the key now", keys, "effective_rps")
        states = GaugeMetricFamily(KEY_STATE, "1 for the key's current state, 0 for the others", labels=["key", "state"])
        for key_id, snap in keys.items():
            current = key_state(snap)
            for state in KEY_STATES:
                states.add_metric([key_id, state], 1 if state == current else 0)
        yield states


def _queue_depth(view: LeaderView) -> GaugeMetricFamily:
    family = GaugeMetricFamily(QUEUE_DEPTH, "Jobs waiting for a key: not delivered yet plus held undispatched",
                               labels=["tier"])
    tiers: Mapping[str, Mapping[str, Any]] = view.status.get("tiers", {}) if view.status else {}
    for tier in sorted(set(tiers) | set(view.backlog)):
        family.add_metric([tier], view.backlog.get(tier, 0) + tiers.get(tier, {}).get("pending", 0))
    return family


def _per_key(name: str, documentation: str, keys: Mapping[str, Mapping[str, Any]], field_name: str) -> GaugeMetricFamily:
    family = GaugeMetricFamily(name, documentation, labels=["key"])
    for key_id, snap in keys.items():
        value = snap.get(field_name)
        if value is not None:
            family.add_metric([key_id], float(value))
    return family


class DispatcherMetrics:
    """A dispatcher's registry entries: the leader gauges and `ratefleet_jobs_total` for jobs
    it ends itself (refused at the door over rpc, or by the leader)."""

    def __init__(self, registry: CollectorRegistry, read: Callable[[], LeaderView]) -> None:
        self.jobs = jobs_counter(registry)
        registry.register(LeaderCollector(read))

    def job_ended(self, tier: str, status: str) -> None:
        self.jobs.labels(tier, status).inc()
