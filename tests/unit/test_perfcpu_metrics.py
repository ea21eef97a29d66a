"""The worker's metrics look each label set up once (workers/metrics.py `Children`) and
still count into the registry /metrics serves."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter

from ratefleet.workers.metrics import Children, WorkerMetrics


def test_children_hands_out_the_metrics_own_child_once_per_label_set():
    registry = CollectorRegistry()
    counter = Counter("ratefleet_things", "things", ("tier", "status"), registry=registry)
    children = Children(counter)
    assert children("normal", "succeeded") is counter.labels("normal", "succeeded")
    assert children("normal", "succeeded") is children("normal", "succeeded")
    assert children("vip", "failed") is not children("normal", "failed")


def test_worker_metrics_count_each_call_and_job_under_its_labels():
    registry = CollectorRegistry()
    metrics = WorkerMetrics(registry, lambda: (4, 1))
    for _ in range(3):
        metrics.call_started("normal", 0.2)
        metrics.call_done("k1", "openai", "ok", 0.05, tier="normal", variant="split")
        metrics.job_ended("normal", "succeeded", "split")
    metrics.call_done("k2", "openai", "rate_limited", 0.01)
    metrics.job_ended("vip", "failed")
    value = registry.get_sample_value
    assert value("ratefleet_jobs_total", {"tier": "normal", "status": "succeeded"}) == 3
    assert value("ratefleet_jobs_total", {"tier": "vip", "status": "failed"}) == 1
    assert value("ratefleet_upstream_requests_total", {"key": "k1", "outcome": "ok"}) == 3
    assert value("ratefleet_upstream_requests_total", {"key": "k2", "outcome": "rate_limited"}) == 1
    assert value("ratefleet_upstream_request_duration_seconds_count", {"upstream": "openai"}) == 4
    assert value("ratefleet_queue_wait_seconds_count", {"tier": "normal"}) == 3
    assert value("ratefleet_split_jobs_total", {"tier": "normal", "variant": "split", "status": "succeeded"}) == 3
    assert value("ratefleet_split_request_duration_seconds_count", {"tier": "normal", "variant": "split"}) == 3
    assert value("ratefleet_worker_slots", {"state": "busy"}) == 1
