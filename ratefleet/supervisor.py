"""`ratefleet up`: embedded NATS when none answers, then dispatcher and worker processes.

Children that die are restarted (with a short backoff), and so is the embedded nats-server
(same port, same store: the children reconnect by themselves). Ctrl-C or SIGTERM stops the
workers first (they drain), then the dispatchers (they release the lease), then NATS.
SIGHUP is logged and ignored (children ignore it as well): with `--config FILE` a child
(`ratefleet config watch`) pushes the file on every change, and the fleet applies it live.

Each dispatcher and worker gets its own `--http` port for /metrics, /healthz and /readyz:
from `http_base_port` upwards, skipping ports something else listens on (0: any free
port); the list is printed at start, and a restarted child keeps its port. The gateway
serves its probes on its own `[gateway].listen`.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import anyio

from ratefleet.runtime.connect import connect, redact_url
from ratefleet.runtime.embedded import EmbeddedNats, die_with_parent, embedded_for, port_answers
from ratefleet.runtime.logs import get_logger
from ratefleet.schemas import Config
from ratefleet.schemas.errors import ConfigError, NatsRefused, NatsUnavailable

log = get_logger("ratefleet.up")


@dataclass
class Child:
    role: str
    args: list[str]
    process: subprocess.Popen | None = None
    restarts: int = 0
    http: str | None = None  # HOST:PORT of its probes

    def start(self, env: dict[str, str]) -> None:
        http = ["--http", self.http] if self.http else []
        # SIGTERM when `up` dies, also by SIGKILL: no fleet left running without its supervisor
        self.process = subprocess.Popen([sys.executable, "-m", "ratefleet", *self.args, *http], env=env,
                                        preexec_fn=die_with_parent())


def _port_free(host: str, port: int) -> bool:
    """Whether a child could listen on host:port: bound as the child binds it (SO_REUSEADDR,
    runtime/probes.py `bind_listener`), so the connections a killed child left in TIME-WAIT do
    not make its port look taken (an operations trial: a worker SIGKILLed while Prometheus held a
    keep-alive connection came back on a random port, 3 of 3 times); a port another socket
    listens on still is (Linux refuses that bind with or without SO_REUSEADDR)."""
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError:
            return False
    return True


def assign_http(children: list[Child], host: str, base_port: int) -> None:
    """Give each dispatcher and worker its own probe address on `host`: the free ports from
    `base_port` upwards (0: a free port the system picks). Raises OSError when none is left."""
    port = base_port
    for child in children:
        if child.role not in ("dispatcher", "worker"):  # the gateway serves on its listen; config-watch has none
            continue
        if base_port == 0:
            with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as sock:
                sock.bind((host, 0))
                chosen = sock.getsockname()[1]
        else:
            while port < 65536 and not _port_free(host, port):
                port += 1
            if port >= 65536:
                raise OSError(f"no free port from {base_port} upwards on {host}")
            chosen, port = port, port + 1
        child.http = f"[{host}]:{chosen}" if ":" in host else f"{host}:{chosen}"


def _keep_http_free(child: Child) -> None:
    """Before a restart: a probe port taken meanwhile (the child may have died of it) is
    replaced by a free one, printed like the first ones."""
    if not child.http:
        return
    host, _, port = child.http.rpartition(":")
    host = host.strip("[]")
    if not _port_free(host, int(port)):
        assign_http([child], host, 0)
        print(f"{child.role} restarted: http://{child.http}/metrics  /healthz  /readyz", flush=True)


def print_addresses(children: list[Child], gateway_listen: str | None) -> None:
    """One line per process: its role, number and probe URL (stdout)."""
    counts: dict[str, int] = {}
    for child in children:
        counts[child.role] = counts.get(child.role, 0) + 1
        address = child.http if child.role != "gateway" else gateway_listen
        if address:
            print(f"{child.role} {counts[child.role]}: http://{address}/metrics  /healthz  /readyz", flush=True)


def _children(config_path: Path | None, workers: int, dispatchers: int, gateway: bool = False) -> list[Child]:
    conf = ["--config", str(config_path)] if config_path else []
    # the file is pushed as the fleet's config revision now and on every change (config_watch.py)
    watcher = [Child("config-watch", ["config", "watch", str(config_path)])] if config_path else []
    return (watcher + [Child("dispatcher", ["dispatcher", *conf]) for _ in range(dispatchers)]
            + [Child("worker", ["worker", *conf]) for _ in range(workers)]
            + ([Child("gateway", ["gateway", *conf])] if gateway else []))


def unusable_secrets(config: Config) -> str | None:
    """One line saying what to set when no key of `config` has a usable secret in this
    environment (which the workers inherit), else None. Never shows a value."""
    from ratefleet.workers.secrets import SecretResolver

    keys = config.keys()
    problems = SecretResolver(config).check_all()
    if not keys or len(problems) < len(keys):
        return None
    listed = ", ".join(f"{key_id} ({reason})" for key_id, reason in problems.items())
    return (f"no key of the config has a usable secret: {listed}; set these environment variables or secret "
            "files for `ratefleet up`, or fix the keys' `secret` in the config")


def gateway_start_problem(config: Config) -> str | None:
    """What would keep `up --gateway`'s gateway from starting, else None: no caller with a
    usable key here (or two sharing one), or `[gateway] listen` (RATEFLEET_GATEWAY_LISTEN over
    it) that cannot be listened on, e.g. a port in use. Said once at start: the gateway itself
    would exit 2 and be restarted again and again."""
    from ratefleet.gateway.callers import CallerTable
    from ratefleet.runtime.probes import bind_listener
    from ratefleet.schemas.config_env import EnvOverrides

    try:
        CallerTable.from_config(config)  # the gateway child inherits this environment
    except ConfigError as exc:
        return str(exc)
    listen = config.gateway.listen
    host, _, port = listen.rpartition(":")  # the config checked the form
    name = "RATEFLEET_GATEWAY_LISTEN=" if EnvOverrides().gateway_listen else "[gateway] listen "
    try:
        bind_listener(host.strip("[]"), int(port), f"{name}{listen}",
                      instead="set another [gateway] listen (or RATEFLEET_GATEWAY_LISTEN), or leave out --gateway").close()
    except ConfigError as exc:
        return str(exc)
    return None


def credentials_refused(url: str, config: Config) -> str | None:
    """Why the NATS server at `url` refuses the config's `[nats]` credentials or TLS (the
    NatsRefused message, no credential in it), else None (connected, or it cannot say now:
    the children wait for it as usual). An operations trial: `up` with a wrong password
    restarted every child every few seconds, 15 restarts in 40 s, and never exited."""
    async def attempt() -> str | None:
        try:
            nc = await connect(url, name="ratefleet-up", forever=False, auth=config.nats)
        except NatsRefused as exc:
            return str(exc)
        except (NatsUnavailable, ConfigError):
            return None
        await nc.close()
        return None

    return anyio.run(attempt)


def run_fleet(config: Config, *, config_path: Path | None, workers: int, dispatchers: int,
              gateway: bool = False, http_host: str | None = "127.0.0.1", http_base_port: int = 9464) -> int:
    """Run the fleet until Ctrl-C/SIGTERM; the exit code. `http_host` None: no probes."""
    if workers > 0:
        problem = unusable_secrets(config)
        if problem is not None:
            print(f"error: {problem}", file=sys.stderr)
            return 2
    if gateway and (problem := gateway_start_problem(config)) is not None:
        print(f"error: {problem}", file=sys.stderr)  # not a gateway restarted every few seconds, forever
        return 2
    embedded: EmbeddedNats | None = None
    url = config.nats.url
    if not port_answers(url) and (config.nats.has_credentials or "@" in url):
        # an embedded server is open to anyone: never start one in place of a secured NATS
        print(f"error: nothing answers at {redact_url(url)}, and with NATS credentials or TLS configured "
              "`ratefleet up` does not start an open embedded server; start your nats-server", file=sys.stderr)
        return 2
    if not port_answers(url):
        embedded = embedded_for(url, config.nats.embedded_dir)
        embedded.die_with_parent = True  # SIGKILL of `up` must not leave an orphaned server behind
        embedded.start()
        url = embedded.url
        log.info("started embedded nats-server", url=url, store=str(embedded.store_dir.resolve()))
    else:  # said plainly: whatever fleet runs there gets these processes, and this file as its live config
        if (refusal := credentials_refused(url, config)) is not None:
            print(f"error: {refusal}", file=sys.stderr)  # not every child restarted every few seconds, forever
            return 2
        print(f"a NATS server already answers at {redact_url(url)}: joining it (no embedded server is started: "
              "this fleet runs while that server does, and waits for it when it stops, e.g. with the `ratefleet up` "
              "that embeds it); "
              f"this fleet's config file {config_path or '(none)'} becomes the live config of every ratefleet "
              "process there (`ratefleet config show` shows what runs now); for a fleet of its own, stop this "
              "(Ctrl-C) and pass --nats nats://127.0.0.1:PORT with a free PORT: an embedded server starts there",
              file=sys.stderr)
    env = {**os.environ, "RATEFLEET_NATS_URL": url}
    children = _children(config_path, workers, dispatchers, gateway)
    if http_host:
        try:
            assign_http(children, http_host, http_base_port)
        except OSError as exc:
            print(f"error: --http-host {http_host} --http-base-port {http_base_port}: {exc}", file=sys.stderr)
            return 2
    stopping = False
    hangups = 0
    hangups_total = 0
    nats_restarts = 0

    def on_signal(signum, _frame):
        nonlocal stopping, hangups
        if signum == signal.SIGHUP:
            hangups += 1  # logged from the loop: a handler must not take the log lock
        else:
            stopping = True

    previous = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)}
    try:
        for child in children:
            child.start(env)
        log.info("fleet up", nats=redact_url(url), dispatchers=dispatchers, workers=workers,
                 gateway=config.gateway.listen if gateway else None)
        print_addresses(children, config.gateway.listen if gateway else None)
        while not stopping:
            time.sleep(0.2)
            if hangups:
                hangups_total += hangups
                log.info("SIGHUP ignored: edits of the config file are pushed and applied live (`ratefleet config push`)",
                         count=hangups_total)
                hangups = 0
            if embedded is not None and not stopping:
                nats_restarts = _keep_nats_up(embedded, nats_restarts, lambda: stopping)
            for child in children:
                if child.process and child.process.poll() is not None and not stopping:
                    log.warning("child exited; restarting", role=child.role, code=child.process.returncode)
                    time.sleep(_restart_pause(child.restarts))
                    child.restarts += 1
                    _keep_http_free(child)
                    child.start(env)
    finally:
        _stop_all(children, config.workers.grace_s)
        for s, handler in previous.items():
            signal.signal(s, handler)
        if embedded is not None:
            embedded.stop()
    return 0


def _restart_pause(restarts: int) -> float:
    """Seconds to wait before restarting a process that died `restarts` times already:
    0.5 s doubling, at most 5 s."""
    return min(5.0, 0.5 * 2 ** min(restarts, 4))


def _keep_nats_up(embedded: EmbeddedNats, restarts: int, stopping: Callable[[], bool] = lambda: False) -> int:
    """Start the embedded nats-server again when it has exited (killed, crashed), on its port
    and store, so the fleet's processes reconnect and carry on; returns the restart count (a
    failed start is tried again on the next call, after a growing pause). Before, a killed
    server stayed down while `up` ran on: every process waited, and the gateway answered 503.
    `stopping()` true (`up` told to stop) ends a start still waiting for the server."""
    if embedded.process is None or embedded.process.poll() is None:
        return restarts
    log.warning("embedded nats-server exited; restarting it on its port and store", code=embedded.process.returncode,
                url=embedded.url)
    time.sleep(_restart_pause(restarts))
    try:
        embedded.start(interrupted=stopping)
        log.info("embedded nats-server restarted", url=embedded.url)
    except NatsUnavailable as exc:
        log.error("embedded nats-server did not start again; trying again", error=str(exc))
    return restarts + 1


def _stop_all(children: list[Child], grace_s: float) -> None:
    for role in ("config-watch", "gateway", "worker", "dispatcher"):  # the front door first: no new jobs while draining
        group = [c.process for c in children if c.role == role and c.process and c.process.poll() is None]
        for process in group:
            process.send_signal(signal.SIGTERM)
        # grace_s for calls, then up to 10 s (workers/service.py FINISH_BOUND_S) to store paid answers
        deadline = time.monotonic() + grace_s + 15
        for process in group:
            try:
                process.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
