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
"""

from __future__ import annotations

import anyio
from nats.js import JetStreamContext
from nats.js.errors import KeyDeletedError, KeyNotFoundError
from nats.js.kv import KeyValue

from ratefleet.runtime.finish import Finisher
from ratefleet.runtime.logs import get_logger

log = get_logger("ratefleet.handbacks")
TIMEOUT_S = 1.0


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
        try:
            with anyio.fail_after(TIMEOUT_S):
                return await self._read(stream_seq)
        except Exception as exc:  # noqa: BLE001 - bucket missing, timeout, NATS away
            self._kv = None
            log.debug("handbacks not read", error=type(exc).__name__)
            return 0

    async def _read(self, stream_seq: int) -> int:
        kv = await self._open()
        try:
            entry = await kv.get(f"s{stream_seq}")
        except (KeyNotFoundError, KeyDeletedError):
            return 0
        return int(entry.value) if entry.value else 0

    async def add(self, stream_seq: int) -> None:
        """Record one more handback of this message. Best effort: if it fails, the delivery
        merely counts as an attempt."""
        if stream_seq <= 0:
            return
        try:
            with anyio.fail_after(TIMEOUT_S):
                current = await self._read(stream_seq)
                await (await self._open()).put(f"s{stream_seq}", str(current + 1).encode())
        except Exception as exc:  # noqa: BLE001 - see docstring
            self._kv = None
            log.warning("handback not recorded; this delivery counts as an attempt", error=type(exc).__name__)

    async def hand_back(self, stream_seq: int, finisher: Finisher, ack: str, delay_s: float = 0.0) -> None:
        """Return a delivery that made no call to the queue: recorded first, so whoever gets
        it next sees it was not an attempt, then nak'd."""
        await self.add(stream_seq)
        await finisher.nak(ack, delay_s)
