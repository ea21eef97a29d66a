"""Deliveries that made no upstream call, so that they do not count as attempts.

JetStream counts every delivery of a JOBS message (`num_delivered`). Some deliveries end
without a call: a leader stepping down hands its window back, a draining worker returns an
assignment it never started, an assignment is lost on its way. Whoever hands such a
delivery back first adds one to the job's entry in the `ratefleet_handbacks` KV bucket
(key `s<stream sequence>`), and intake counts `attempt = num_delivered - handbacks`. A
rolling restart of the dispatchers therefore never exhausts `max_attempts` of a job that
was not called. Only deliveries that crashed (a SIGKILLed leader's window) still count.

The bucket is read only for redelivered messages, and written only on these rare paths.
"""

from __future__ import annotations

from nats.js import JetStreamContext
from nats.js.kv import KeyValue

from ratefleet.runtime.logs import get_logger

log = get_logger("ratefleet.handbacks")


class Handbacks:
    def __init__(self, kv: KeyValue | None):
        self.kv = kv

    @classmethod
    async def open(cls, js: JetStreamContext, bucket: str) -> Handbacks:
        """The bucket (created by ensure_topology); without it, every delivery counts."""
        try:
            return cls(await js.key_value(bucket))
        except Exception as exc:  # noqa: BLE001 - an older topology: degrade, do not fail
            log.warning("handback bucket missing; handed-back deliveries count as attempts", bucket=bucket,
                        error=type(exc).__name__)
            return cls(None)

    async def count(self, stream_seq: int) -> int:
        """How many deliveries of this message ended without a call (0 when unknown)."""
        if self.kv is None:
            return 0
        try:
            entry = await self.kv.get(f"s{stream_seq}")
            return int(entry.value) if entry and entry.value else 0
        except Exception:  # noqa: BLE001 - not found (the usual case), or NATS away
            return 0

    async def add(self, stream_seq: int, known: int) -> int:
        """Record one more delivery without a call (`known`: the count read at intake).
        Best effort: on failure the delivery merely counts as an attempt."""
        if self.kv is None or stream_seq <= 0:
            return known
        try:
            await self.kv.put(f"s{stream_seq}", str(known + 1).encode())
        except Exception as exc:  # noqa: BLE001 - see docstring
            log.debug("handback not recorded", error=type(exc).__name__)
            return known
        return known + 1
