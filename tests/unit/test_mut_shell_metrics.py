"""The dispatcher's gauges and counter (dispatcher/shell/metrics.py) over partial snapshots:
a tier known only to JetStream or only to the leader, a tier without `pending`, a status
without keys or tiers, and the jobs counter's labels in the dispatcher's own registry."""

from __future__ import annotations

import pytest
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from ratefleet.dispatcher.shell.metrics import DispatcherMetrics, LeaderView
from ratefleet.runtime.metrics import new_registry


def samples(view: LeaderView) -> dict[tuple[str, tuple], float]:
    registry = new_registry()
    DispatcherMetrics(registry, lambda: view)
    text = generate_latest(registry).decode()
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def depth(found: dict, tier: str) -> float | None:
    return found.get(("ratefleet_queue_depth", (("tier", tier),)))


@pytest.mark.parametrize(("status", "backlog", "expected"), [
    ({"tiers": {"vip": {"pending": 2}}}, {"normal": 7}, {"vip": 2, "normal": 7}),  # each known to one side only
    ({"tiers": {"vip": {"pending": 2}}}, {"vip": 5}, {"vip": 7}),
    ({"tiers": {"vip": {}}}, {}, {"vip": 0}),                                     # a tier without `pending`
    ({}, {"guest": 3}, {"guest": 3}),                                             # no tiers in the status
    ({"leader": "d-1", "state": "starting"}, {"guest": 3}, {"guest": 3}),         # a leader still starting
    ({"tiers": {}, "keys": {}}, {}, {}),
])
def test_queue_depth_is_the_backlog_plus_the_held_jobs_of_every_tier_either_side_knows(status, backlog, expected):
    found = samples(LeaderView(status, backlog=backlog))
    assert {tier: depth(found, tier) for tier in expected} == expected
    assert sum(1 for name, _ in found if name == "ratefleet_queue_depth") == len(expected)
    assert found[("ratefleet_is_leader", ())] == 1


def test_a_status_without_keys_exports_no_key_gauges():
    found = samples(LeaderView({"tiers": {"vip": {"pending": 1}}}))
    assert not [name for name, _ in found if name.startswith("ratefleet_key_")]
    assert depth(found, "vip") == 1


def test_jobs_ended_are_counted_by_tier_and_status_in_the_dispatchers_registry():
    registry = new_registry()
    metrics = DispatcherMetrics(registry, lambda: LeaderView(None))
    metrics.job_ended("vip", "invalid")
    metrics.job_ended("vip", "invalid")
    metrics.job_ended("normal", "failed")
    text = generate_latest(registry).decode()
    found = {(s.name, tuple(sorted(s.labels.items()))): s.value
             for family in text_string_to_metric_families(text) for s in family.samples}
    assert found[("ratefleet_jobs_total", (("status", "invalid"), ("tier", "vip")))] == 2
    assert found[("ratefleet_jobs_total", (("status", "failed"), ("tier", "normal")))] == 1
