"""/metrics, /healthz, /readyz and NATS micro discovery over real processes: dispatchers and
workers started with `--http`, a real nats-server, jobs through the real mock upstream,
/metrics scraped with httpx and parsed with prometheus_client's own parser."""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import httpx
import nats
import pytest
import tomli_w
from fleetkit import SECRETS, FleetKit, chat_job, collect, wait_for_leader
from prometheus_client.parser import text_string_to_metric_families

from ratefleet import Client
from ratefleet.localfleet import free_port
from ratefleet.mock import MockKey, MockSettings, running_mock
from ratefleet.runtime.embedded import EmbeddedNats

pytestmark = [pytest.mark.timeout(180)]
DASHBOARD = Path(__file__).resolve().parents[2] / "examples" / "grafana" / "ratefleet.json"


def scrape(url: str) -> tuple[str, list[tuple[str, dict[str, str], float]]]:
    """The /metrics text of `url` and its samples (name, labels, value)."""
    response = httpx.get(f"{url}/metrics", timeout=10)
    assert response.status_code == 200 and response.headers["content-type"].startswith("text/plain")
    samples = [(s.name, s.labels, s.value) for family in text_string_to_metric_families(response.text)
               for s in family.samples]
    return response.text, samples


def total(samples, name: str, **labels: str) -> float:
    return sum(v for n, lab, v in samples if n == name and all(lab.get(k) == x for k, x in labels.items()))


