"""A whole ratefleet on this machine, as real processes, for `ratefleet demo` and bench/.

An embedded nats-server, the mock upstream (`ratefleet mock-upstream`) with N keys, one
dispatcher and W worker processes, each `python -m ratefleet ...` with its own log file in
a temporary directory. The fleet is configured with exactly the limits the mock enforces
(unless `claimed` gives it other ones, e.g. to see it adapt to a provider that allows less
than the config says), and the keys' secrets are random and live only in the children's
environment.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import anyio
import httpx
import tomli_w

from ratefleet.client import Client
from ratefleet.runtime.embedded import EmbeddedNats, die_with_parent


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@dataclass(frozen=True)
class KeyLimit:
    id: str
    rps: float
    burst: float


def in_main_thread() -> bool:
    """Whether this is the main thread: a child armed with `die_with_parent` is sent SIGTERM
    when the thread that started it ends (prctl(2)), so a fleet started from another thread
    (a thread pool) is not armed (a reviewer saw its whole fleet end with that thread)."""
    return threading.current_thread() is threading.main_thread()


@dataclass
class LocalFleet:
    """`with LocalFleet(keys, workers=2) as fleet:` -> fleet.nats_url, fleet.upstream."""

    keys: list[KeyLimit]
    workers: int = 2
    slots: int = 32
    heartbeat_s: float = 0.5
    dispatcher: dict = field(default_factory=dict)  # extra [dispatcher] settings
    claimed: list[KeyLimit] | None = None  # the limits the fleet's config states (default: `keys`)
    keep_logs: Path | None = None
    callers: dict | None = None  # [callers]: also run `ratefleet gateway` on `gateway_url`
    tmp: Path = field(init=False)
    nats_url: str = field(init=False, default="")
    upstream: str = field(init=False, default="")
    gateway_url: str = field(init=False, default="")
    procs: list[subprocess.Popen] = field(init=False, default_factory=list)

    def __post_init__(self) -> None:
        self._tmpdir = tempfile.TemporaryDirectory(prefix="ratefleet-local-")
        self.tmp = Path(self._tmpdir.name)
        self._secrets = {f"RATEFLEET_LOCAL_{k.id.upper()}": f"sk-local-{k.id}-{os.urandom(6).hex()}" for k in self.keys}
        self._nats: EmbeddedNats | None = None

    # -- config ------------------------------------------------------------------------

    def config(self) -> dict:
        keys = [{"id": k.id, "secret": f"env:RATEFLEET_LOCAL_{k.id.upper()}", "rps": k.rps, "burst": k.burst}
                for k in (self.claimed or self.keys)]
        data = {"nats": {"url": self.nats_url},
                "upstreams": {"mock": {"base_url": self.upstream, "usage_path": "usage.total_tokens", "timeout_s": 10}},
                "pools": {"shared": {"keys": keys}},
                "workers": {"slots": self.slots, "heartbeat_s": self.heartbeat_s}}
        if self.dispatcher:
            data["dispatcher"] = dict(self.dispatcher)
        if self.callers:
            data["callers"] = self.callers
        return data

    def secret(self, key_id: str) -> str:
        """The random secret of mock key `key_id` (to call the mock directly, e.g. as a baseline)."""
        return self._secrets[f"RATEFLEET_LOCAL_{key_id.upper()}"]

    def _env(self) -> dict[str, str]:
        env = {**os.environ, **self._secrets, "RATEFLEET_LOG_LEVEL": "WARNING", "RATEFLEET_LOG_FORMAT": "json"}
        env.pop("RATEFLEET_NATS_URL", None)
        env.pop("RATEFLEET_CONFIG", None)
        return env

    # -- lifecycle ---------------------------------------------------------------------

    def __enter__(self) -> LocalFleet:
        try:
            self._start()
        except BaseException:
            self.__exit__(None, None, None)
            raise
        return self

    def _start(self) -> None:
        key_flags = [f"--key={k.id}={self._secrets[f'RATEFLEET_LOCAL_{k.id.upper()}']}:rps={k.rps:g}:burst={k.burst:g}"
                     for k in self.keys]
        # port 0: the mock binds a port the system picks and says which (no port probed here
        # and taken by another process before the mock binds it); read back once NATS is up
        self._spawn("mock-upstream", "--port", "0", *key_flags, name="mock")
        self._nats = EmbeddedNats(self.tmp / "nats", die_with_parent=in_main_thread()).start()
        self.nats_url = self._nats.url
        self.upstream = self._mock_url()
        config_path = self.tmp / "ratefleet.toml"
        config_path.write_text(tomli_w.dumps(self.config()))
        self._spawn("dispatcher", "--config", str(config_path), "--id", "d1", name="dispatcher")
        for i in range(self.workers):
            self._spawn("worker", "--config", str(config_path), "--id", f"w{i + 1}", name=f"worker{i + 1}")
        if self.callers:
            gateway_port = free_port()
            self.gateway_url = f"http://127.0.0.1:{gateway_port}"
            self._spawn("gateway", "--config", str(config_path), "--listen", f"127.0.0.1:{gateway_port}", name="gateway")

    def _mock_url(self, timeout: float = 30.0) -> str:
        """The mock's base URL from the line it prints once bound ("mock upstream listening on
        http://127.0.0.1:PORT ..."). Raises RuntimeError (with the logs) when it exits first or
        says nothing within `timeout` seconds."""
        mock = next(p for p in self.procs if p.fleet_name == "mock")  # type: ignore[attr-defined]
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            found = re.search(r"listening on (http://\S+)", (self.tmp / "mock.log").read_text(errors="replace"))
            if found:
                return found.group(1)
            if mock.poll() is not None:
                raise RuntimeError(f"the mock upstream exited with {mock.returncode}\n{self.logs()}")
            time.sleep(0.05)
        raise RuntimeError(f"the mock upstream did not say its port within {timeout:.0f} s\n{self.logs()}")

    def _spawn(self, *args: str, name: str) -> None:
        with open(self.tmp / f"{name}.log", "ab") as log:
            # (SIGTERM when this process dies, also by SIGKILL: no fleet left running without it;
            # only from the main thread: the signal follows the death of the thread that forked)
            proc = subprocess.Popen([sys.executable, "-m", "ratefleet", *args], env=self._env(),
                                    stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                                    preexec_fn=die_with_parent() if in_main_thread() else None)
        proc.fleet_name = name  # type: ignore[attr-defined]
        self.procs.append(proc)

    def logs(self) -> str:
        return "\n".join(f"== {p.name}\n{p.read_text(errors='replace')[-4000:]}" for p in sorted(self.tmp.glob("*.log")))

    def __exit__(self, *exc: object) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + 10
        for proc in self.procs:
            try:
                proc.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        if self._nats is not None:
            self._nats.stop()
        if self.keep_logs is not None:
            self.keep_logs.mkdir(parents=True, exist_ok=True)
            for log in self.tmp.glob("*.log"):
                shutil.copy(log, self.keep_logs / log.name)
        self._tmpdir.cleanup()

    # -- readiness ---------------------------------------------------------------------

    async def wait_ready(self, client: Client, timeout: float = 30.0) -> dict:
        """Until the mock answers and a leader reports every worker."""
        deadline = time.monotonic() + timeout
        last: object = None
        async with httpx.AsyncClient(trust_env=False) as http:
            while time.monotonic() < deadline:
                dead = [p.fleet_name for p in self.procs if p.poll() is not None]  # type: ignore[attr-defined]
                if dead:
                    raise RuntimeError(f"fleet process(es) exited early: {dead}\n{self.logs()}")
                try:
                    (await http.get(self.upstream + "/_mock/stats")).raise_for_status()
                    status = await client.status(timeout=1.0)
                    if status.get("leader") and len(status.get("workers") or []) >= self.workers:
                        return status
                    last = status
                except Exception as exc:  # noqa: BLE001 - still starting
                    last = exc
                await anyio.sleep(0.2)
        raise RuntimeError(f"the local fleet did not come up within {timeout:.0f} s (last: {last})\n{self.logs()}")
