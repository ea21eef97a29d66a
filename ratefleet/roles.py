"""Running one role as a process: connect, handle SIGTERM/SIGINT, run until stopped.

SIGHUP is ignored with a log line: a new config is applied live from the config bucket
(`ratefleet config push`; runtime/config_kv.py), not on a signal; and a closed terminal must
not kill a dispatcher or a worker mid-call.
"""

from __future__ import annotations

import signal
from collections.abc import Awaitable, Callable

import anyio

from ratefleet.runtime.config_kv import startup_config
from ratefleet.runtime.connect import connect
from ratefleet.runtime.logs import get_logger
from ratefleet.runtime.streams import ensure_topology
from ratefleet.schemas import Config, Subjects

log = get_logger("ratefleet.role")


async def _stop_on_signals(stop: anyio.Event) -> None:
    with anyio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
        async for signum in signals:
            log.info("stopping", signal=signal.Signals(signum).name)
            stop.set()
            return


def log_and_ignore_sighup() -> None:
    """Ignore SIGHUP from process start on (the role logs each one once its loop runs)."""
    signal.signal(signal.SIGHUP, signal.SIG_IGN)


async def _log_sighup() -> None:
    with anyio.open_signal_receiver(signal.SIGHUP) as signals:
        async for _signum in signals:
            log.info("SIGHUP ignored: push a new config with `ratefleet config push FILE`; it is applied live")


async def run_role(config: Config, name: str, body: Callable[[object, anyio.Event], Awaitable[None]]) -> None:
    nc = await connect(config.nats.url, name=name)
    stop = anyio.Event()
    try:
        async with anyio.create_task_group() as tg:
            tg.start_soon(_stop_on_signals, stop)
            tg.start_soon(_log_sighup)
            await body(nc, stop)
            tg.cancel_scope.cancel()
    finally:
        signal.signal(signal.SIGHUP, signal.SIG_IGN)  # the receiver put back the default (terminate)
        with anyio.CancelScope(shield=True):
            await nc.drain()


async def dispatcher_main(config: Config, dispatcher_id: str | None = None) -> None:
    from ratefleet.dispatcher.shell.service import Dispatcher

    async def body(nc, stop):
        fleet, revision = await startup_config(nc.jetstream(), Subjects(config.nats.prefix), config)
        await Dispatcher(fleet, nc, dispatcher_id=dispatcher_id, config_revision=revision).run(stop)

    await run_role(config, "ratefleet-dispatcher", body)


async def worker_main(config: Config, slots: int | None = None, worker_id: str | None = None) -> None:
    from ratefleet.workers.service import Worker

    async def body(nc, stop):
        fleet, revision = await startup_config(nc.jetstream(), Subjects(config.nats.prefix), config)
        await ensure_topology(nc.jetstream(), fleet)
        await Worker(fleet, nc, slots=slots, worker_id=worker_id, config_revision=revision).run(stop)

    await run_role(config, "ratefleet-worker", body)
