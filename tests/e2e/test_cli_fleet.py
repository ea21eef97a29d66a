"""The CLI as a user runs it: `ratefleet up` in one terminal, `submit`/`status`/`request` in
another; `ratefleet demo`; the breaker seen through `status`."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import tomli_w
from fleetkit import SECRETS, FleetKit, chat_job, collect, mock_keys, wait_for_leader

from ratefleet import Client
from ratefleet.mock import MockKey, MockSettings, running_mock

# a hang guard: each test waits for `up` (60 s bound), then runs several CLI commands (up to 60 s
# each); one interpreter start-up alone took 11-29 s on a loaded 2-core machine, so 120 s was
# cut into by start-ups (a test stopped mid-command, at 120 s, with every step on its way)
pytestmark = [pytest.mark.timeout(240)]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def cli(*args: str, env=None, timeout=60, input=None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "ratefleet", *args], capture_output=True, text=True,
                          timeout=timeout, env=env, input=input)


def answers(*args: str) -> bool:
    """Whether the command exits 0 within 20 s (a CLI start-up on a loaded 2-core machine may
    take most of that: a slow try is a "not yet", as a refused one is)."""
    try:
        return cli(*args, timeout=20).returncode == 0
    except subprocess.TimeoutExpired:
        return False


def _both_workers(*nats: str) -> bool:
    """Whether status answers within 20 s naming a leader and two workers."""
    try:
        done = cli("status", "--json", *nats, timeout=20)
    except subprocess.TimeoutExpired:
        return False
    if done.returncode != 0:
        return False
    status = json.loads(done.stdout)
    return bool(status.get("leader")) and len(status.get("workers") or []) == 2


def start_up(tmp_path, upstream_url: str, port: int, keys: tuple[str, ...], workers: int) -> subprocess.Popen:
    """`ratefleet up` (embedded NATS on `port`, store in tmp_path/nats) over the mock upstream with
    `keys` at 100 req/s each, `workers` worker processes; its output on the Popen's stdout."""
    config = {"nats": {"url": f"nats://127.0.0.1:{port}", "embedded_dir": str(tmp_path / "nats")},
              "upstreams": {"mock": {"base_url": upstream_url}},
              "pools": {"shared": {"keys": [{"id": k, "secret": f"env:RF_TEST_{k.upper()}", "rps": 100, "burst": 10}
                                            for k in keys]}},
              "workers": {"heartbeat_s": 0.5}}
    path = tmp_path / "fleet.toml"
    path.write_text(tomli_w.dumps(config))
    env = {**os.environ, **{f"RF_TEST_{k.upper()}": SECRETS[k] for k in keys}, "RATEFLEET_LOG_FORMAT": "json"}
    env.pop("RATEFLEET_NATS_URL", None)
    return subprocess.Popen([sys.executable, "-m", "ratefleet", "up", "--config", str(path), "--workers", str(workers),
                             "--http-base-port", "0"], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def test_up_serves_jobs_submitted_from_another_terminal(tmp_path):
    port = free_port()
    with running_mock(MockSettings(keys=mock_keys(rps=100, burst=10), accept_unknown=False)) as upstream:
        up = start_up(tmp_path, upstream.url, port, ("k1", "k2"), workers=2)
        try:
            jobs = tmp_path / "jobs.jsonl"
            jobs.write_text("".join(json.dumps(chat_job(i)) + "\n" for i in range(25)))
            nats = ["--nats", f"nats://127.0.0.1:{port}"]
            # `up` starts NATS, a dispatcher and two workers: until status lists both (a status
            # answered by the leader alone was taken for "up"; a worker still starting on a loaded
            # machine was then missing from the status read after the batch)
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline and not _both_workers(*nats):
                time.sleep(0.5)
            out = tmp_path / "results.jsonl"
            done = cli("submit", str(jobs), "--tier", "normal", "--wait", "--out", str(out), *nats, timeout=60)
            assert done.returncode == 0, done.stderr
            lines = [json.loads(line) for line in out.read_text().splitlines()]
            assert len(lines) == 25 and {r["status"] for r in lines} == {"succeeded"}
            assert len({r["job_id"] for r in lines}) == 25
            # three commands that change nothing, side by side (one interpreter start-up each:
            # 11-29 s on a loaded 2-core machine); the request comes after the call count is read
            with ThreadPoolExecutor(max_workers=3) as pool:
                asked = pool.submit(cli, "status", "--json", *nats)
                tabled = pool.submit(cli, "status", *nats)
                refused = pool.submit(cli, "submit", "-", "--tier", "normal", *nats,
                                      input='{"request": {"path": "http://evil/"}}\nnot json\n')
            status = json.loads(asked.result().stdout)
            assert status["leader"] and len(status["workers"]) == 2
            assert status["keys"]["k1"]["calls"] + status["keys"]["k2"]["calls"] == 25
            table = tabled.result()
            assert "k1" in table.stdout and "leader" in table.stdout
            bad = refused.result()
            assert bad.returncode == 2 and "line 1" in bad.stderr and "line 2" in bad.stderr
            one = cli("request", "--tier", "vip", json.dumps(chat_job(99)), *nats)
            assert one.returncode == 0 and json.loads(one.stdout)["status"] == "succeeded"
        finally:
            up.send_signal(signal.SIGINT)
            output, _ = up.communicate(timeout=60)
        assert up.returncode == 0, output
        assert "started embedded nats-server" in output
        assert not any(SECRETS[k] in output for k in SECRETS)
    # the embedded server is gone with it
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", port), timeout=0.5)


def test_up_restarts_its_embedded_nats_server_after_a_sigkill(tmp_path):
    """A killed embedded nats-server is started again on its port and store, and the fleet
    carries on (before, it stayed down while `up` ran on: every process waited, the gateway
    answered 503 until `up` itself was restarted)."""
    port = free_port()
    with running_mock(MockSettings(keys=mock_keys(rps=100, burst=10), accept_unknown=False)) as upstream:
        store = tmp_path / "nats"
        up = start_up(tmp_path, upstream.url, port, ("k1",), workers=1)
        nats = ["--nats", f"nats://127.0.0.1:{port}"]
        try:
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline and not answers("status", "--json", *nats):
                time.sleep(0.5)
            found = subprocess.run(["pgrep", "-f", f"nats-server.*{store}"], capture_output=True, text=True)
            pids = [int(pid) for pid in found.stdout.split()]
            assert len(pids) == 1, found
            os.kill(pids[0], signal.SIGKILL)
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline and not answers("status", "--json", *nats):
                time.sleep(0.5)
            jobs = tmp_path / "jobs.jsonl"
            jobs.write_text("".join(json.dumps(chat_job(i)) + "\n" for i in range(5)))
            done = cli("submit", str(jobs), "--tier", "normal", "--wait", *nats, timeout=60)
            assert done.returncode == 0, done.stdout + done.stderr
        finally:
            up.send_signal(signal.SIGINT)
            output, _ = up.communicate(timeout=60)
        assert "embedded nats-server exited; restarting it" in output and "embedded nats-server restarted" in output
        assert up.returncode == 0, output[-3000:]


def test_demo_exits_zero_with_its_summary():
    done = cli("demo", "--jobs", "120", "--vip", "8", timeout=110)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "every job has one result; no key went over its limit" in done.stdout
    assert "queue wait" in done.stdout and "per key" in done.stdout


@pytest.mark.anyio
async def test_failing_key_opens_its_breaker_and_jobs_move_to_the_healthy_key(tmp_path, nats_server):
    keys = (MockKey(id="k1", secret=SECRETS["k1"], rps=100, burst=10, status=503),
            MockKey(id="k2", secret=SECRETS["k2"], rps=100, burst=10))
    with running_mock(MockSettings(keys=keys, accept_unknown=False)) as upstream:
        kit = FleetKit(tmp_path, nats_server.url, upstream.url,
                       keys=[{"id": "k1", "rps": 100, "burst": 10}, {"id": "k2", "rps": 100, "burst": 10}],
                       overrides={"dispatcher": {"breaker_fail_max": 3, "breaker_reset_s": 60}})
        kit.dispatcher("d1"), kit.worker("w1", slots=4)
        try:
            async with await Client.connect(nats_server.url) as client:
                await wait_for_leader(client)
                await client.submit_many([chat_job(i) for i in range(40)], "normal", batch="brk")
                results = await collect(client, "brk", 40, timeout=40)
                status = await client.status()
        finally:
            kit.stop()
        k1_calls = upstream.stats()["keys"]["k1"]["calls"]
    assert len(results) == 40 and all(r.ok and r.key_id == "k2" for r in results.values())
    assert status["keys"]["k1"]["breaker"] == "open"
    # the breaker opened after 3 consecutive failures (plus what was already in flight), then no more calls
    assert 3 <= k1_calls <= 3 + 4, k1_calls
