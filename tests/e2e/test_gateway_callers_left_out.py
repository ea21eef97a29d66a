"""A caller whose key cannot be read where the gateway starts is left out, loudly, and the
others are served (a user trial: `[callers.tpm] key = "env:TPM_KEY"` appended under `ratefleet
up --gateway` without TPM_KEY, then any gateway restart exited 2 and `up` restarted it for ever,
every caller refused). Real processes: nats-server, the mock upstream, a dispatcher, a worker,
`ratefleet gateway`."""

from __future__ import annotations

import os
import subprocess
import sys

import httpx
import openai
import pytest
import tomli_w
from fleetkit import FleetKit, mock_keys, wait_for_leader
from gatewaykit import CALLER_KEYS, caller_env, callers, free_port, start_gateway

from ratefleet import Client
from ratefleet.mock import MockSettings, running_mock

pytestmark = [pytest.mark.timeout(120), pytest.mark.anyio]


async def test_a_caller_without_its_key_is_left_out_and_every_other_caller_is_served(tmp_path, nats_server,
                                                                                     monkeypatch):
    caller_env(monkeypatch)
    monkeypatch.delenv("RF_CALLER_TPM", raising=False)
    (tmp_path / "empty.key").write_text("\n")
    table = callers(tpm={"key": "env:RF_CALLER_TPM", "tier": "vip"},
                    filer={"key": f"file:{tmp_path / 'empty.key'}", "tier": "normal"})
    with running_mock(MockSettings(keys=mock_keys(rps=200, burst=20), accept_unknown=False)) as upstream:
        kit = FleetKit(tmp_path, nats_server.url, upstream.url, overrides={"callers": table})
        kit.dispatcher("d1")
        kit.worker("w1")
        try:
            url = start_gateway(kit)  # before: exit 2, "callers.filer.key: file ... empty"
            async with await Client.connect(nats_server.url) as client:
                await wait_for_leader(client)
            async with openai.AsyncOpenAI(base_url=url + "/v1", api_key=CALLER_KEYS["alice"], max_retries=0,
                                          timeout=30) as ai:
                chat = await ai.chat.completions.create(model="mock", messages=[{"role": "user", "content": "hi"}])
            assert chat.choices[0].message.content == "echo: hi"
            async with openai.AsyncOpenAI(base_url=url + "/v1", api_key="rk-tpm-anything", max_retries=0,
                                          timeout=30) as ai:
                with pytest.raises(openai.AuthenticationError) as refused:
                    await ai.chat.completions.create(model="mock", messages=[{"role": "user", "content": "hi"}])
            assert refused.value.status_code == 401 and refused.value.code == "invalid_api_key"
            ready = httpx.get(url + "/readyz", timeout=5, trust_env=False)
            assert ready.status_code == 200, ready.text
            assert ready.json()["callers_left_out"] == {"tpm": "RF_CALLER_TPM not set",
                                                        "filer": f"file {tmp_path / 'empty.key'} empty"}
            logs = kit.logs()
        finally:
            kit.stop()
    assert '"event": "caller left out' in logs and '"caller": "tpm"' in logs and '"caller": "filer"' in logs
    assert '"reason": "RF_CALLER_TPM not set"' in logs
    assert '"left_out": ["filer", "tpm"]' in logs  # on the `gateway listening` line
    for secret in CALLER_KEYS.values():
        assert secret not in logs


def test_the_gateway_refuses_to_start_only_when_no_caller_has_a_usable_key(tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in ("RATEFLEET_CONFIG", "RATEFLEET_NATS_URL",
                                                           "RF_CALLER_X", "RF_CALLER_Y")}
    path = tmp_path / "gw.toml"
    path.write_text(tomli_w.dumps({"callers": {"x": {"key": "env:RF_CALLER_X", "tier": "vip"},
                                               "y": {"key": f"file:{tmp_path / 'nope'}", "tier": "vip"}}}))
    done = subprocess.run([sys.executable, "-m", "ratefleet", "gateway", "--config", str(path), "--listen",
                           f"127.0.0.1:{free_port()}"], env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode == 2, done.stderr
    assert "no caller has a usable key" in done.stderr
    assert "callers.x.key: RF_CALLER_X not set" in done.stderr and "callers.y.key: file " in done.stderr
