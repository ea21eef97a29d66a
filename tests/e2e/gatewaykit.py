"""A fleet with a gateway in front, as real processes: nats-server, the mock upstream, one
dispatcher, one worker and `python -m ratefleet gateway`, for the gateway's SDK tests."""

from __future__ import annotations

import socket
import time

import httpx
from fleetkit import FleetKit

CALLER_KEYS = {"alice": "rk-alice-0123456789abcdef", "bob": "rk-bob-0123456789abcdef",
               "carol": "rk-carol-0123456789abcdef"}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def callers(**overrides: dict) -> dict:
    """[callers]: alice (vip, two models), bob (guest, 1 request per 5 s), carol (normal, 400 tokens/min)."""
    table = {"alice": {"key": "env:RF_CALLER_ALICE", "tier": "vip", "models": ["mock", "mock-embedding"]},
             "bob": {"key": "env:RF_CALLER_BOB", "tier": "guest", "rps": 0.2, "burst": 1},
             "carol": {"key": "env:RF_CALLER_CAROL", "tier": "normal", "tokens_per_minute": 400}}
    for name, values in overrides.items():
        table[name] = {**table.get(name, {}), **values}
    return table


def caller_env(monkeypatch) -> None:
    for name, key in CALLER_KEYS.items():
        monkeypatch.setenv(f"RF_CALLER_{name.upper()}", key)


def start_gateway(kit: FleetKit, port: int, timeout: float = 30.0, name: str = "gateway") -> str:
    """Spawn a gateway process `name` on 127.0.0.1:`port`; its base URL once /healthz answers."""
    proc = kit.spawn("gateway", "--listen", f"127.0.0.1:{port}", name=name)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"the gateway exited with {proc.returncode}:\n{kit.logs()[-3000:]}")
        try:
            if httpx.get(url + "/healthz", timeout=1.0, trust_env=False).status_code == 200:
                return url
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    raise AssertionError(f"the gateway did not answer within {timeout}s:\n{kit.logs()[-3000:]}")
