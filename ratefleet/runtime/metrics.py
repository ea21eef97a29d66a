"""Prometheus metrics shared by the roles: names, help texts, buckets, the key-state rule.

Naming follows https://prometheus.io/docs/practices/naming/ (the `ratefleet_` namespace,
`_total` for counters, base units: seconds). Labels are of low cardinality only: tier, key id,
status, outcome, upstream, state. A job id, a batch name or a secret is never a label value.

Every role builds its own `CollectorRegistry` (`new_registry()`), so nothing here is
module-level state; /metrics (runtime/probes.py) serves that registry. Which process exports
what (names without the `ratefleet_` prefix):

    jobs_total{tier,status}          whoever stored the job's terminal Result: workers;
                                     dispatchers for jobs they refuse at the door
    queue_wait_seconds{tier}         workers: submit -> call start
    upstream_requests_total{key,outcome}, upstream_request_duration_seconds{upstream}
                                     workers, per upstream call
    worker_slots{state}              workers (busy, free)
    is_leader                        dispatchers (1 on the leader)
    desired_workers                  dispatchers: the leader's scaling signal (dispatcher/core/scaling.py), 0 on a standby
    queue_depth{tier}, key_*{key}    the leader only (read from its state at scrape time)
    cache_requests_total{result}     gateways and the leader's intake: answer-cache lookups (hit, miss)
    cache_writes_total               workers: answer-cache entries written after a 2xx call
    split_jobs_total{tier,variant,status}, split_request_duration_seconds{tier,variant}
                                     workers: jobs of tiers with an A/B split, by variant
    gateway_requests_total{caller,status}, gateway_request_duration_seconds{caller}
                                     gateways: HTTP requests answered, by caller and status code, and the time
                                     to the answer (a stream's: to its first part); `caller` is a configured
                                     caller's name, "unknown" for a key no caller has
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from typing import Any

from prometheus_client import CollectorRegistry, Counter
from prometheus_client.core import CounterMetricFamily
from prometheus_client.registry import Collector

from ratefleet.runtime.cache import CacheStats

JOBS_TOTAL = "ratefleet_jobs_total"
QUEUE_DEPTH = "ratefleet_queue_depth"
QUEUE_WAIT = "ratefleet_queue_wait_seconds"
UPSTREAM_REQUESTS = "ratefleet_upstream_requests_total"
UPSTREAM_DURATION = "ratefleet_upstream_request_duration_seconds"
KEY_IN_FLIGHT = "ratefleet_key_in_flight"
KEY_TOKENS = "ratefleet_key_tokens"
KEY_EFFECTIVE_RPS = "ratefleet_key_effective_rps"
KEY_STATE = "ratefleet_key_state"
IS_LEADER = "ratefleet_is_leader"
WORKER_SLOTS = "ratefleet_worker_slots"
DESIRED_WORKERS = "ratefleet_desired_workers"
CACHE_REQUESTS = "ratefleet_cache_requests_total"
CACHE_WRITES = "ratefleet_cache_writes_total"
SPLIT_JOBS = "ratefleet_split_jobs_total"
SPLIT_DURATION = "ratefleet_split_request_duration_seconds"
GATEWAY_REQUESTS = "ratefleet_gateway_requests_total"
GATEWAY_DURATION = "ratefleet_gateway_request_duration_seconds"

# every metric of the fleet, for the dashboard test and the README table
ALL_METRICS = (JOBS_TOTAL, QUEUE_DEPTH, QUEUE_WAIT, UPSTREAM_REQUESTS, UPSTREAM_DURATION, KEY_IN_FLIGHT, KEY_TOKENS,
               KEY_EFFECTIVE_RPS, KEY_STATE, IS_LEADER, WORKER_SLOTS, DESIRED_WORKERS, CACHE_REQUESTS, CACHE_WRITES,
               SPLIT_JOBS, SPLIT_DURATION, GATEWAY_REQUESTS, GATEWAY_DURATION)

# seconds: queue waits run from milliseconds (an idle fleet) to hours (a backlog behind a limit)
QUEUE_WAIT_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300, 900, 3600)
# seconds: an LLM call takes from tens of milliseconds to minutes
UPSTREAM_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)

KEY_STATES = ("closed", "open", "half-open", "cooling", "disabled")


def new_registry() -> CollectorRegistry:
    """A registry of one process (no default process/platform collectors: those would
    differ between the roles' dashboards; add them in the role when wanted)."""
    return CollectorRegistry(auto_describe=True)


def jobs_counter(registry: CollectorRegistry) -> Counter:
    """`ratefleet_jobs_total{tier,status}`: jobs this process ended with a stored Result
    (`status`: succeeded, failed, expired, invalid)."""
    return Counter("ratefleet_jobs", "Jobs ended with a stored terminal Result, by tier and Result status",
                   ("tier", "status"), registry=registry)


def key_state(snapshot: Mapping[str, Any]) -> str:
    """One of KEY_STATES for a key's status snapshot (`KeyState.snapshot`): `disabled` (by
    the provider, an operator, or no worker holds its secret) wins over the breaker, the
    breaker (`open`, `half-open`) over a 429 cooldown (`cooling`); else `closed`."""
    if snapshot.get("disabled") or snapshot.get("state") == "disabled":
        return "disabled"
    breaker = str(snapshot.get("breaker") or "closed").replace("_", "-")
    if breaker in ("open", "half-open"):
        return breaker
    if (snapshot.get("cooldown_s") or 0) > 0:
        return "cooling"
    return "closed"


class CacheCollector(Collector):
    """`ratefleet_cache_requests_total{result="hit|miss"}` and `ratefleet_cache_writes_total`,
    read at scrape time from a process's answer-cache counters (`ResultCache.stats`; a lookup
    NATS failed counts as a miss)."""

    def __init__(self, read: Callable[[], CacheStats]) -> None:
        self._read = read

    def collect(self) -> Iterator[CounterMetricFamily]:
        stats = self._read()
        requests = CounterMetricFamily("ratefleet_cache_requests", "Answer-cache lookups by result", labels=["result"])
        requests.add_metric(["hit"], stats.hits)
        requests.add_metric(["miss"], stats.misses)
        yield requests
        writes = CounterMetricFamily("ratefleet_cache_writes", "Answer-cache entries written after a 2xx call")
        writes.add_metric([], stats.writes)
        yield writes


def register_cache(registry: CollectorRegistry, read: Callable[[], CacheStats]) -> None:
    """Export the cache counters `read` returns in `registry` (once per registry)."""
    registry.register(CacheCollector(read))
