"""Leader election through a NATS KV lease (invariant 2: one writer of key state).

The bucket's TTL is the lease. `kv.create` takes it when free (it fails while another
dispatcher holds it), `kv.update(last=rev)` renews it. A leader that cannot renew in
time steps down before its lease can lapse; `release()` deletes it so a standby takes
over at once instead of waiting for the TTL.
"""

from __future__ import annotations

import time

from nats.js import JetStreamContext
from nats.js.errors import KeyWrongLastSequenceError, NotFoundError
from nats.js.kv import KeyValue

from ratefleet.runtime.logs import get_logger
from ratefleet.runtime.streams import open_kv

log = get_logger("ratefleet.lease")
LEASE_KEY = "dispatcher"


class LeaderLease:
    def __init__(self, js: JetStreamContext, bucket: str, holder: str, ttl_s: float):
        self.js, self.bucket, self.holder, self.ttl_s = js, bucket, holder, ttl_s
        self.kv: KeyValue | None = None
        self.seen_kv: KeyValue | None = None
        self.revision: int | None = None
        self.renewed_at = 0.0
        self.epoch: tuple[int, int] = (0, 0)  # of the current (or last) leadership
        self._bucket_created_ms = 0

    @property
    def held(self) -> bool:
        return self.revision is not None and time.monotonic() < self.held_until

    @property
    def held_until(self) -> float:
        """Until when (monotonic seconds) the lease is surely ours: 0.8 of the TTL after the
        last renewal began (-inf when not held)."""
        return self.renewed_at + self.ttl_s * 0.8 if self.revision is not None else float("-inf")

    async def open(self) -> None:
        self.kv = await open_kv(self.js, self.bucket, ttl=self.ttl_s)
        self.seen_kv = await open_kv(self.js, self.bucket + "_seen", ttl=None)
        if not await self._bucket_created():
            log.warning("lease bucket creation time unknown; leader epochs rely on revisions alone")

    async def last_leader_seen(self) -> float | None:
        """Wall-clock time a leader last held the lease (None: never). A leader that was
        active within a bucket's refill window may have spent its tokens: start empty."""
        assert self.seen_kv is not None
        try:
            entry = await self.seen_kv.get(LEASE_KEY)
        except NotFoundError:  # (KeyNotFoundError, KeyDeletedError are ones) no entry yet
            return None
        except Exception as exc:  # noqa: BLE001 - not known: as if a leader held it just now (buckets start empty)
            log.warning("when a leader last held the lease could not be read; starting with empty buckets",
                        error=type(exc).__name__)
            return time.time()
        try:
            return float(entry.value.decode()) if entry and entry.value else None
        except ValueError:
            return None

    async def mark_seen(self) -> None:
        assert self.seen_kv is not None
        try:
            await self.seen_kv.put(LEASE_KEY, str(time.time()).encode())
        except Exception as exc:  # noqa: BLE001 - best effort; the next renewal writes again
            log.debug("leader mark not written", error=type(exc).__name__)

    async def try_acquire(self) -> bool:
        """Take the lease if nobody holds it. True when we now hold it."""
        assert self.kv is not None
        try:
            self.revision = await self.kv.create(LEASE_KEY, self.holder.encode())
        except KeyWrongLastSequenceError:
            return False
        self.renewed_at = time.monotonic()
        self.epoch = (await self._bucket_created(), self.revision)
        return True

    async def _bucket_created(self) -> int:
        """Creation time of the lease bucket (ms): a bucket created anew (server state
        wiped) restarts its revisions, and this keeps the epochs growing anyway."""
        try:
            info = await self.js.stream_info(f"KV_{self.bucket}")
            if info.created is not None:
                self._bucket_created_ms = int(info.created.timestamp() * 1000)
        except Exception as exc:  # noqa: BLE001 - keep the last known value
            log.debug("lease bucket info unavailable", error=type(exc).__name__)
        return self._bucket_created_ms

    async def renew(self) -> bool:
        """Extend the lease; False when it was lost (expired, or taken by another)."""
        assert self.kv is not None and self.revision is not None
        started = time.monotonic()
        try:
            self.revision = await self.kv.update(LEASE_KEY, self.holder.encode(), last=self.revision)
        except KeyWrongLastSequenceError:
            self.revision = None
            return False
        self.renewed_at = started
        return True

    async def release(self) -> None:
        if self.kv is None or self.revision is None:
            return
        try:
            await self.kv.delete(LEASE_KEY, last=self.revision)
        except Exception as exc:  # noqa: BLE001 - the TTL frees it anyway
            log.warning("lease release failed; standbys take over when it expires", error=type(exc).__name__)
        self.revision = None

    async def current_holder(self) -> str | None:
        assert self.kv is not None
        try:
            entry = await self.kv.get(LEASE_KEY)
        except Exception:  # noqa: BLE001 - no entry, deleted or expired
            return None
        return entry.value.decode() if entry and entry.value else None
