"""Real processes for end-to-end tests: a config file, dispatchers and workers as
`python -m ratefleet ...` children (so SIGKILL is a real crash), logs kept per process."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import tomli_w

SECRETS = {"k1": "sk-test-AAAAAAAAAAAA1111", "k2": "sk-test-BBBBBBBBBBBB2222",
           "k3": "sk-test-CCCCCCCCCCCC3333", "k4": "sk-test-DDDDDDDDDDDD4444"}


def mock_keys(rps: float = 50, burst: float = 5, ids=("k1", "k2"), **extra):
    from ratefleet.mock import MockKey

    return tuple(MockKey(id=k, secret=SECRETS[k], rps=rps, burst=burst, **extra) for k in ids)


@dataclass
class FleetKit:
    tmp: Path
    nats_url: str
    upstream_url: str
    keys: list[dict] = field(default_factory=lambda: [{"id": "k1", "rps": 50, "burst": 5}, {"id": "k2", "rps": 50, "burst": 5}])
    overrides: dict = field(default_factory=dict)
    processes: list[subprocess.Popen] = field(default_factory=list)
    config_path: Path | None = None

    def config(self) -> dict:
        keys = [{**k, "secret": f"env:RF_TEST_{k['id'].upper()}"} for k in self.keys]
        data = {
            "nats": {"url": self.nats_url},
            "upstreams": {"mock": {"base_url": self.upstream_url, "timeout_s": 10, "usage_path": "usage.total_tokens"}},
            "pools": {"shared": {"keys": keys}},
            "workers": {"slots": 16, "heartbeat_s": 0.5, "grace_s": 5},
            "dispatcher": {"lease_ttl_s": 2.0, "worker_timeout_s": 2.0},
            "streams": {"ack_wait_s": 10},
        }
        for section, values in self.overrides.items():
            data[section] = {**data.get(section, {}), **values} if isinstance(values, dict) else values
        return data

    def write_config(self) -> Path:
        self.config_path = self.tmp / "ratefleet.toml"
        self.config_path.write_text(tomli_w.dumps(self.config()))
        return self.config_path

    def env(self) -> dict[str, str]:
        env = {**os.environ, "RATEFLEET_LOG_FORMAT": "json", "RATEFLEET_LOG_LEVEL": "INFO"}
        env.pop("RATEFLEET_NATS_URL", None)
        env.update({f"RF_TEST_{k.upper()}": v for k, v in SECRETS.items()})
        return env

    def spawn(self, *args: str, name: str) -> subprocess.Popen:
        if self.config_path is None:
            self.write_config()
        log = open(self.tmp / f"{name}.log", "ab")
        proc = subprocess.Popen([sys.executable, "-m", "ratefleet", *args, "--config", str(self.config_path)],
                                stdout=log, stderr=subprocess.STDOUT, env=self.env(), start_new_session=True)
        log.close()
        proc.name = name  # type: ignore[attr-defined]
        self.processes.append(proc)
        return proc

    def dispatcher(self, name: str = "d1") -> subprocess.Popen:
        return self.spawn("dispatcher", "--id", name, name=name)

    def worker(self, name: str = "w1", slots: int | None = None) -> subprocess.Popen:
        extra = ["--slots", str(slots)] if slots else []
        return self.spawn("worker", "--id", name, *extra, name=name)

    def logs(self) -> str:
        return "\n".join(p.read_text(errors="replace") for p in self.tmp.glob("*.log"))

    def stop(self) -> None:
        for proc in self.processes:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + 15
        for proc in self.processes:
            try:
                proc.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


async def wait_for_leader(client, timeout: float = 20.0) -> dict:
    """Until a leader answers status with at least one worker."""
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        try:
            last = await client.status(timeout=1.0)
            if last.get("leader") and last.get("workers"):
                return last
        except Exception as exc:  # noqa: BLE001 - not up yet
            last = exc
        await asyncio.sleep(0.2)
    raise AssertionError(f"no leader with workers within {timeout}s: {last}")


async def collect(client, batch: str | None, count: int, timeout: float = 60.0) -> dict[str, object]:
    """Results of a batch by job id, until `count` distinct ids or the timeout."""
    results: dict[str, object] = {}

    async def follow():
        async for result in client.results(batch, follow=True):
            results.setdefault(result.job_id, result)
            if len(results) >= count:
                return

    try:
        await asyncio.wait_for(follow(), timeout)
    except TimeoutError:
        pass
    return results


def chat_job(i: int, **extra) -> dict:
    return {"request": {"method": "POST", "path": "/v1/chat/completions",
                        "json": {"model": "m", "messages": [{"role": "user", "content": f"hello {i}"}]}}, **extra}
