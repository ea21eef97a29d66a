"""`ratefleet up --config FILE` watches the file: the file is pushed at start, a good edit
becomes the next revision that the running leader and worker apply (no restart: the same
worker process), and a bad edit is reported and changes nothing."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time

import pytest
import tomli_w
from fleetkit import SECRETS

from ratefleet import Client
from ratefleet.localfleet import free_port

pytestmark = [pytest.mark.timeout(240)]


def fleet_file(port: int, tmp_path, rps: float) -> dict:
    return {"nats": {"url": f"nats://127.0.0.1:{port}", "embedded_dir": str(tmp_path / "nats")},
            "upstreams": {"mock": {"base_url": "http://127.0.0.1:9"}},
            "pools": {"shared": {"keys": [{"id": "k1", "secret": "env:RF_TEST_K1", "rps": rps}]}},
            "workers": {"heartbeat_s": 0.5}}


async def wait_status(url: str, predicate, timeout: float = 90.0) -> dict:
    deadline = time.monotonic() + timeout
    status: dict = {}
    while time.monotonic() < deadline:
        try:
            async with await Client.connect(url) as client:
                status = await client.status(timeout=1.0)
            if predicate(status):
                return status
        except Exception:  # noqa: BLE001 - not up yet
            pass
        await asyncio.sleep(0.3)
    raise AssertionError(f"not within {timeout}s: {str(status)[:2000]}")


def revision_everywhere(revision: int):
    return lambda s: (s.get("config_revision") == revision and len(s.get("workers") or []) == 1
                      and s["workers"][0].get("config_revision") == revision)


@pytest.mark.anyio
async def test_up_pushes_its_config_file_on_every_good_edit(tmp_path):
    port = free_port()
    url = f"nats://127.0.0.1:{port}"
    path = tmp_path / "fleet.toml"
    path.write_text(tomli_w.dumps(fleet_file(port, tmp_path, rps=5)))
    env = {**os.environ, "RF_TEST_K1": SECRETS["k1"], "RATEFLEET_LOG_FORMAT": "json"}
    env.pop("RATEFLEET_NATS_URL", None)
    log = open(tmp_path / "up.log", "wb")
    up = subprocess.Popen([sys.executable, "-m", "ratefleet", "up", "--config", str(path), "--workers", "1",
                           "--http-base-port", "0"],
                          env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        first = await wait_status(url, revision_everywhere(1))
        worker_pid = first["workers"][0]["pid"]
        path.write_text(tomli_w.dumps(fleet_file(port, tmp_path, rps=-3)))  # a bad edit
        await asyncio.sleep(3)
        path.write_text(tomli_w.dumps(fleet_file(port, tmp_path, rps=9)))
        second = await wait_status(url, revision_everywhere(2))
        assert second["keys"]["k1"]["rps"] == 9
        assert second["workers"][0]["pid"] == worker_pid  # applied live, not by a restart
    finally:
        up.send_signal(signal.SIGINT)
        try:
            up.wait(timeout=60)
        finally:
            try:
                os.killpg(up.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            log.close()
    output = (tmp_path / "up.log").read_text(errors="replace")
    assert "config file not pushed" in output and "pools.shared.keys.0.rps" in output
    assert "child exited" not in output
