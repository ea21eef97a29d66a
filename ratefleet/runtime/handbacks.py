"""Deliveries that made no upstream call, so that they do not count as attempts.

JetStream counts every delivery of a JOBS message (`num_delivered`). Some deliveries are
handed back without a call: a leader stepping down returns its window, a draining worker
returns an assignment it never started. Whoever hands such a delivery back adds one to the
job's entry in the `ratefleet_handbacks` KV bucket (key `s<stream sequence>`) before the
nak, and intake counts `attempt = num_delivered - handbacks`. A rolling restart of the
dispatchers therefore never exhausts `max_attempts` of a job that was not called.

Everything else still counts, on purpose: a delivery lost in a crash, an assignment that
went missing (its outcome report may be what was lost, after a real call), a delivery a
fenced leader dropped. Over-counting can end a job early; under-counting could pay for
calls beyond `max_attempts`. The bucket is read only for redelivered messages and written
only on the handback paths, with short timeouts: it never stalls the hot path.

Deliveries that ended in a 429 are recorded in the same entry, as a second number
(value `"<handbacks> <rate limited>"`; a lone number when there were no 429s): intake
counts them neither as attempts nor toward the poison limit, but against the tier's
separate `max_rate_limited` budget. Because the counts live in JetStream, a new leader
after a failover sees the same numbers.
"""

from __future__ import annotations

from dataclasses import dataclass

import anyio
from nats.js import JetStreamContext
from nats.js.errors import KeyDeletedError, KeyNotFoundError
from nats.js.kv import KeyValue

from ratefleet.runtime.finish import Finisher
from ratefleet.runtime.logs import get_logger

log = get_logger("ratefleet.handbacks")
TIMEOUT_S = 1.0


@dataclass(frozen=True)
class DeliveryCounts:
    """Earlier deliveries of one JOBS message that were not attempts: handed back without a
    call, or answered 429."""

    handbacks: int = 0
    rate_limited: int = 0

    @classmethod
    def parse(cls, value: bytes | None) -> DeliveryCounts:
        """From a KV value: "3" (handbacks only) or "3 5"; ValueError when malformed."""
        parts = (value or b"").split()
        if len(parts) > 2:
            raise ValueError("malformed delivery counts")
        numbers = [int(part) for part in parts] + [0, 0]
        return cls(max(0, numbers[0]), max(0, numbers[1]))

    def encode(self) -> bytes:
        """A lone number while there are no 429s, as before (readers of that form keep working)."""
        if not self.rate_limited:
            return str(self.handbacks).encode()
        return f"{self.handbacks} {self.rate_limited}".encode()


class Handbacks:
    def __init__(self, js: JetStreamContext, bucket: str):
        self.js, self.bucket = js, bucket
        self._kv: KeyValue | None = None

    async def _open(self) -> KeyValue:
        """The bucket (ensure_topology creates it), opened on first use and again after a failure."""
        if self._kv is None:
            self._kv = await self.js.key_value(self.bucket)
        return self._kv

    async def count(self, stream_seq: int) -> int:
        """How many deliveries of this message were handed back without a call (0 when
        unknown: then they count as attempts, the safe side)."""
        return (await self.counts(stream_seq)).handbacks

    async def counts(self, stream_seq: int) -> DeliveryCounts:
        """Handbacks and 429s recorded for this message (zeros when unknown: then those
        deliveries count as attempts, the safe side)."""
        try:
            with anyio.fail_after(TIMEOUT_S):
                return await self._read(stream_seq)
        except Exception as exc:  # noqa: BLE001 - bucket missing, timeout, NATS away, malformed
            self._kv = None
            log.debug("handbacks not read", error=type(exc).__name__)
            return DeliveryCounts()

    async def _read(self, stream_seq: int) -> DeliveryCounts:
        kv = await self._open()
        try:
            entry = await kv.get(f"s{stream_seq}")
        except (KeyNotFoundError, KeyDeletedError):
            return DeliveryCounts()
        return DeliveryCounts.parse(entry.value)

    async def add(self, stream_seq: int, *, rate_limited: bool = False) -> None:
        """Record one more handback (or, with `rate_limited`, one more 429) of this message.
        Best effort: if it fails, the delivery merely counts as an attempt."""
        if stream_seq <= 0:
            return
        try:
            with anyio.fail_after(TIMEOUT_S):
                now = await self._read(stream_seq)
                later = (DeliveryCounts(now.handbacks, now.rate_limited + 1) if rate_limited
                         else DeliveryCounts(now.handbacks + 1, now.rate_limited))
                await (await self._open()).put(f"s{stream_seq}", later.encode())
        except Exception as exc:  # noqa: BLE001 - see docstring
            self._kv = None
            log.warning("delivery not recorded; it counts as an attempt", error=type(exc).__name__,
                        rate_limited=rate_limited)

    async def hand_back(self, stream_seq: int, finisher: Finisher, ack: str, delay_s: float = 0.0) -> None:
        """Return a delivery that made no call to the queue: recorded first, so whoever gets
        it next sees it was not an attempt, then nak'd."""
        await self.add(stream_seq)
        await finisher.nak(ack, delay_s)

    async def rate_limited(self, stream_seq: int, finisher: Finisher, ack: str, delay_s: float) -> None:
        """Return a delivery that was answered 429: recorded first (not an attempt, one
        more against the rate-limit budget), then nak'd with `delay_s`."""
        await self.add(stream_seq, rate_limited=True)
        await finisher.nak(ack, delay_s)
