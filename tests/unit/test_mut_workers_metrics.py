"""The worker's metrics as /metrics shows them (workers/metrics.py): each family's name,
type, help text, labels and buckets in the worker's own registry, the slot gauge read at
scrape time (free never below 0), negative durations counted as 0, the split series only
for a job with a variant (and, for durations, a tier), one label lookup per label set."""

from __future__ import annotations

import pytest
from prometheus_client import CollectorRegistry, Counter, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from ratefleet.runtime.metrics import QUEUE_WAIT_BUCKETS, UPSTREAM_BUCKETS, new_registry
from ratefleet.workers.metrics import Children, SlotsCollector, WorkerMetrics

# name as exported (without _total) -> (type, help text, label names)
FAMILIES = {
    "ratefleet_jobs": ("counter", "Jobs ended with a stored terminal Result, by tier and Result status",
                       ("tier", "status")),
    "ratefleet_queue_wait_seconds": ("histogram", "Time from submit to the start of the upstream call", ("tier",)),
    "ratefleet_upstream_requests": ("counter", "Upstream calls by key id and outcome class", ("key", "outcome")),
    "ratefleet_upstream_request_duration_seconds": ("histogram", "Upstream call duration", ("upstream",)),
    "ratefleet_split_jobs": ("counter", "Results of jobs on tiers with an A/B split, by variant",
                             ("tier", "variant", "status")),
    "ratefleet_split_request_duration_seconds": (
        "histogram", "Upstream call duration of jobs on tiers with an A/B split, by variant", ("tier", "variant")),
    "ratefleet_worker_slots": ("gauge", "Worker slots (concurrent upstream calls) by state", ("state",)),
}
BUCKETS = {"ratefleet_queue_wait_seconds": QUEUE_WAIT_BUCKETS,
           "ratefleet_upstream_request_duration_seconds": UPSTREAM_BUCKETS,
           "ratefleet_split_request_duration_seconds": UPSTREAM_BUCKETS}


def scrape(registry: CollectorRegistry) -> dict:
    """Family name -> parsed family, from the text /metrics serves."""
    text = generate_latest(registry).decode()
    return {family.name: family for family in text_string_to_metric_families(text)}


def value(registry: CollectorRegistry, name: str, **labels: str) -> float | None:
    return registry.get_sample_value(name, labels)


def busy_metrics(slots: int = 4, busy: int = 1) -> tuple[CollectorRegistry, WorkerMetrics]:
    registry = new_registry()
    metrics = WorkerMetrics(registry, lambda: (slots, busy))
    metrics.job_ended("vip", "succeeded", "split")
    metrics.call_started("vip", 0.2)
    metrics.call_done("k1", "openai", "ok", 0.3, tier="vip", variant="split")
    return registry, metrics


def test_every_family_has_its_name_type_help_and_labels():
    registry, _ = busy_metrics()
    found = scrape(registry)
    for name, (kind, help_text, labels) in FAMILIES.items():
        family = found[name]
        assert (family.type, family.documentation) == (kind, help_text), name
        sample = next(s for s in family.samples if not s.name.endswith("_created"))
        assert set(sample.labels) - {"le"} == set(labels), name
    assert {name for name in found if not name.endswith("_created")} == set(FAMILIES)


@pytest.mark.parametrize("name", sorted(BUCKETS))
def test_histograms_use_the_fleets_buckets(name):
    registry, _ = busy_metrics()
    bounds = [float(s.labels["le"]) for s in scrape(registry)[name].samples if s.name.endswith("_bucket")]
    assert bounds == [float(b) for b in BUCKETS[name]] + [float("inf")]


def test_each_worker_counts_into_its_own_registry_only():
    first, _ = busy_metrics()
    second, _ = busy_metrics()  # a second worker in the process: no clash in a shared registry
    assert value(first, "ratefleet_jobs_total", tier="vip", status="succeeded") == 1
    assert value(second, "ratefleet_jobs_total", tier="vip", status="succeeded") == 1


@pytest.mark.parametrize(("slots", "busy", "free"), [(8, 3, 5), (4, 4, 0), (2, 5, 0), (0, 0, 0)])
def test_slot_gauge_reads_busy_and_free_at_scrape_time(slots, busy, free):
    state = {"slots": 1, "busy": 0}
    registry = new_registry()
    WorkerMetrics(registry, lambda: (state["slots"], state["busy"]))
    state.update(slots=slots, busy=busy)  # read when scraped, not when built
    assert value(registry, "ratefleet_worker_slots", state="busy") == busy
    assert value(registry, "ratefleet_worker_slots", state="free") == free


