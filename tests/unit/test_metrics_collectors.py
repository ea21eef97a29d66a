"""Fast tests of the metrics: naming, labels, the leader collector over a snapshot, the worker
counters, the probes' HTTP answers, `up`'s port assignment and the Grafana dashboard."""

from __future__ import annotations

import json
import re
import socket
from pathlib import Path
from types import SimpleNamespace

import pytest
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families
from starlette.testclient import TestClient

from ratefleet.dispatcher.shell.metrics import DispatcherMetrics, LeaderView
from ratefleet.gateway.metrics import GatewayMetrics
from ratefleet.runtime import probes as probes_module
from ratefleet.runtime.cache import CacheStats
from ratefleet.runtime.metrics import ALL_METRICS, KEY_STATES, key_state, new_registry, register_cache
from ratefleet.runtime.probes import Probes, parse_http
from ratefleet.schemas.errors import ConfigError
from ratefleet.supervisor import Child, assign_http
from ratefleet.workers.metrics import WorkerMetrics

DASHBOARD = Path(__file__).resolve().parents[2] / "examples" / "grafana" / "ratefleet.json"
ALLOWED_LABELS = {"tier", "status", "key", "outcome", "upstream", "state", "le", "result", "variant", "caller"}


def _key(**fields):
    return {"in_flight": 2, "tokens": 3.5, "effective_rps": 12.5, "breaker": "closed", "cooldown_s": 0.0,
            "state": "enabled", "disabled": False, **fields}


LEADER = {"keys": {"k1": _key(), "k2": _key(breaker="open", in_flight=0, tokens=0.0)},
          "tiers": {"vip": {"pending": 2}, "normal": {"pending": 0}}}


def _samples(registry) -> dict[tuple[str, tuple], float]:
    text = generate_latest(registry).decode()
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


@pytest.mark.parametrize(("snapshot", "state"), [
    (_key(), "closed"),
    (_key(cooldown_s=1.5), "cooling"),
    (_key(breaker="open", cooldown_s=1.5), "open"),
    (_key(breaker="half_open"), "half-open"),
    (_key(breaker="open", disabled=True), "disabled"),       # disabled by the provider or an operator
    (_key(state="disabled", disabled=False), "disabled"),    # no worker holds its secret
])
def test_key_state_picks_one_state_disabled_first(snapshot, state):
    assert key_state(snapshot) == state and state in KEY_STATES


def test_the_leader_collector_reads_the_snapshot_at_scrape_time():
    view = {"now": LeaderView(LEADER, backlog={"vip": 5, "normal": 7}, desired_workers=3)}
    registry = new_registry()
    DispatcherMetrics(registry, lambda: view["now"])
    got = _samples(registry)
    assert got[("ratefleet_is_leader", ())] == 1
    assert got[("ratefleet_desired_workers", ())] == 3
    assert got[("ratefleet_queue_depth", (("tier", "vip"),))] == 7  # 5 undelivered + 2 held
    assert got[("ratefleet_queue_depth", (("tier", "normal"),))] == 7
    assert got[("ratefleet_key_in_flight", (("key", "k1"),))] == 2
    assert got[("ratefleet_key_tokens", (("key", "k1"),))] == 3.5
    assert got[("ratefleet_key_effective_rps", (("key", "k2"),))] == 12.5
    states = {s: got[("ratefleet_key_state", (("key", "k2"), ("state", s)))] for s in KEY_STATES}
    assert states == {"closed": 0, "open": 1, "half-open": 0, "cooling": 0, "disabled": 0}
    view["now"] = LeaderView(None)  # lost the lease: the next scrape says so, and no stale key gauges
    got = _samples(registry)
    assert got[("ratefleet_is_leader", ())] == 0
    assert got[("ratefleet_desired_workers", ())] == 0  # standbys say 0: max() over dispatchers is the leader's
    assert not [name for name, _ in got if name.startswith(("ratefleet_key_", "ratefleet_queue_depth"))]