def wait_until(predicate, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        try:
            last = predicate()
            if last:
                return last
        except httpx.HTTPError as exc:  # not listening yet
            last = exc
        time.sleep(0.2)
    raise AssertionError(f"{what} not within {timeout}s (last: {last!r})")


def readyz(url: str) -> tuple[int, dict]:
    response = httpx.get(f"{url}/readyz", timeout=5)
    return response.status_code, response.json()


def dashboard_metrics() -> set[str]:
    text = json.dumps([t["expr"] for p in json.loads(DASHBOARD.read_text())["panels"] for t in p["targets"]])
    return set(re.findall(r"\bratefleet_[a-z_]+", text))


@pytest.fixture
def upstream():
    keys = (MockKey(id="k1", secret=SECRETS["k1"], rps=50, burst=5),
            MockKey(id="k2", secret=SECRETS["k2"], rps=50, burst=5, status=400))  # every k2 call: 400
    with running_mock(MockSettings(keys=keys, accept_unknown=False)) as mock:
        yield mock


async def _run_jobs(nats_url: str, normal: int, vip: int) -> tuple[dict, Counter]:
    async with await Client.connect(nats_url) as client:
        status = await wait_for_leader(client)
        while len(status["workers"]) < 2 or not status.get("dispatchers"):
            await asyncio.sleep(0.2)
            status = await client.status()
        before = status
        for i in range(normal):
            await client.submit(chat_job(i, batch="m1"), tier="normal")
        for i in range(vip):
            await client.submit(chat_job(1000 + i, batch="m1"), tier="vip")
        results = await collect(client, "m1", normal + vip, timeout=90)
        assert len(results) == normal + vip
        return before, Counter((r.tier, r.status) for r in results.values())


def test_metrics_count_every_job_and_call_and_name_no_secret(nats_server, tmp_path, upstream):
    kit = FleetKit(tmp_path, nats_server.url, upstream.url)
    kit.spawn("dispatcher", "--id", "d1", "--http", "127.0.0.1:0", name="d1")
    for name in ("w1", "w2"):
        kit.spawn("worker", "--id", name, "--http", "127.0.0.1:0", name=name)
    try:
        status, ended = asyncio.run(_run_jobs(nats_server.url, normal=30, vip=8))
        # status --json lists every process's address (port 0: the port each really got)
        workers = {w["id"]: w["http"] for w in status["workers"]}
        dispatchers = {d["id"]: d["http"] for d in status["dispatchers"]}
        assert set(workers) == {"w1", "w2"} and set(dispatchers) == {"d1"} and status["http"] == dispatchers["d1"]
        assert all(re.fullmatch(r"http://127\.0\.0\.1:\d+", url) for url in [*workers.values(), *dispatchers.values()])

        scraped = {name: scrape(url) for name, url in {**workers, **dispatchers}.items()}
        wsamples = [s for name in workers for s in scraped[name][1]]
        # jobs_total moved by exactly the Results stored, per tier and status (k2 answers 400: failed)
        assert ended[("normal", "failed")] > 0 or ended[("vip", "failed")] > 0
        for (tier, result_status), count in ended.items():
            assert total(wsamples, "ratefleet_jobs_total", tier=tier, status=result_status) == count
        assert total(wsamples, "ratefleet_jobs_total") == 38
        # upstream calls per key and outcome = what the real upstream counted
        mock = upstream.stats()["keys"]
        assert total(wsamples, "ratefleet_upstream_requests_total", key="k1") == mock["k1"]["calls"]
        assert total(wsamples, "ratefleet_upstream_requests_total", key="k1", outcome="ok") == mock["k1"]["ok"]
        assert total(wsamples, "ratefleet_upstream_requests_total", key="k2", outcome="bad_request") == mock["k2"]["calls"]
        calls = mock["k1"]["calls"] + mock["k2"]["calls"]
        assert total(wsamples, "ratefleet_upstream_request_duration_seconds_count", upstream="mock") == calls
        assert total(wsamples, "ratefleet_queue_wait_seconds_count") == calls
        for name in workers:
            slots = scraped[name][1]
            assert total(slots, "ratefleet_worker_slots", state="busy") + total(slots, "ratefleet_worker_slots",
                                                                                 state="free") == 16

        dsamples = scraped["d1"][1]
        assert total(dsamples, "ratefleet_is_leader") == 1
        assert total(dsamples, "ratefleet_desired_workers") >= 1  # jobs arrived lately, k1 has room
        assert {lab["tier"] for n, lab, _ in dsamples if n == "ratefleet_queue_depth"} == {"vip", "premium", "normal",
                                                                                            "guest"}
        assert total(dsamples, "ratefleet_queue_depth") == 0  # every job is done
        for key in ("k1", "k2"):
            assert total(dsamples, "ratefleet_key_state", key=key) == 1  # exactly one state
            assert total(dsamples, "ratefleet_key_effective_rps", key=key) > 0
            assert total(dsamples, "ratefleet_key_in_flight", key=key) == 0
            assert [n for n, lab, _ in dsamples if n == "ratefleet_key_tokens" and lab["key"] == key]

        # no secret anywhere in /metrics (nor in the status answer carrying the addresses)
        texts = [text for text, _ in scraped.values()]
        assert not [s for s in SECRETS.values() for text in [*texts, json.dumps(status)] if s in text]
        # every metric the Grafana dashboard queries exists on a live /metrics
        live = {n for _, samples in scraped.values() for n, _, _ in samples}
        # a labelled metric nobody has observed yet (the A/B split metrics without a split tier)
        # has no sample but is declared: `# TYPE name counter|histogram`
        for text, _ in scraped.values():
            for name, kind in re.findall(r"^# TYPE (ratefleet_\w+) (\w+)$", text, re.M):
                live |= {name, f"{name}_bucket", f"{name}_sum", f"{name}_count"} if kind == "histogram" else {name}
        # (the gateway's own metrics are on a gateway's /metrics: tests/e2e/test_gateway_cache.py checks them)
        fleet = {name for name in dashboard_metrics() if not name.startswith("ratefleet_gateway_")}
        assert fleet and not fleet - live, fleet - live

        # a job refused at the door over rpc is counted by the dispatcher that refused it; the
        # rpc endpoint is a NATS micro service: $SRV.PING / INFO / STATS find it
        asyncio.run(_micro_discovery(nats_server.url, dispatchers["d1"]))
        assert total(scrape(dispatchers["d1"])[1], "ratefleet_jobs_total", tier="normal", status="invalid") == 1
    finally:
        kit.stop()


async def _micro_discovery(url: str, d1_http: str) -> None:
    nc = await nats.connect(url)
    try:
        bad = {"request": {"method": "POST", "path": "https://elsewhere.example/v1/chat/completions", "json": {}}}
        refused = json.loads((await nc.request("ratefleet.rpc.normal", json.dumps(bad).encode(), timeout=10)).data)
        assert refused["status"] == "invalid"
        ping = json.loads((await nc.request("$SRV.PING", b"", timeout=5)).data)
        assert ping["type"] == "io.nats.micro.v1.ping_response" and ping["name"] == "ratefleet"
        assert ping["metadata"]["dispatcher"] == "d1" and ping["metadata"]["http"] == d1_http
        info = json.loads((await nc.request("$SRV.INFO.ratefleet", b"", timeout=5)).data)
        endpoints = {e["name"]: e for e in info["endpoints"]}
        assert endpoints["rpc"]["subject"] == "ratefleet.rpc.*" and endpoints["rpc"]["queue_group"] == "ratefleet-rpc"
        assert endpoints["status"]["subject"] == "ratefleet.admin.status"
        stats = json.loads((await nc.request(f"$SRV.STATS.ratefleet.{ping['id']}", b"", timeout=5)).data)
        counted = {e["name"]: e["num_requests"] for e in stats["endpoints"]}
        assert counted["rpc"] == 1 and counted["status"] >= 1
    finally:
        await nc.close()


def test_readyz_follows_nats_streams_and_the_leader(tmp_path):
    nats_port = free_port()
    kit = FleetKit(tmp_path, f"nats://127.0.0.1:{nats_port}", "http://127.0.0.1:9")  # no call is made
    ports = {name: free_port() for name in ("w1", "d1", "d2")}
    urls = {name: f"http://127.0.0.1:{port}" for name, port in ports.items()}
    kit.spawn("worker", "--id", "w1", "--http", f"127.0.0.1:{ports['w1']}", name="w1")
    server = None
    try:
        # before NATS: alive, not ready, and says why
        code, body = wait_until(lambda: readyz(urls["w1"]), 30, "the worker's probes")
        assert code == 503 and body["ready"] is False and "NATS" in body["reason"]
        assert httpx.get(f"{urls['w1']}/healthz", timeout=5).status_code == 200
        assert httpx.get(f"{urls['w1']}/metrics", timeout=5).status_code == 200  # empty until the worker runs
        server = EmbeddedNats(tmp_path / "nats", port=nats_port).start()
        # NATS up, streams made by the worker, but no leader yet: still 503, for that reason
        code, body = wait_until(lambda: (r := readyz(urls["w1"]))[1].get("reason", "").startswith("no leader") and r,
                                60, "the worker to wait for a leader")
        assert code == 503
        for name in ("d1", "d2"):
            kit.spawn("dispatcher", "--id", name, "--http", f"127.0.0.1:{ports[name]}", name=name)
        for name in ("w1", "d1", "d2"):  # the standby is ready too: it knows the leader
            assert wait_until(lambda n=name: readyz(urls[n])[0] == 200, 60, f"{name} ready")
            assert readyz(urls[name]) == (200, {"ready": True})
        leaders = [total(scrape(urls[n])[1], "ratefleet_is_leader") for n in ("d1", "d2")]
        assert sorted(leaders) == [0, 1]
        standby = urls["d1" if leaders[0] == 0 else "d2"]
        assert total(scrape(standby)[1], "ratefleet_desired_workers") == 0
        assert sorted(asyncio.run(_ping_all(server.url))) == ["d1", "d2"]
        # the dispatchers go: the worker stops being ready once no leader is heard
        for proc in kit.processes[1:]:
            proc.send_signal(signal.SIGTERM)
        code, body = wait_until(lambda: (r := readyz(urls["w1"]))[0] == 503 and r, 60, "the worker to notice")
        assert body["reason"].startswith("no leader heard for")
    finally:
        kit.stop()
        if server is not None:
            server.stop()


async def _ping_all(url: str) -> list[str]:
    """Every dispatcher answering `$SRV.PING.ratefleet` within a second (as `nats micro ls`)."""
    nc = await nats.connect(url)
    found: list[str] = []
    try:
        inbox = nc.new_inbox()
        sub = await nc.subscribe(inbox)
        await nc.publish("$SRV.PING.ratefleet", b"", reply=inbox)
        deadline = time.monotonic() + 1.0
        while (left := deadline - time.monotonic()) > 0:
            try:
                msg = await sub.next_msg(timeout=left)
            except TimeoutError:
                break
            found.append(json.loads(msg.data)["metadata"]["dispatcher"])
    finally:
        await nc.close()
    return found


def test_up_gives_each_process_its_own_probe_port(tmp_path, upstream):
    port = free_port()
    config = {"nats": {"url": f"nats://127.0.0.1:{port}", "embedded_dir": str(tmp_path / "nats")},
              "upstreams": {"mock": {"base_url": upstream.url}},
              "pools": {"shared": {"keys": [{"id": "k1", "secret": "env:RF_TEST_K1", "rps": 50, "burst": 5}]}},
              "workers": {"heartbeat_s": 0.5}}
    path = tmp_path / "fleet.toml"
    path.write_text(tomli_w.dumps(config))
    env = {**os.environ, "RF_TEST_K1": SECRETS["k1"], "RATEFLEET_LOG_FORMAT": "json"}
    env.pop("RATEFLEET_NATS_URL", None)
    base = free_port()
    up = subprocess.Popen([sys.executable, "-m", "ratefleet", "up", "--config", str(path), "--workers", "2",
                           "--dispatchers", "2", "--http-base-port", str(base)],
                          env=env, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    try:
        printed = [up.stdout.readline() for _ in range(4)]
        urls = [re.search(r"(http://\S+)/metrics", line).group(1) for line in printed]
        assert [line.split(":")[0] for line in printed] == ["dispatcher 1", "dispatcher 2", "worker 1", "worker 2"]
        assert len(set(urls)) == 4 and urls[0] == f"http://127.0.0.1:{base}"
        for url in urls:  # (120 s: five interpreters start, 11-29 s each on a loaded 2-core machine; 60 ran out)
            assert wait_until(lambda u=url: readyz(u)[0] == 200, 120, f"{url} ready")
        status = json.loads(subprocess.run([sys.executable, "-m", "ratefleet", "status", "--json", "--nats",
                                            f"nats://127.0.0.1:{port}"], capture_output=True, text=True,
                                           timeout=30, env=env).stdout)
        listed = {d["http"] for d in status["dispatchers"]} | {w["http"] for w in status["workers"]}
        assert listed == set(urls)
    finally:
        up.send_signal(signal.SIGINT)
        up.communicate(timeout=60)


def test_the_gateway_serves_readyz_and_metrics_beside_its_api(nats_server, tmp_path, monkeypatch):
    from gatewaykit import CALLER_KEYS, caller_env, callers, start_gateway

    caller_env(monkeypatch)
    kit = FleetKit(tmp_path, nats_server.url, "http://127.0.0.1:9", overrides={"callers": callers()})
    try:
        url = start_gateway(kit)
        assert wait_until(lambda: readyz(url) == (200, {"ready": True}), 30, "the gateway ready")
        text, _ = scrape(url)
        assert not [key for key in CALLER_KEYS.values() if key in text]
        nats_server.stop()  # NATS away: the gateway cannot take jobs, and says so
        code, body = wait_until(lambda: (r := readyz(url))[0] == 503 and r, 30, "the gateway to notice")
        assert "NATS" in body["reason"]
    finally:
        kit.stop()
