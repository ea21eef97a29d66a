"""A worker's outcome reports, coalesced: the reports made within one event-loop iteration go
to the leader as one message (schemas/internal.py `batch_payload`).

The first report of a round yields the loop once (`anyio.sleep(0)`): every job that ends
meanwhile adds its report, then one publish carries them all. So a report waits at most one
loop iteration, and under load, when many jobs end per iteration, the leader reads one
message per round instead of one per job. A report that must reach the leader before
something else the worker sends (a 401's report before the job's nak) is sent at once
(`now=True`, with whatever waits), and so are the waiting reports before each heartbeat
(`flush`): a heartbeat never lists a call as ended before its report was sent.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable

import anyio

from ratefleet.runtime.logs import get_logger
from ratefleet.schemas.internal import batch_payload

log = get_logger("ratefleet.worker")
MAX_BATCH_BYTES = 64 * 1024  # well under any server's max_payload (default 1 MiB; reports are ~300 bytes)


class ReportOutbox:
    """Coalesces outcome reports (each one OutcomeReport's JSON) into messages published by
    `publish(payload)`. A failed publish is logged and its reports dropped: the worker's next
    heartbeat no longer lists those calls, which tells the leader they ended."""

    def __init__(self, publish: Callable[[bytes], Awaitable[None]], max_bytes: int = MAX_BATCH_BYTES) -> None:
        self._publish = publish
        self._max_bytes = max_bytes
        self._pending: list[bytes] = []
        self._size = 0
        self._round_open = False

    @property
    def pending(self) -> int:
        """Reports not yet published."""
        return len(self._pending)

    async def send(self, report: bytes, *, now: bool = False) -> None:
        """Queue `report`; published within this loop iteration's round, or at once with `now`."""
        self._pending.append(report)
        self._size += len(report) + 1
        if now or self._size >= self._max_bytes:
            await self.flush()
            return
        if self._round_open:
            return  # the round's opener publishes it
        self._round_open = True
        try:
            await anyio.sleep(0)  # one loop iteration: the jobs ending meanwhile join this message
        finally:
            self._round_open = False
        await self.flush()

    async def flush(self) -> None:
        """Publish every waiting report now (nothing when none waits)."""
        if not self._pending:
            return
        reports, self._pending, self._size = self._pending, [], 0
        try:
            await self._publish(batch_payload(reports))
        except Exception as exc:  # noqa: BLE001 - the heartbeat reconciles a lost report
            log.warning("outcome report not sent", error=type(exc).__name__, reports=len(reports))