def test_worker_metrics_count_calls_jobs_and_read_slots_when_scraped():
    busy = {"n": 3}
    registry = new_registry()
    metrics = WorkerMetrics(registry, lambda: (8, busy["n"]))
    metrics.call_started("vip", 0.2)
    metrics.call_done("k1", "openai", "ok", 0.8)
    metrics.call_done("k1", "openai", "rate_limited", 0.1)
    metrics.job_ended("vip", "succeeded")
    busy["n"] = 5
    got = _samples(registry)
    assert got[("ratefleet_upstream_requests_total", (("key", "k1"), ("outcome", "ok")))] == 1
    assert got[("ratefleet_upstream_requests_total", (("key", "k1"), ("outcome", "rate_limited")))] == 1
    assert got[("ratefleet_upstream_request_duration_seconds_count", (("upstream", "openai"),))] == 2
    assert got[("ratefleet_upstream_request_duration_seconds_sum", (("upstream", "openai"),))] == pytest.approx(0.9)
    assert got[("ratefleet_queue_wait_seconds_bucket", (("le", "0.25"), ("tier", "vip")))] == 1
    assert got[("ratefleet_jobs_total", (("status", "succeeded"), ("tier", "vip")))] == 1
    assert got[("ratefleet_worker_slots", (("state", "busy"),))] == 5
    assert got[("ratefleet_worker_slots", (("state", "free"),))] == 3


def test_names_units_and_labels_follow_prometheus_practice():
    worker, leader = new_registry(), new_registry()
    worker_metrics = WorkerMetrics(worker, lambda: (4, 1))
    worker_metrics.call_done("k1", "mock", "ok", 0.1, tier="premium", variant="split")
    worker_metrics.job_ended("premium", "succeeded", "split")
    register_cache(worker, lambda: CacheStats(hits=1, misses=2, writes=3))
    DispatcherMetrics(leader, lambda: LeaderView(LEADER, {"vip": 1})).job_ended("vip", "invalid")
    gateway = new_registry()
    GatewayMetrics(gateway).answered("app", 200, 0.05)
    families = [f for registry in (worker, leader, gateway)
                for f in text_string_to_metric_families(generate_latest(registry).decode())]
    exported = set()
    for family in families:
        if family.name.endswith("_created"):
            continue
        assert family.name.startswith("ratefleet_")
        exported.add(family.name + ("_total" if family.type == "counter" else ""))
        if family.type == "histogram":
            assert family.name.endswith("_seconds")  # base unit
        for sample in family.samples:
            assert set(sample.labels) <= ALLOWED_LABELS, sample
    assert exported == set(ALL_METRICS)


def test_no_job_id_or_secret_becomes_a_label():
    """Labels come from tier, key id, status, outcome, upstream only: a scrape after many
    jobs has as many series as (tier x status) and (key x outcome), not one per job."""
    registry = new_registry()
    metrics = WorkerMetrics(registry, lambda: (4, 0))
    for i in range(500):
        metrics.job_ended("normal", "succeeded")
        metrics.call_done(f"k{i % 2}", "mock", "ok", 0.01)
    text = generate_latest(registry).decode()
    assert len(re.findall(r"^ratefleet_jobs_total\{", text, re.M)) == 1
    assert len(re.findall(r"^ratefleet_upstream_requests_total\{", text, re.M)) == 2


def test_every_dashboard_query_uses_a_fleet_metric_and_every_metric_is_shown():
    exprs = [t["expr"] for panel in json.loads(DASHBOARD.read_text())["panels"] for t in panel["targets"]]
    used = set(re.findall(r"\bratefleet_[a-z_]+", " ".join(exprs)))
    known = {m for m in ALL_METRICS} | {f"{m}{s}" for m in ALL_METRICS if m.endswith("_seconds")
                                        for s in ("_bucket", "_sum", "_count")}
    assert used and used <= known, used - known
    assert {m for m in ALL_METRICS if not any(u.startswith(m) for u in used)} == set()


class _FakeNc:
    is_connected = True


def test_readyz_says_why_and_never_fails_with_a_500(monkeypatch):
    probes = Probes()
    client = TestClient(probes.app())
    assert client.get("/healthz").json() == {"ok": True}
    answer = client.get("/readyz")
    assert answer.status_code == 503 and answer.json() == {"ready": False, "reason": "not connected to NATS yet"}
    probes.nc = _FakeNc()
    assert client.get("/readyz").json() == {"ready": True}

    async def no_leader():
        return "no leader heard yet"

    async def broken():
        raise RuntimeError("sk-should-not-show")

    probes.checks = [broken]
    answer = client.get("/readyz")
    assert answer.status_code == 503 and answer.json()["reason"] == "readiness check failed (RuntimeError)"
    probes.checks = [no_leader]
    assert client.get("/readyz").json()["reason"] == "no leader heard yet"
    probes.nc.is_connected = False
    assert "reconnecting" in client.get("/readyz").json()["reason"]
    metrics = client.get("/metrics")  # no redirect to /metrics/
    assert metrics.status_code == 200 and metrics.headers["content-type"].startswith("text/plain")


