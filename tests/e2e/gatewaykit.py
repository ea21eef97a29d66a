"""A fleet with a gateway in front, as real processes: nats-server, the mock upstream, one
dispatcher, one worker and `python -m ratefleet gateway`, for the gateway's SDK tests."""

from __future__ import annotations

import socket
import time
from collections.abc import Iterator
from contextlib import contextmanager

import httpx
import openai
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


def start_gateway(kit: FleetKit, port: int | None = None, timeout: float = 30.0, name: str = "gateway") -> str:
    """Spawn a gateway process `name` on 127.0.0.1:`port`; its base URL once /healthz answers.

    With no `port`, a free one, and another one (up to 5 tries) when the gateway exits because
    the port was taken between `free_port()` closing its probe socket and the gateway binding it
    (other test processes pick free ports at the same time). A given `port` is kept: the caller
    needs that one (a restart on the same URL).

    Raises AssertionError (with the fleet's logs) when the gateway exits or does not answer within
    `timeout` seconds."""
    for _ in range(5 if port is None else 1):
        chosen = free_port() if port is None else port
        log = kit.tmp / f"{name}.log"
        start = log.stat().st_size if log.exists() else 0
        proc = kit.spawn("gateway", "--listen", f"127.0.0.1:{chosen}", name=name)
        url = f"http://127.0.0.1:{chosen}"
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                with open(log, "rb") as f:
                    f.seek(start)
                    said = f.read().decode(errors="replace")
                if port is None and "Address already in use" in said:
                    break  # taken meanwhile: another free port
                raise AssertionError(f"the gateway exited with {proc.returncode}:\n{kit.logs()[-3000:]}")
            try:
                if httpx.get(url + "/healthz", timeout=1.0, trust_env=False).status_code == 200:
                    return url
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        else:
            raise AssertionError(f"the gateway did not answer within {timeout}s:\n{kit.logs()[-3000:]}")
    raise AssertionError(f"five free ports in a row were taken before the gateway bound them:\n{kit.logs()[-3000:]}")


@contextmanager
def fleet_with_gateway(kit: FleetKit) -> Iterator[FleetKit]:
    """`kit` with a dispatcher d1, a worker w1 and a gateway on a free port (`kit.gateway_url`),
    stopped on the way out."""
    kit.dispatcher("d1")
    kit.worker("w1")
    try:
        kit.gateway_url = start_gateway(kit)  # type: ignore[attr-defined]
        yield kit
    finally:
        kit.stop()


def sdk(kit: FleetKit, caller: str = "alice", key: str | None = None) -> openai.AsyncOpenAI:
    """The official SDK against `kit`'s gateway as `caller` (or with `key`): no retries, 30 s."""
    return openai.AsyncOpenAI(base_url=kit.gateway_url + "/v1", api_key=key or CALLER_KEYS[caller],  # type: ignore[attr-defined]
                              max_retries=0, timeout=30)
