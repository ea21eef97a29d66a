"""Job ids a restarted NATS server has forgotten: when a first delivery needs the Result lookup.

JetStream's dedup (`Nats-Msg-Id`) remembers an id for `duplicate_window_s`, but a server that
restarts rebuilds that memory from the messages it still holds. A job that was done before
the restart (acked: gone from the work-queue JOBS stream) is forgotten, so the same job sent
again inside the window (a producer retrying after the outage with the same ids, as a
SubmitError tells it to) is stored as a new message, and its first delivery would be called,
and paid, a second time. Such a first delivery must look up the job's stored Result, as a
redelivery always does.

That lookup is one JetStream read per job, so it is made only where a duplicate can hide: for
messages stored less than `duplicate_window_s` after this server incarnation (its
`server_id`, new at each start) was first met by a dispatcher while RATEFLEET_RESULTS held
Results. The first dispatcher to meet an incarnation writes that deadline to the
leader-seen KV bucket (`server-<server_id>`), so a dispatcher started later (a failover)
reads it instead of opening a window of its own.

Limit: in a cluster only the server this dispatcher is connected to is seen; a restart of
another server that then leads the JOBS stream goes unnoticed here.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable

from nats.aio.client import Client as NatsClient
from nats.js import JetStreamContext
from nats.js.kv import KeyValue

from ratefleet.runtime.logs import get_logger

log = get_logger("ratefleet.forgotten")


class ForgottenIds:
    """Says whether a JOBS message, by its stored time, may repeat a job the server forgot."""

    def __init__(self, nc: NatsClient, js: JetStreamContext, results_stream: str,
                 open_seen: Callable[[], Awaitable[KeyValue]], window_s: float,
                 clock: Callable[[], float] = time.time) -> None:
        """`open_seen`: opens the leader-seen KV bucket. `window_s`: streams.duplicate_window_s."""
        self.nc, self.js, self.results_stream = nc, js, results_stream
        self.open_seen, self.window_s, self.clock = open_seen, window_s, clock
        self.server_id: str | None = None
        # wall-clock seconds: messages stored before this get the lookup. One shared answer per
        # incarnation: the tiers' pull inboxes and the lookup tasks ask concurrently after a
        # restart, and one asking while another met the new server took the old, closed window
        self._until: asyncio.Future[float] | None = None

    async def may_repeat(self, stored_at: float) -> bool:
        """True when a message stored at `stored_at` (wall-clock seconds) may be a done job sent
        again after a restart of the server. Never raises: an unknown state answers True."""
        server_id = (getattr(self.nc, "_server_info", None) or {}).get("server_id") or ""
        if server_id != self.server_id or self._until is None or self._until.cancelled():
            self.server_id = server_id
            self._until = asyncio.ensure_future(self._deadline(server_id))
        met = self._until
        return stored_at < (met.result() if met.done() else await asyncio.shield(met))

    async def _deadline(self, server_id: str) -> float:
        now = self.clock()
        try:
            seen = await self.open_seen()
            key = f"server-{server_id}"
            try:
                entry = await seen.get(key)
                if entry is not None and entry.value:
                    return float(entry.value.decode())
            except Exception:  # noqa: BLE001 - no record: this dispatcher is the first to meet it
                pass
            held = (await self.js.stream_info(self.results_stream)).state.messages
            until = now + self.window_s if held else 0.0
            try:
                await seen.create(key, str(until).encode())
            except Exception:  # noqa: BLE001 - another dispatcher wrote it first: take its deadline
                entry = await seen.get(key)
                until = float(entry.value.decode())
        except Exception as exc:  # noqa: BLE001 - cannot tell: look up every first delivery of the window
            log.warning("cannot tell whether NATS forgot done jobs; looking up stored Results",
                        error=type(exc).__name__)
            self._until = None  # asked again at the next delivery
            return now + self.window_s
        if until > now:
            log.info("NATS server incarnation met while Results are stored: first deliveries look up stored "
                     "Results until the dedup window has passed", server_id=server_id, window_s=round(until - now))
        return until