def test_slots_collector_yields_one_gauge_family_with_busy_then_free():
    (family,) = list(SlotsCollector(lambda: (6, 2)).collect())
    assert family.name == "ratefleet_worker_slots" and family.type == "gauge"
    assert [(s.labels, s.value) for s in family.samples] == [({"state": "busy"}, 2), ({"state": "free"}, 4)]


def test_a_job_without_a_variant_is_not_counted_as_split():
    registry = new_registry()
    metrics = WorkerMetrics(registry, lambda: (1, 0))
    metrics.job_ended("normal", "failed")
    metrics.job_ended("normal", "failed", "control")
    assert value(registry, "ratefleet_jobs_total", tier="normal", status="failed") == 2
    assert value(registry, "ratefleet_split_jobs_total", tier="normal", variant="control", status="failed") == 1
    assert [s for s in scrape(registry)["ratefleet_split_jobs"].samples if s.labels.get("variant") != "control"] == []


def test_queue_wait_is_observed_in_seconds_and_never_below_zero():
    registry = new_registry()
    metrics = WorkerMetrics(registry, lambda: (1, 0))
    metrics.call_started("vip", 0.2)
    metrics.call_started("vip", -3.0)  # clock skew between producer and worker
    assert value(registry, "ratefleet_queue_wait_seconds_count", tier="vip") == 2
    assert value(registry, "ratefleet_queue_wait_seconds_sum", tier="vip") == pytest.approx(0.2)
    assert value(registry, "ratefleet_queue_wait_seconds_bucket", tier="vip", le="0.005") == 1


def test_a_call_counts_by_key_and_outcome_and_times_by_upstream():
    registry = new_registry()
    metrics = WorkerMetrics(registry, lambda: (1, 0))
    metrics.call_done("k1", "openai", "rate_limited", 0.5)
    metrics.call_done("k1", "openai", "ok", -0.1)
    metrics.call_done("k2", "mock", "ok", 2.0)
    assert value(registry, "ratefleet_upstream_requests_total", key="k1", outcome="rate_limited") == 1
    assert value(registry, "ratefleet_upstream_requests_total", key="k1", outcome="ok") == 1
    assert value(registry, "ratefleet_upstream_requests_total", key="k2", outcome="ok") == 1
    assert value(registry, "ratefleet_upstream_request_duration_seconds_sum", upstream="openai") == pytest.approx(0.5)
    assert value(registry, "ratefleet_upstream_request_duration_seconds_bucket", upstream="openai", le="0.01") == 1
    assert value(registry, "ratefleet_upstream_request_duration_seconds_sum", upstream="mock") == pytest.approx(2.0)
    assert [s for s in scrape(registry)["ratefleet_split_request_duration_seconds"].samples] == []


@pytest.mark.parametrize(("tier", "variant", "counted"), [
    ("vip", "split", True), ("vip", "control", True), (None, "split", False), ("vip", None, False)])
def test_split_duration_needs_both_tier_and_variant(tier, variant, counted):
    registry = new_registry()
    metrics = WorkerMetrics(registry, lambda: (1, 0))
    metrics.call_done("k1", "openai", "ok", 0.4, tier=tier, variant=variant)
    metrics.call_done("k1", "openai", "ok", -1.0, tier=tier, variant=variant)
    count = value(registry, "ratefleet_split_request_duration_seconds_count", tier=str(tier), variant=str(variant))
    assert count == (2 if counted else None)
    if counted:
        assert value(registry, "ratefleet_split_request_duration_seconds_sum", tier=tier, variant=variant) == \
            pytest.approx(0.4)
        assert value(registry, "ratefleet_split_request_duration_seconds_bucket", tier=tier, variant=variant,
                     le="0.01") == 1
    samples = scrape(registry)["ratefleet_split_request_duration_seconds"].samples
    assert bool(samples) is counted


def test_children_look_each_label_set_up_once():
    calls: list[tuple[str, ...]] = []
    counter = Counter("ratefleet_things", "things", ("tier", "status"), registry=CollectorRegistry())

    class Counting:
        def labels(self, *values: str):
            calls.append(values)
            return counter.labels(*values)

    children = Children(Counting())  # type: ignore[arg-type]
    for _ in range(3):
        children("vip", "ok").inc()
        children("normal", "ok").inc()
    assert calls == [("vip", "ok"), ("normal", "ok")]
    assert counter.labels("vip", "ok")._value.get() == 3
