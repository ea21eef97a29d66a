"""One gateway runs a batch at a time: the runner lease in the batch record.

The lease is `ratefleet.runner = {"id", "until"}` in the record (`batch_book.claim`), taken and
renewed by compare-and-set on the record's KV revision, so two gateways never both hold it.
"""

from __future__ import annotations

import time
from typing import Any

import anyio

from ratefleet.gateway.batch_book import PRIVATE, TERMINAL, BatchBook, claim, holder
from ratefleet.runtime.logs import get_logger

log = get_logger("ratefleet.gateway")


class BatchLease:
    """`runner_id`'s leases on batch records, each lasting `lease_s` seconds unless renewed."""

    def __init__(self, book: BatchBook, runner_id: str, lease_s: float) -> None:
        self.book, self.runner_id, self.lease_s = book, runner_id, lease_s

    async def claim(self, batch_id: str) -> bool:
        """Take or renew the lease; False when the batch is gone, finished or another
        runner's lease is live (wall clock, unix seconds)."""
        try:
            record = await self.book.update(batch_id, lambda r: None if r["status"] in TERMINAL
                                            else claim(r, self.runner_id, time.time(), self.lease_s))
        except KeyError:
            return False
        return record["status"] not in TERMINAL and holder(record) == self.runner_id

    async def keep(self, batch_id: str, scope: anyio.CancelScope) -> None:
        """Renew every `lease_s / 3` seconds; cancel `scope` once the lease is another's."""
        while True:
            await anyio.sleep(self.lease_s / 3)
            try:
                mine = await self.claim(batch_id)
            except Exception:  # noqa: BLE001 - NATS away for a moment; the lease has slack
                continue
            if not mine:
                if (await self.book.get(batch_id) or {}).get("status") not in TERMINAL:
                    log.warning("batch taken over by another gateway; stopping here", batch=batch_id)
                scope.cancel()
                return

    async def release(self, batch_id: str) -> None:
        """Give the lease up at once (a stopping gateway), so another replica need not wait."""
        def change(record: dict[str, Any]) -> dict[str, Any] | None:
            if holder(record) != self.runner_id or record["status"] in TERMINAL:
                return None
            record[PRIVATE]["runner"]["until"] = 0
            return record

        await self.book.update(batch_id, change)