def test_readyz_times_out_a_hanging_check(monkeypatch):
    import anyio

    monkeypatch.setattr(probes_module, "CHECK_TIMEOUT_S", 0.1)
    probes = Probes()
    probes.nc = SimpleNamespace(is_connected=True)

    async def hangs():
        await anyio.sleep(10)

    probes.checks = [hangs]
    answer = TestClient(probes.app()).get("/readyz")
    assert answer.status_code == 503 and "timed out" in answer.json()["reason"]


@pytest.mark.parametrize("bad", ["9464", "localhost", ":9464", "host:port", "host:70000",
                                 "127.0.0.1:\u00b2", "::1", "::1:9464"])  # other digits; IPv6 without brackets
def test_http_address_must_be_host_and_port(bad):
    with pytest.raises(ConfigError, match="--http"):
        parse_http(bad)
    assert parse_http("0.0.0.0:9464") == ("0.0.0.0", 9464)
    assert parse_http("[::1]:0") == ("::1", 0)


def test_up_assigns_each_process_its_own_free_port():
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        base = taken.getsockname()[1]  # the first port is in use: skipped
        children = [Child("dispatcher", []), Child("worker", []), Child("gateway", []), Child("worker", [])]
        assign_http(children, "127.0.0.1", base)
    ports = [int(c.http.rsplit(":", 1)[1]) for c in children if c.http]
    assert children[2].http is None  # the gateway serves its probes on its own listen address
    assert len(set(ports)) == 3 and all(p > base for p in ports) and ports == sorted(ports)
    picked = [Child("worker", []), Child("worker", [])]
    assign_http(picked, "127.0.0.1", 0)
    assert all(c.http and not c.http.endswith(":0") for c in picked)


def test_a_killed_childs_port_with_connections_left_in_time_wait_is_free_again_a_listened_one_is_not():
    """An operations trial: a worker SIGKILLed while Prometheus held a keep-alive connection to
    its /metrics came back on a random port (3 of 3): the probe bind saw the port taken."""
    from ratefleet.supervisor import _port_free

    listener = probes_module.bind_listener("127.0.0.1", 0, "--http", instead="")
    port = listener.getsockname()[1]
    listener.setblocking(True)
    scraper = socket.create_connection(("127.0.0.1", port))
    served, _ = listener.accept()
    assert not _port_free("127.0.0.1", port)  # listened on
    served.close()  # the child's end closes first (it was killed): its side waits in FIN-WAIT / TIME-WAIT
    listener.close()
    try:
        assert _port_free("127.0.0.1", port)
        again = probes_module.bind_listener("127.0.0.1", port, "--http", instead="")  # what the child then does
        again.close()
    finally:
        scraper.close()


@pytest.mark.anyio
async def test_the_finisher_reports_each_result_it_stores_once_never_a_duplicate():
    """The dispatcher counts its ratefleet_jobs_total through Finisher.on_stored: a Result
    already stored (a redelivery finished twice) is not counted again."""
    from test_mut_finish import ACK, finisher, text_result

    f, _, _, _ = finisher()
    seen = []
    f.on_stored = seen.append
    assert await f.finish(text_result("hi"), ack=ACK, reply_to=None) is True
    assert await f.finish(text_result("again"), ack=ACK, reply_to=None) is False
    assert [(r.job_id, r.status) for r in seen] == [("j1", "succeeded")]


def test_cache_counters_are_read_at_scrape_time():
    stats = CacheStats()
    registry = new_registry()
    register_cache(registry, lambda: stats)
    stats.hits, stats.misses, stats.writes, stats.errors = 3, 5, 2, 1  # errors are already among the misses
    samples = {(s.name, s.labels.get("result")): s.value
               for f in text_string_to_metric_families(generate_latest(registry).decode()) for s in f.samples}
    assert samples[("ratefleet_cache_requests_total", "hit")] == 3
    assert samples[("ratefleet_cache_requests_total", "miss")] == 5
    assert samples[("ratefleet_cache_writes_total", None)] == 2
