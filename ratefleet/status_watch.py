"""`ratefleet status --watch`: the fleet's status as a live view (rich), refreshed in place
every `--interval` seconds until Ctrl-C (exit 0).

Each frame: the leader, the dispatcher that answered and the config revision; tiers
(queued: in the stream plus in the leader's window; in flight; done/s); keys (effective / configured req/s, tokens, in
flight, state and why); workers. done/s is the rate at which a tier's dispatched calls
finished between two answers (`dispatched - in_flight` of the leader's view; a new leader
counts from zero, so the frame after a failover shows "-"). On a terminal the view
redraws in place; when output is not a terminal (a pipe, a log) each frame is printed
below the last. `--json` stays the machine interface; this view's layout may change.
"""

from __future__ import annotations

import signal
import time
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from typing import Any

import anyio
from rich.console import Console, Group
from rich.live import Live
from rich.table import Table
from rich.text import Text

from ratefleet.status_view import _cell, _rate, key_state, token_budget

Fetch = Callable[[], Awaitable[dict]]


class DoneRates:
    """done/s per tier from successive status answers (`at`: the answer's epoch seconds)."""

    def __init__(self) -> None:
        self._last: tuple[float, dict[str, int]] | None = None

    def update(self, answer: dict) -> dict[str, float | None]:
        """Rates (jobs/s) since the previous answer; None for a tier without one, or whose
        count went down (a new leader started counting from zero)."""
        at = answer.get("at") or time.time()
        done = {name: finished(t) for name, t in (answer.get("tiers") or {}).items()}
        last, self._last = self._last, (at, {k: v for k, v in done.items() if v is not None})
        if last is None or at <= last[0]:
            return dict.fromkeys(done)
        elapsed = at - last[0]
        return {name: (count - last[1][name]) / elapsed
                if count is not None and name in last[1] and count >= last[1][name] else None
                for name, count in done.items()}


def finished(tier: dict) -> int | None:
    """Calls of a tier the leader has seen finish: dispatched less those still in flight."""
    dispatched, in_flight = tier.get("dispatched"), tier.get("in_flight")
    if dispatched is None or in_flight is None:
        return None
    return max(0, dispatched - in_flight)


def waiting(tier: dict) -> int | None:
    """Jobs of a tier waiting for a call: still in the stream plus held in the leader's window."""
    queued, pending = tier.get("queued"), tier.get("pending")
    if queued is None and pending is None:
        return None
    return (queued or 0) + (pending or 0)


def config_revision(answer: dict) -> str:
    """The config revision the status names ("-" when it names none)."""
    for value in (answer.get("config_revision"), answer.get("revision"), (answer.get("config") or {}).get("revision")):
        if value is not None:
            return str(value)
    return "-"


def render_watch(answer: dict, rates: dict[str, float | None], interval: float) -> Group:
    """One frame of the live view."""
    silent = answer.get("silent_lease_holder")
    leader = answer.get("leader") or (f"none answering (lease held by {silent}, silent)" if silent
                                      else "none (no dispatcher holds the lease)")
    at = datetime.fromtimestamp(answer.get("at") or time.time(), UTC).strftime("%H:%M:%S")
    head = Text.assemble(("leader ", "bold"), str(leader), ("   config revision ", "bold"), config_revision(answer),
                         ("   answered by ", "bold"), _cell(answer.get("dispatcher")),
                         f"   {at} UTC, every {interval:g} s, Ctrl-C to stop")
    tiers = Table("tier", "queued", "in flight", "done/s", "of the queued: in the window", title="tiers",
                  title_justify="left")
    for name, t in (answer.get("tiers") or {}).items():
        rate = rates.get(name)
        tiers.add_row(name, _cell(waiting(t)), _cell(t.get("in_flight")), "-" if rate is None else f"{rate:.1f}",
                      _cell(t.get("pending")))
    keys = Table("key", "req/s effective / configured", "req tokens", "token budget left / per min", "in flight",
                 "state", title="keys", title_justify="left")
    for key_id, k in (answer.get("keys") or {}).items():
        keys.add_row(key_id, _rate(k), _cell(k.get("tokens")), token_budget(k),
                     f"{_cell(k.get('in_flight'))}/{k.get('concurrency') or '∞'}", key_state(k, key_id))
    workers = Table("worker", "slots", "in flight", "calls", "seen s ago", "config rev", "state", title="workers",
                    title_justify="left")
    for w in answer.get("workers") or []:
        workers.add_row(_cell(w.get("id")), _cell(w.get("slots")), _cell(w.get("in_flight")), _cell(w.get("calls")),
                        _cell(w.get("last_seen_s")), _cell(w.get("config_revision")),
                        "draining" if w.get("draining") else "up")
    return Group(head, tiers, keys, workers)


def _failed_frame(error: BaseException, interval: float) -> Text:
    what = f"{type(error).__name__}: {error}" if str(error) else type(error).__name__  # (asyncio's TimeoutError: "")
    return Text(f"no status answer ({what}); trying again in {interval:g} s", style="yellow")


async def watch(fetch: Fetch, interval: float, console: Console) -> int:
    """Show `fetch()`'s answer every `interval` seconds until SIGINT or SIGTERM; returns 0.
    A failed fetch (no dispatcher, NATS away) is shown in the frame and retried."""
    stop = anyio.Event()
    rates = DoneRates()

    async def stop_on_signal() -> None:
        with anyio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
            async for _ in signals:
                stop.set()
                return

    async def frames(show: Callable[[object], None]) -> None:
        while not stop.is_set():
            try:
                answer = await fetch()
                frame: object = render_watch(answer, rates.update(answer), interval)
            except Exception as exc:  # noqa: BLE001 - shown, then retried: a watch outlives a failover
                frame = _failed_frame(exc, interval)
            show(frame)
            with anyio.move_on_after(interval):
                await stop.wait()

    async with anyio.create_task_group() as tg:
        tg.start_soon(stop_on_signal)
        if console.is_terminal:
            with Live(console=console, auto_refresh=False, transient=False) as live:
                await frames(lambda frame: live.update(frame, refresh=True))
        else:
            await frames(lambda frame: (console.print(frame), console.rule()))
        tg.cancel_scope.cancel()
    return 0


async def run_watch(url: str, prefix: str, interval: float, console: Console, auth: Any = None) -> int:
    """`ratefleet status --watch`: connect once (with `auth`, the `[nats]` credentials), then
    `watch` the fleet's status."""
    from ratefleet.client import Client

    async with await Client.connect(url, prefix=prefix, auth=auth, reconnect_forever=False) as client:
        return await watch(lambda: client.status(timeout=max(1.0, min(interval, 3.0))), interval, console)
