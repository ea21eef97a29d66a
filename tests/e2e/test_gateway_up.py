"""`ratefleet up --gateway`: the whole fleet and its front door from one command."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time

import httpx
import openai
import pytest
import tomli_w
from fleetkit import SECRETS, mock_keys
from gatewaykit import free_port

from ratefleet.mock import MockSettings, running_mock

# a hang guard: up to 120 s for `up` to serve, 60 s for it to stop, the other test's CLI runs
pytestmark = [pytest.mark.timeout(240)]


def test_up_with_gateway_serves_the_sdk_and_stops_it_on_ctrl_c(tmp_path):
    nats_port, gateway_port = free_port(), free_port()
    with running_mock(MockSettings(keys=mock_keys(rps=100, burst=10), accept_unknown=False)) as upstream:
        config = {"nats": {"url": f"nats://127.0.0.1:{nats_port}", "embedded_dir": str(tmp_path / "nats")},
                  "upstreams": {"mock": {"base_url": upstream.url}},
                  "pools": {"shared": {"keys": [{"id": "k1", "secret": "env:RF_TEST_K1", "rps": 100, "burst": 10}]}},
                  "workers": {"heartbeat_s": 0.5},
                  "callers": {"app": {"key": "env:RF_CALLER_APP", "tier": "premium"}},
                  "gateway": {"listen": f"127.0.0.1:{gateway_port}"}}
        path = tmp_path / "fleet.toml"
        path.write_text(tomli_w.dumps(config))
        env = {**os.environ, "RF_TEST_K1": SECRETS["k1"], "RF_CALLER_APP": "rk-app-42", "RATEFLEET_LOG_FORMAT": "json"}
        env.pop("RATEFLEET_NATS_URL", None)
        up = subprocess.Popen([sys.executable, "-m", "ratefleet", "up", "--config", str(path), "--workers", "1",
                               "--gateway", "--http-base-port", "0"],
                              env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        try:
            ai = openai.OpenAI(base_url=f"http://127.0.0.1:{gateway_port}/v1", api_key="rk-app-42", max_retries=0,
                               timeout=20)
            # `up` starts NATS, a dispatcher, a worker and the gateway, each an interpreter whose
            # start-up alone took 11-29 s on a loaded 2-core machine: 60 s ran out there with the
            # gateway not listening yet (Connection refused). A bound on start-ups, not on the product
            deadline = time.monotonic() + 120
            while True:  # until the gateway listens and a worker serves its first job
                try:
                    chat = ai.chat.completions.create(model="mock", messages=[{"role": "user", "content": "up"}])
                    break
                except (openai.APIConnectionError, openai.InternalServerError):
                    if time.monotonic() > deadline or up.poll() is not None:
                        raise
                    time.sleep(0.5)
            assert chat.choices[0].message.content == "echo: up"
        finally:
            up.send_signal(signal.SIGINT)
            output, _ = up.communicate(timeout=60)
        assert up.returncode == 0, output[-3000:]
        with pytest.raises(httpx.ConnectError):
            httpx.get(f"http://127.0.0.1:{gateway_port}/healthz", timeout=2, trust_env=False)
        assert "rk-app-42" not in output


def test_gateway_refuses_to_start_without_config_or_with_an_unreadable_caller_key(tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in ("RATEFLEET_CONFIG", "RATEFLEET_NATS_URL", "RF_CALLER_X")}
    missing = subprocess.run([sys.executable, "-m", "ratefleet", "gateway"], cwd=tmp_path, env=env,
                             capture_output=True, text=True, timeout=60)
    assert missing.returncode == 2 and "found no config file" in missing.stderr
    path = tmp_path / "gw.toml"
    path.write_text(tomli_w.dumps({"callers": {"x": {"key": "env:RF_CALLER_X", "tier": "vip"}}}))
    unset = subprocess.run([sys.executable, "-m", "ratefleet", "gateway", "--config", str(path)], env=env,
                           capture_output=True, text=True, timeout=60)
    assert unset.returncode == 2 and "callers.x.key: RF_CALLER_X not set" in unset.stderr
    bad = subprocess.run([sys.executable, "-m", "ratefleet", "gateway", "--config", str(path), "--listen", "nowhere"],
                         env=env, capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2 and "give HOST:PORT" in bad.stderr


def test_up_with_gateway_on_a_port_in_use_refuses_at_once(tmp_path):
    # the gateway child exited 2 ("cannot listen there"), and `up` restarted it every few seconds,
    # forever, after printing "gateway 1: http://127.0.0.1:PORT/metrics" for whatever held the port
    nats_port = free_port()
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        config = tmp_path / "fleet.toml"
        config.write_text(tomli_w.dumps({
            "nats": {"url": f"nats://127.0.0.1:{nats_port}"},
            "upstreams": {"u": {"base_url": "http://127.0.0.1:9"}},
            "pools": {"p": {"keys": [{"id": "k1", "rps": 1, "secret": "env:RF_UP_GW_K1"}]}},
            "callers": {"app": {"key": "env:RF_UP_GW_APP", "tier": "normal"}},
            "gateway": {"listen": f"127.0.0.1:{port}"}}))
        returncode, stderr = refused_up(tmp_path, config, RF_UP_GW_K1="sk-1", RF_UP_GW_APP="rk-app-1")
    assert returncode == 2, stderr[-2000:]
    assert stderr.strip().splitlines()[-1] == (
        f"error: [gateway] listen 127.0.0.1:{port}: cannot listen there (Address already in use); set another "
        "[gateway] listen (or RATEFLEET_GATEWAY_LISTEN), or leave out --gateway")
    assert not (tmp_path / ".ratefleet").exists()  # refused before an embedded nats-server was started


def test_up_with_gateway_and_no_usable_caller_key_refuses_at_once(tmp_path):
    # the gateway child refused to start (exit 2, "no caller has a usable key") and `up`
    # restarted it every few seconds, forever
    config = tmp_path / "fleet.toml"
    config.write_text(tomli_w.dumps({
        "nats": {"url": f"nats://127.0.0.1:{free_port()}"},
        "upstreams": {"u": {"base_url": "http://127.0.0.1:9"}},
        "pools": {"p": {"keys": [{"id": "k1", "rps": 1, "secret": "env:RF_UP_GW_K1"}]}},
        "callers": {"app": {"key": "env:RF_UP_GW_UNSET", "tier": "normal"}},
        "gateway": {"listen": f"127.0.0.1:{free_port()}"}}))
    returncode, stderr = refused_up(tmp_path, config, RF_UP_GW_K1="sk-1")
    assert returncode == 2, stderr[-2000:]
    assert stderr.strip().splitlines()[-1].startswith(
        "error: no caller has a usable key (callers.app.key: RF_UP_GW_UNSET not set)"), stderr[-2000:]
    assert not (tmp_path / ".ratefleet").exists()  # refused before an embedded nats-server was started


def refused_up(tmp_path, config, **env_vars) -> tuple[int, str]:
    """Run `ratefleet up --gateway` with `config` and only `env_vars` of ours (no RATEFLEET_* or
    RF_UP_GW_* of the test run); its exit code and stderr, once it ends by itself (a fleet
    still running after 30 s is killed, with the test failed)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RATEFLEET_", "RF_UP_GW_"))}
    env.update(env_vars, RATEFLEET_LOG_FORMAT="json")
    up = subprocess.Popen([sys.executable, "-m", "ratefleet", "up", "--config", str(config), "--workers", "0",
                           "--gateway", "--http-base-port", "0"], cwd=tmp_path, env=env, text=True,
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True)
    try:
        _, stderr = up.communicate(timeout=30)
    except subprocess.TimeoutExpired:
        os.killpg(up.pid, signal.SIGKILL)  # the fleet it started too
        _, stderr = up.communicate()
        pytest.fail(f"`ratefleet up --gateway` still running after 30 s: {stderr[-2000:]}")
    return up.returncode, stderr
