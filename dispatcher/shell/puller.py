"""Per-tier pull of the JOBS stream with our own pull requests (invariant 8).

nats-py's `fetch()` costs a round trip per batch and caps throughput (measurements.md:
~20k/s vs 75-82k/s). Here each tier has one inbox subscription; pull requests ask for
just enough messages to keep `window` jobs in memory, so a backlog of millions stays in
JetStream. Status messages (408/409) tell how much of a request went unfilled.
"""

from __future__ import annotations

import json
import time
from collections.abc import Awaitable, Callable

import anyio
from nats.aio.client import Client as NatsClient
from nats.aio.msg import Msg

from ratefleet.runtime.logs import get_logger

log = get_logger("ratefleet.puller")
PULL_EXPIRES_S = 1.0  # short: a stepping-down leader waits this long to hand back late arrivals
HANDBACK_MARGIN_S = 0.25
DRAIN_S = 5.0  # longest wait for intake to finish at step-down (its lookups time out sooner)


class TierPuller:
    def __init__(self, nc: NatsClient, stream: str, consumer: str, tier: str, window: int,
                 on_job: Callable[[str, Msg], Awaitable[None]], held: Callable[[], int],
                 fence: Callable[[], bool] = lambda: True, max_deliver: int = 0,
                 hand_back: Callable[[Msg, float], Awaitable[None]] | None = None):
        self.nc, self.stream, self.consumer, self.tier, self.window = nc, stream, consumer, tier, window
        self.on_job = on_job
        self.fence = fence  # False once our lease may have lapsed: then nak nothing
        self.max_deliver = max_deliver  # the server's last delivery must never be nak'd (0: unknown)
        self.hand_back = hand_back or self._nak  # returns a message to the queue after a delay
        self.outstanding = 0
        self.held = held  # jobs of this tier waiting in the scheduler's window
        self.active = False
        self._sub = None
        self._inbox = ""
        self.last_activity = time.monotonic()

    async def start(self) -> None:
        self._inbox = self.nc.new_inbox()
        self._sub = await self.nc.subscribe(self._inbox, cb=self._on_msg, pending_msgs_limit=0)
        self.active = True
        await self.top_up()

    def stop_pulling(self) -> None:
        """No new pulls; messages still arriving for open pull requests are nak'd at once."""
        self.active = False

    async def stop(self) -> None:
        """Unsubscribe, after the open pull requests expired (call stop_pulling() first and
        wait up to PULL_EXPIRES_S, or their messages wait out ack_wait on a dead inbox).
        Drains: a job being taken in finishes, and deliveries still queued are handed back."""
        self.active = False
        sub, self._sub = self._sub, None
        self.outstanding = 0
        if sub is None:
            return
        try:
            with anyio.fail_after(DRAIN_S):
                await sub.drain()
        except Exception as exc:  # noqa: BLE001 - slow or gone: what is left returns after ack_wait
            log.warning("pull inbox not drained", tier=self.tier, error=type(exc).__name__)

    async def top_up(self) -> None:
        """Ask for more when at least half the window is free and nothing much is on its way."""
        room = self.window - self.held() - self.outstanding
        if not self.active or not self.fence() or room < max(1, self.window // 2):
            return
        request = {"batch": room, "expires": int(PULL_EXPIRES_S * 1e9)}
        self.outstanding += room
        self.last_activity = time.monotonic()
        await self.nc.publish(f"$JS.API.CONSUMER.MSG.NEXT.{self.stream}.{self.consumer}",
                              json.dumps(request).encode(), reply=self._inbox)

    async def check_stale(self) -> None:
        """A pull request lost to a reconnect never reports back: forget it and ask again."""
        if self.outstanding and time.monotonic() - self.last_activity > PULL_EXPIRES_S + 2:
            self.outstanding = 0
            self.last_activity = time.monotonic()
        await self.top_up()

    async def _on_msg(self, msg: Msg) -> None:
        self.last_activity = time.monotonic()
        status = msg.headers.get("Status") if msg.headers else None
        if status is not None and not msg.data:
            await self._on_status(status, msg)
            return
        self.outstanding = max(0, self.outstanding - 1)
        if not self.active:
            if self.max_deliver and msg.metadata.num_delivered >= self.max_deliver:
                # the server will not deliver it again: a nak (or a drop) would leave it in the
                # stream forever; intake ends it as a poison message instead
                await self.on_job(self.tier, msg)
                return
            if not self.fence():
                # woken after a pause: this delivery may have been redelivered to the new
                # leader by now, and a stale nak would make the server deliver it once more
                return
            # stepping down: hand it back, but only after our open pull requests expired, or
            # it would come straight back to us in a nak loop
            await self.hand_back(msg, PULL_EXPIRES_S + HANDBACK_MARGIN_S)
            return
        await self.on_job(self.tier, msg)

    async def _nak(self, msg: Msg, delay_s: float) -> None:
        await self.nc.publish(msg.reply, b'-NAK {"delay": %d}' % int(delay_s * 1e9))

    async def _on_status(self, status: str, msg: Msg) -> None:
        if status in ("408", "409", "404"):
            unfilled = int(msg.headers.get("Nats-Pending-Messages", 0) or 0)
            self.outstanding = max(0, self.outstanding - unfilled) if unfilled else 0
            if status == "409":
                log.warning("pull request ended by the server", tier=self.tier,
                            reason=msg.headers.get("Description"))
            await self.top_up()
