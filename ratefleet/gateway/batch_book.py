"""The gateway's OpenAI batches (`/v1/batches`), one record each in a KV bucket.

Bucket `ratefleet_openai_batches` (suffixed like the streams), key: the batch id
(`batch_<24 hex>`, also the fleet batch of its jobs), records kept as long as Results. A
record is the OpenAI Batch object (OpenAI API reference, "Batch" -> "The batch object") plus
what the gateway needs to carry on after a restart:

    {"id": "batch_...", "object": "batch", "endpoint": "/v1/chat/completions", "errors": null,
     "input_file_id": "file-...", "completion_window": "24h", "status": "in_progress",
     "output_file_id": null, "error_file_id": null, "created_at": 1764400000, "in_progress_at": ...,
     "expires_at": ..., "finalizing_at": null, "completed_at": null, "failed_at": null,
     "expired_at": null, "cancelling_at": null, "cancelled_at": null,
     "request_counts": {"total": 10, "completed": 4, "failed": 1}, "metadata": null,
     "ratefleet": {"caller": "app", "tier": "premium", "upstream": null, "submitted": false,
                   "first_seq": 120, "last_seq": 131}}

Statuses: validating -> failed | in_progress -> finalizing -> completed; in_progress ->
cancelling -> cancelled; in_progress -> expired after the completion window. Records change
by compare-and-set on the KV revision (`update`), so a cancel and the runner's progress never
overwrite each other.

Runner lease: with several gateway replicas, one runs a batch at a time. The runner holds
`ratefleet.runner = {"id": <runner id>, "until": <unix seconds>}` and renews it; another
replica takes the batch over only once `until` has passed (`claim`), e.g. after its runner
was killed, so a batch is submitted, followed and finalized by one gateway at a time.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Callable
from typing import Any

import anyio
from nats.js import JetStreamContext
from nats.js.errors import (
    InvalidKeyError,
    KeyNotFoundError,
    KeyWrongLastSequenceError,
    NotFoundError,
)

from ratefleet.runtime.streams import Remake, kv_keys, open_kv, stream_gone
from ratefleet.schemas import Subjects

PRIVATE = "ratefleet"
TERMINAL = frozenset({"failed", "completed", "expired", "cancelled"})
WINDOW_S = {"24h": 86400}  # OpenAI's only completion window


def book_bucket(subjects: Subjects) -> str:
    return "ratefleet_openai_batches" + subjects.stream_suffix.lower()


def new_batch(*, caller: str, tier: str, upstream: str | None, input_file_id: str, endpoint: str,
              completion_window: str, metadata: dict | None, now: float) -> dict[str, Any]:
    """A new record in status `validating`."""
    created = int(now)
    record: dict[str, Any] = {
        "id": "batch_" + uuid.uuid4().hex[:24], "object": "batch", "endpoint": endpoint, "errors": None,
        "input_file_id": input_file_id, "completion_window": completion_window, "status": "validating",
        "output_file_id": None, "error_file_id": None, "created_at": created, "in_progress_at": None,
        "expires_at": created + WINDOW_S[completion_window], "finalizing_at": None, "completed_at": None,
        "failed_at": None, "expired_at": None, "cancelling_at": None, "cancelled_at": None,
        "request_counts": {"total": 0, "completed": 0, "failed": 0}, "metadata": metadata,
        PRIVATE: {"caller": caller, "tier": tier, "upstream": upstream, "submitted": False,
                  "first_seq": None, "last_seq": None, "created_ns": int(now * 1e9)},
    }
    return record


def public(record: dict[str, Any]) -> dict[str, Any]:
    """The OpenAI Batch object (without the gateway's own fields)."""
    return {name: value for name, value in record.items() if name != PRIVATE}


def set_status(record: dict[str, Any], status: str, now: float | None = None) -> dict[str, Any]:
    """`record` moved to `status`, with its `<status>_at` stamp (unix seconds)."""
    record["status"] = status
    stamp = f"{status}_at"
    if stamp in record and record[stamp] is None:
        record[stamp] = int(now if now is not None else time.time())
    return record


def claim(record: dict[str, Any], runner: str, now: float, lease_s: float) -> dict[str, Any] | None:
    """`record` with its runner lease given to (or renewed for) `runner` until `now + lease_s`
    (unix seconds), or None when another runner's lease is still live at `now`."""
    if held_by_other(record, runner, now):
        return None
    record[PRIVATE]["runner"] = {"id": runner, "until": now + lease_s}
    return record


def held_by_other(record: dict[str, Any], runner: str | None, now: float) -> bool:
    """Whether a runner other than `runner` holds a lease on `record` that is live at `now`."""
    held = record[PRIVATE].get("runner")
    return bool(held) and held["id"] != runner and held["until"] > now


def holder(record: dict[str, Any]) -> str | None:
    """The id of the runner holding (or last holding) `record`'s lease."""
    held = record[PRIVATE].get("runner")
    return held["id"] if held else None


class BatchBook:
    """The records in KV: create, get, compare-and-set update, list."""

    def __init__(self, js: JetStreamContext, subjects: Subjects, *, ttl_s: float, replicas: int = 1) -> None:
        self.js = js
        self.bucket = book_bucket(subjects)
        self.ttl_s, self.replicas = ttl_s, replicas
        self._kv = None
        self._remake = Remake()

    async def _open(self):
        if self._kv is None:
            await anyio.sleep(self._remake.wait_s())  # a bucket found gone: its deletion ends first
            self._kv = await open_kv(self.js, self.bucket, ttl=self.ttl_s, replicas=self.replicas,
                                     own_age=True)  # the gateway's own bucket
            self._remake.made()
        return self._kv

    async def create(self, record: dict[str, Any]) -> None:
        """Store a new record. A bucket NATS has lost (a restart without its store, or deleted)
        is made anew, once, `streams.REBUILD_SETTLE_S` after it was found gone (`streams.Remake`)."""
        payload = json.dumps(record).encode()
        try:
            await (await self._open()).create(record["id"], payload)
        except Exception as exc:
            if not stream_gone(exc):
                raise
            self._kv = None
            self._remake.lost()
            await (await self._open()).create(record["id"], payload)

    async def get(self, batch_id: str) -> dict[str, Any] | None:
        found = await self._get(batch_id)
        return None if found is None else found[0]

    async def _get(self, batch_id: str) -> tuple[dict[str, Any], int] | None:
        kv = await self._open()
        try:
            entry = await kv.get(batch_id)
        except (KeyNotFoundError, NotFoundError, InvalidKeyError):  # (invalid: a made-up id) no such batch
            return None
        # NATS not answering raises (a 503 at the gateway, the batch runner's next sweep), never "no such batch"
        if not entry.value:
            return None
        return json.loads(entry.value), entry.revision

    async def update(self, batch_id: str, change: Callable[[dict[str, Any]], dict[str, Any] | None]) -> dict[str, Any]:
        """Apply `change` (record -> new record, or None for no change) with compare-and-set,
        reading again on a concurrent write. Returns the stored record. KeyError when absent."""
        kv = await self._open()
        while True:
            found = await self._get(batch_id)
            if found is None:
                raise KeyError(batch_id)
            record, revision = found
            changed = change(json.loads(json.dumps(record)))
            if changed is None:
                return record
            try:
                await kv.update(batch_id, json.dumps(changed).encode(), last=revision)
                return changed
            except KeyWrongLastSequenceError:
                continue

    async def all(self) -> list[dict[str, Any]]:
        """Every record, newest first."""
        await self._open()
        try:
            keys = await kv_keys(self.js, self.bucket)  # not kv.keys(): it misses batches being updated
        except NotFoundError:
            return []
        records = [record for key in keys if (record := await self.get(key)) is not None]
        # created_ns orders the batches made within one second (records made before it: 0)
        return sorted(records, key=lambda r: (r["created_at"], r[PRIVATE].get("created_ns", 0), r["id"]), reverse=True)
