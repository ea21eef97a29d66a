"""The keys bucket: where the leader's key-health records live between leaders.

Every disabled key (by provider evidence or by an operator) is a JSON entry in the KV
bucket `ratefleet_keys` (key id -> `{by, reason, probe_delay_s, probe_in_s, disabled_for_s,
saved_at}`); an enabled key has no entry. A new leader loads the bucket at takeover, so a
disabled key and its reason survive a failover. What to persist, and the operator commands
on `<prefix>.admin.keys` (request `{"action": "disable"|"enable", "key": "k1", "reason":
"..."}`, reply `{"ok": true, "key": "k1", "persisted": true, "state": {...}}` or `{"ok":
false, "error": "..."}`), are decided by the leader's state machine
(dispatcher/core/leader_keys.py); this module only reads and writes the bucket.
"""

from __future__ import annotations

import json
import time
from collections.abc import Mapping
from typing import Any

from nats.js import JetStreamContext
from nats.js.errors import KeyDeletedError, KeyNotFoundError
from nats.js.kv import KeyValue

from ratefleet.runtime.logs import get_logger
from ratefleet.runtime.streams import kv_keys, open_kv

log = get_logger("ratefleet.keys")


class KeyStore:
    """Reads and writes key-health records in the keys bucket (opened on first use)."""

    def __init__(self, js: JetStreamContext, bucket: str) -> None:
        self.js, self.bucket = js, bucket
        self._kv: KeyValue | None = None

    async def _open(self) -> KeyValue:
        if self._kv is None:
            self._kv = await open_kv(self.js, self.bucket, ttl=None)
        return self._kv

    async def load(self) -> dict[str, dict[str, Any]]:
        """Every persisted record by key id (best effort: a failure is logged, and the keys
        then start enabled, as before this bucket existed); unreadable entries are skipped."""
        records: dict[str, dict[str, Any]] = {}
        try:
            kv = await self._open()
            names = await kv_keys(self.js, self.bucket)  # not kv.keys(): it misses keys being written
            for key_id in names:
                try:
                    entry = await kv.get(key_id)
                except (KeyNotFoundError, KeyDeletedError):
                    continue
                try:
                    records[key_id] = json.loads(entry.value or b"")
                except ValueError as exc:
                    log.warning("persisted key state skipped", key_id=key_id, error=type(exc).__name__)
        except Exception as exc:  # noqa: BLE001 - NATS away or bucket unusable
            log.warning("could not load persisted key states; keys start enabled", error=type(exc).__name__)
        return records

    async def save(self, key_id: str, record: Mapping[str, Any] | None) -> bool:
        """Persist one record (None: delete the entry), stamped `saved_at` (epoch seconds);
        False when NATS is away (the state holds in memory)."""
        try:
            kv = await self._open()
            if record is None:
                await kv.delete(key_id)
            else:
                await kv.put(key_id, json.dumps({**record, "saved_at": time.time()}).encode())
            return True
        except Exception as exc:  # noqa: BLE001 - see docstring
            self._kv = None
            log.warning("key state not persisted", key_id=key_id, error=type(exc).__name__)
            return False
