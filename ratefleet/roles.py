"""Running one role as a process: connect, handle SIGTERM/SIGINT, run until stopped.

With `--http HOST:PORT` the role serves /metrics, /healthz and /readyz (runtime/probes.py)
from before it connects to NATS (/readyz says 503 "not connected to NATS yet" until then).

SIGHUP is ignored with a log line: a new config is applied live from the config bucket
(`ratefleet config push`; runtime/config_kv.py), not on a signal; and a closed terminal must
not kill a dispatcher or a worker mid-call.
"""

from __future__ import annotations

import contextlib
import signal
from collections.abc import Awaitable, Callable

import anyio

from ratefleet.runtime.config_kv import startup_config
from ratefleet.runtime.connect import connect
from ratefleet.runtime.flusher import coalesce_writes
from ratefleet.runtime.gctune import imports_without_gc, quiet_gc
from ratefleet.runtime.logs import get_logger
from ratefleet.runtime.probes import Probes, serve_probes, streams_check
from ratefleet.runtime.streams import ensure_topology
from ratefleet.runtime.tracing_setup import setup_tracing
from ratefleet.schemas import Config, Subjects

log = get_logger("ratefleet.role")


async def _stop_on_signals(stop: anyio.Event) -> None:
    """The first SIGTERM/SIGINT sets `stop`; later ones are logged and change nothing, for
    as long as the role runs (its drain included). A Ctrl-C in a terminal reaches every
    process of `ratefleet up` and the supervisor then sends each child SIGTERM: a second
    signal must not kill a worker that is finishing paid calls (its jobs would be called
    again). SIGKILL still stops a process at once."""
    with anyio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
        async for signum in signals:
            name = signal.Signals(signum).name
            if stop.is_set():
                log.info("already stopping; this signal does not cut the drain short (SIGKILL does, and the "
                         "jobs in flight are then called again)", signal=name)
                continue
            log.info("stopping", signal=name)
            stop.set()


def log_and_ignore_sighup() -> None:
    """Ignore SIGHUP from process start on (the role logs each one once its loop runs)."""
    signal.signal(signal.SIGHUP, signal.SIG_IGN)


async def _log_sighup() -> None:
    with anyio.open_signal_receiver(signal.SIGHUP) as signals:
        async for _signum in signals:
            log.info("SIGHUP ignored: push a new config with `ratefleet config push FILE`; it is applied live")


async def run_role(config: Config, name: str, body: Callable[[object, anyio.Event], Awaitable[None]],
                   *, probes: Probes | None = None, http: str | None = None) -> None:
    """Connect, run `body(nc, stop)` until SIGTERM/SIGINT sets `stop`, drain. With `http`,
    `probes` are served there (from before the connection; `probes.url` is set) and learn
    the connection once it is up. Spans are exported while it runs when tracing is on
    (runtime/tracing_setup.py), and flushed at the end."""
    stop_tracing = setup_tracing(config.tracing, name.removeprefix("ratefleet-"))
    try:
        await _run_probed(config, name, body, probes=probes, http=http)
    finally:
        if stop_tracing is not None:
            stop_tracing()


async def _run_probed(config: Config, name: str, body: Callable[[object, anyio.Event], Awaitable[None]],
                      *, probes: Probes | None, http: str | None) -> None:
    async with anyio.create_task_group() as served:
        if http:
            probes = probes or Probes()
            probes.url = await served.start(serve_probes, probes, http)
        nc = await connect(config.nats.url, name=name, auth=config.nats)
        if probes is not None:  # served here (`http`) or by the role's own app (the gateway)
            probes.nc = nc
            probes.checks.insert(0, streams_check(nc.jetstream(), Subjects(config.nats.prefix)))
        try:
            await _run_body(nc, body)
        finally:
            served.cancel_scope.cancel()


async def _run_body(nc, body: Callable[[object, anyio.Event], Awaitable[None]]) -> None:
    stop = anyio.Event()
    try:
        async with anyio.create_task_group() as tg:
            tg.start_soon(_stop_on_signals, stop)
            tg.start_soon(_log_sighup)
            try:
                await body(nc, stop)
            finally:  # still under the signal receivers: a late SIGTERM/SIGINT is logged, not fatal
                with anyio.CancelScope(shield=True):
                    await _drain(nc)
            tg.cancel_scope.cancel()
    finally:
        signal.signal(signal.SIGHUP, signal.SIG_IGN)  # the receiver put back the default (terminate)


async def _drain(nc) -> None:
    """Drain the connection at the end; with NATS away (nats-py raises ConnectionReconnectingError
    while it reconnects) there is nothing to flush: log it and close, so a role stopped as asked
    exits 0 (it exited 1 with "NATS did not answer", an operator's trial). What it held and
    could not finish comes back after ack_wait."""
    try:
        await nc.drain()
    except Exception as exc:  # noqa: BLE001 - see docstring; a failure of the role itself still propagates
        log.warning("NATS is away at the stop: nothing drained; unfinished jobs come back after ack_wait",
                    error=type(exc).__name__)
        with contextlib.suppress(Exception):
            await nc.close()


async def dispatcher_main(config: Config, dispatcher_id: str | None = None, http: str | None = None) -> None:
    """The `ratefleet dispatcher` process (`http`: HOST:PORT of its probes, or None)."""
    with imports_without_gc():
        from ratefleet.dispatcher.shell.service import Dispatcher

    probes = Probes()

    async def body(nc, stop):
        await coalesce_writes(nc)  # an assignment per job, spread over loop iterations: fewer socket writes
        fleet, revision = await startup_config(nc.jetstream(), Subjects(config.nats.prefix), config)
        dispatcher = Dispatcher(fleet, nc, dispatcher_id=dispatcher_id, registry=probes.registry, http=probes.url,
                                config_revision=revision)
        probes.checks.append(dispatcher.not_ready)
        quiet_gc()  # started: what it holds now lives as long as the process (runtime/gctune.py)
        await dispatcher.run(stop)

    await run_role(config, "ratefleet-dispatcher", body, probes=probes, http=http)


async def worker_main(config: Config, slots: int | None = None, worker_id: str | None = None,
                      http: str | None = None) -> None:
    """The `ratefleet worker` process (`http`: HOST:PORT of its probes, or None)."""
    with imports_without_gc():
        from ratefleet.workers.service import Worker

    probes = Probes()

    async def body(nc, stop):
        await coalesce_writes(nc)  # a Result, an ack and a report per job: fewer socket writes
        fleet, revision = await startup_config(nc.jetstream(), Subjects(config.nats.prefix), config)
        await ensure_topology(nc.jetstream(), fleet)
        worker = Worker(fleet, nc, slots=slots, worker_id=worker_id, registry=probes.registry, http=probes.url,
                        config_revision=revision)
        probes.checks.append(worker.not_ready)
        quiet_gc()  # started: what it holds now lives as long as the process (runtime/gctune.py)
        await worker.run(stop)

    await run_role(config, "ratefleet-worker", body, probes=probes, http=http)
