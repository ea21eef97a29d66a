"""A worker's metrics: counted where the call happens (runtime/metrics.py has the names).

    ratefleet_jobs_total{tier,status}                          Results this worker stored
    ratefleet_queue_wait_seconds{tier}                         submit -> call start (histogram)
    ratefleet_upstream_requests_total{key,outcome}             upstream calls by key id and outcome class
    ratefleet_upstream_request_duration_seconds{upstream}      upstream call duration (histogram)
    ratefleet_worker_slots{state}                              busy / free slots, read at scrape time
    ratefleet_split_jobs_total{tier,variant,status}            Results of jobs on a tier with an A/B split
    ratefleet_split_request_duration_seconds{tier,variant}     their upstream call durations (histogram)

`outcome` is the OutcomeKind value of the call (ok, rate_limited, key_error, denied,
upstream_error, bad_request).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from ratefleet.runtime.metrics import QUEUE_WAIT_BUCKETS, UPSTREAM_BUCKETS, WORKER_SLOTS, jobs_counter


class SlotsCollector(Collector):
    """`ratefleet_worker_slots{state}` from `read() -> (slots, busy)` at scrape time."""

    def __init__(self, read: Callable[[], tuple[int, int]]) -> None:
        self.read = read

    def collect(self) -> Iterator[GaugeMetricFamily]:
        slots, busy = self.read()
        family = GaugeMetricFamily(WORKER_SLOTS, "Worker slots (concurrent upstream calls) by state", labels=["state"])
        family.add_metric(["busy"], busy)
        family.add_metric(["free"], max(0, slots - busy))
        yield family


class Children:
    """A labelled metric's children by label values, each looked up in prometheus_client
    once: its `labels()` validates the values and takes a lock on every call (~3 % of a
    busy worker's CPU in a py-spy profile of bench/throughput.py, five lookups per job).
    `children(*values)` is `metric.labels(*values)`; the metric's children are never removed."""

    def __init__(self, metric: Counter | Histogram) -> None:
        self.metric = metric
        self._bound: dict[tuple[str, ...], Any] = {}

    def __call__(self, *values: str) -> Any:
        child = self._bound.get(values)
        if child is None:
            child = self._bound[values] = self.metric.labels(*values)
        return child


class WorkerMetrics:
    """The worker's counters and histograms in `registry`; `slots() -> (slots, busy)` feeds
    the slot gauge when the registry is scraped."""

    def __init__(self, registry: CollectorRegistry, slots: Callable[[], tuple[int, int]]) -> None:
        self.jobs = jobs_counter(registry)
        self.queue_wait = Histogram("ratefleet_queue_wait_seconds", "Time from submit to the start of the upstream call",
                                    ("tier",), buckets=QUEUE_WAIT_BUCKETS, registry=registry)
        self.requests = Counter("ratefleet_upstream_requests", "Upstream calls by key id and outcome class",
                                ("key", "outcome"), registry=registry)
        self.duration = Histogram("ratefleet_upstream_request_duration_seconds", "Upstream call duration",
                                  ("upstream",), buckets=UPSTREAM_BUCKETS, registry=registry)
        self.split_jobs = Counter("ratefleet_split_jobs", "Results of jobs on tiers with an A/B split, by variant",
                                  ("tier", "variant", "status"), registry=registry)
        self.split_duration = Histogram("ratefleet_split_request_duration_seconds",
                                        "Upstream call duration of jobs on tiers with an A/B split, by variant",
                                        ("tier", "variant"), buckets=UPSTREAM_BUCKETS, registry=registry)
        registry.register(SlotsCollector(slots))
        self._jobs, self._queue_wait, self._requests = Children(self.jobs), Children(self.queue_wait), Children(self.requests)
        self._duration, self._split_jobs = Children(self.duration), Children(self.split_jobs)
        self._split_duration = Children(self.split_duration)

    def job_ended(self, tier: str, status: str, variant: str | None = None) -> None:
        """Count a stored Result; `variant` ("control" / "split"; None: no split on its tier)."""
        self._jobs(tier, status).inc()
        if variant is not None:
            self._split_jobs(tier, variant, status).inc()

    def call_started(self, tier: str, waited_s: float) -> None:
        self._queue_wait(tier).observe(max(0.0, waited_s))

    def call_done(self, key_id: str, upstream: str, outcome: str, latency_s: float, *, tier: str | None = None,
                  variant: str | None = None) -> None:
        """Count an upstream call (`latency_s` seconds); with a `variant`, also per tier and variant."""
        self._requests(key_id, outcome).inc()
        self._duration(upstream).observe(max(0.0, latency_s))
        if variant is not None and tier is not None:
            self._split_duration(tier, variant).observe(max(0.0, latency_s))
