"""The gateway's own Prometheus metrics: requests answered by caller and HTTP status, and the
time to the answer (ratefleet/runtime/metrics.py lists every metric of the fleet).

An operations trial found the gateway's /metrics held only the answer cache's counters: nothing
said how many requests each caller made, how many were refused (401, 403, 429) or failed (5xx),
or how long they took."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Histogram

from ratefleet.runtime.metrics import UPSTREAM_BUCKETS

UNKNOWN_CALLER = "unknown"  # the `caller` label of a request whose key no configured caller has


class GatewayMetrics:
    """`ratefleet_gateway_requests_total{caller,status}` and
    `ratefleet_gateway_request_duration_seconds{caller}` in `registry`. Labels stay of low
    cardinality: configured caller names (or UNKNOWN_CALLER) and HTTP status codes."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.requests = Counter("ratefleet_gateway_requests", "HTTP requests the gateway answered, by caller and status "
                                "code", ("caller", "status"), registry=registry)
        self.duration = Histogram("ratefleet_gateway_request_duration_seconds", "Time from a request to its answer "
                                  "(a stream's first part), by caller", ("caller",), buckets=UPSTREAM_BUCKETS,
                                  registry=registry)

    def answered(self, caller: str | None, status: int, seconds: float) -> None:
        """Count one answer (`caller` None: no caller has its key) taking `seconds`."""
        name = caller or UNKNOWN_CALLER
        self.requests.labels(name, str(status)).inc()
        self.duration.labels(name).observe(max(0.0, seconds))
