"""Running one role as a process: connect, handle SIGTERM/SIGINT, run until stopped."""

from __future__ import annotations

import signal
from collections.abc import Awaitable, Callable

import anyio

from ratefleet.runtime.connect import connect
from ratefleet.runtime.logs import get_logger
from ratefleet.runtime.streams import ensure_topology
from schemas import Config

log = get_logger("ratefleet.role")


async def _stop_on_signals(stop: anyio.Event) -> None:
    with anyio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
        async for signum in signals:
            log.info("stopping", signal=signal.Signals(signum).name)
            stop.set()
            return


async def run_role(config: Config, name: str, body: Callable[[object, anyio.Event], Awaitable[None]]) -> None:
    nc = await connect(config.nats.url, name=name)
    stop = anyio.Event()
    try:
        async with anyio.create_task_group() as tg:
            tg.start_soon(_stop_on_signals, stop)
            await body(nc, stop)
            tg.cancel_scope.cancel()
    finally:
        with anyio.CancelScope(shield=True):
            await nc.drain()


async def dispatcher_main(config: Config, dispatcher_id: str | None = None) -> None:
    from dispatcher.shell.service import Dispatcher

    async def body(nc, stop):
        await Dispatcher(config, nc, dispatcher_id=dispatcher_id).run(stop)

    await run_role(config, "ratefleet-dispatcher", body)


async def worker_main(config: Config, slots: int | None = None, worker_id: str | None = None) -> None:
    from workers.service import Worker

    async def body(nc, stop):
        await ensure_topology(nc.jetstream(), config)
        await Worker(config, nc, slots=slots, worker_id=worker_id).run(stop)

    await run_role(config, "ratefleet-worker", body)
