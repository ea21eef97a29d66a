"""The leader's key-health shell: persisted disabled state, operator commands, secrets.

* Persistence: every disabled key (by provider evidence or by an operator) is a JSON entry in
  the KV bucket `ratefleet_keys` (key id -> `{by, reason, probe_delay_s, probe_in_s,
  disabled_for_s, saved_at}`); an enabled key has no entry. A new leader loads the bucket at
  takeover, so a disabled key and its reason survive a failover.
* Operator commands: core request/reply on `<prefix>.admin.keys`, answered by the leader
  only. Request `{"action": "disable"|"enable", "key": "k1", "reason": "..."}`; reply
  `{"ok": true, "key": "k1", "persisted": true, "state": {...status fields...}}` or
  `{"ok": false, "error": "..."}`.
* Secrets: keys whose secret no live worker can use are out of rotation with the workers'
  reason; they come back as soon as a worker that holds them beats.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable

from nats.aio.msg import Msg
from nats.js import JetStreamContext
from nats.js.errors import KeyDeletedError, KeyNotFoundError, NoKeysError

from ratefleet.dispatcher.core import Scheduler
from ratefleet.dispatcher.fleet import Fleet
from ratefleet.runtime.logs import get_logger
from ratefleet.runtime.streams import open_kv
from ratefleet.schemas import Subjects

log = get_logger("ratefleet.keys")
MAX_REASON_CHARS = 500


class KeyControl:
    """Carries the scheduler's key-health changes out to KV, logs and operator replies."""

    def __init__(self, scheduler: Scheduler, fleet: Fleet, js: JetStreamContext, subjects: Subjects,
                 fence: Callable[[], bool]) -> None:
        self.scheduler, self.fleet, self.js, self.subjects, self.fence = scheduler, fleet, js, subjects, fence
        self.key_ids = scheduler.key_ids()
        self._kv = None
        self._missing: dict[str, str] = {}

    async def _bucket(self):
        if self._kv is None:
            self._kv = await open_kv(self.js, self.subjects.keys_bucket, ttl=None)
        return self._kv

    # -- takeover ---------------------------------------------------------------------------

    async def restore(self) -> None:
        """Load what earlier leaders persisted (best effort: a failure is logged, and the
        keys then start enabled, as before this bucket existed)."""
        try:
            kv = await self._bucket()
            try:
                names = await kv.keys()
            except NoKeysError:
                return
            for key_id in names:
                await self._restore_one(kv, key_id)
        except Exception as exc:  # noqa: BLE001 - NATS away or bucket unusable
            log.warning("could not load persisted key states; keys start enabled", error=type(exc).__name__)

    async def _restore_one(self, kv, key_id: str) -> None:
        try:
            entry = await kv.get(key_id)
        except (KeyNotFoundError, KeyDeletedError):
            return
        try:
            record = json.loads(entry.value)
            elapsed = max(0.0, time.time() - float(record.get("saved_at") or time.time()))
            if record.get("probe_in_s") is not None:
                record["probe_in_s"] = max(0.0, float(record["probe_in_s"]) - elapsed)
            record["disabled_for_s"] = float(record.get("disabled_for_s") or 0.0) + elapsed
            self.scheduler.restore_key(key_id, record, time.monotonic())
        except (KeyError, ValueError, TypeError) as exc:
            log.warning("persisted key state skipped", key_id=key_id, error=type(exc).__name__)
            return
        self.scheduler.key_changes()  # restoring is not news
        log.warning("key disabled (state kept from an earlier leader)", key_id=key_id, by=record["by"],
                    reason=record["reason"])

    # -- changes ----------------------------------------------------------------------------

    async def flush(self) -> None:
        """Log and persist the keys whose state changed (call after outcomes and commands)."""
        for key_id in self.scheduler.key_changes():
            self._log_change(key_id)
            await self._save(key_id)

    def _log_change(self, key_id: str) -> None:
        view = self.scheduler.snapshot(time.monotonic())["keys"][key_id]
        if view["disabled_by"] == "provider":
            log.error("KEY DISABLED: the upstream refused its credentials or credit; a probe job follows",
                      key_id=key_id, reason=view["disabled_reason"], probe_in_s=view["probe_in_s"])
        elif view["disabled_by"] == "operator":
            log.warning("key disabled by an operator", key_id=key_id, reason=view["disabled_reason"])
        else:
            log.warning("key enabled again", key_id=key_id)

    async def _save(self, key_id: str) -> bool:
        record = self.scheduler.key_record(key_id, time.monotonic())
        try:
            kv = await self._bucket()
            if record is None:
                await kv.delete(key_id)
            else:
                await kv.put(key_id, json.dumps({**record, "saved_at": time.time()}).encode())
            return True
        except Exception as exc:  # noqa: BLE001 - NATS away: the state holds in memory
            self._kv = None
            log.warning("key state not persisted", key_id=key_id, error=type(exc).__name__)
            return False

    # -- secrets ----------------------------------------------------------------------------

    def sync_secrets(self) -> None:
        """Take keys no live worker can call out of rotation (and bring them back)."""
        missing = self.fleet.missing_everywhere(self.key_ids)
        if missing == self._missing:
            return
        for key_id, reason in missing.items():
            if self._missing.get(key_id) != reason:
                log.error("no worker has this key's secret; key out of rotation", key_id=key_id, problem=reason)
        for key_id in self._missing.keys() - missing.keys():
            log.info("a worker has this key's secret again", key_id=key_id)
        self._missing = missing
        self.scheduler.set_secret_missing(missing)

    # -- operator commands ------------------------------------------------------------------

    async def on_command(self, msg: Msg) -> None:
        if not self.fence():
            return  # the lease may have lapsed: the new leader answers
        try:
            answer = await self._command(json.loads(msg.data))
        except (ValueError, TypeError, AttributeError) as exc:
            answer = {"ok": False, "error": f"malformed request ({type(exc).__name__}); "
                                            'send {"action": "disable"|"enable", "key": ID, "reason": TEXT}'}
        await msg.respond(json.dumps(answer).encode())

    async def _command(self, request: dict) -> dict:
        action, key_id = request.get("action"), request.get("key")
        if key_id not in self.key_ids:
            return {"ok": False, "error": f"unknown key {key_id!r}; configured: {', '.join(self.key_ids)}"}
        now = time.monotonic()
        if action == "disable":
            reason = str(request.get("reason") or "disabled by an operator")[:MAX_REASON_CHARS]
            self.scheduler.disable_key(key_id, reason, now)
        elif action == "enable":
            self.scheduler.enable_key(key_id, now)
        else:
            return {"ok": False, "error": f"unknown action {action!r}; use disable or enable"}
        changes = self.scheduler.key_changes()
        persisted = True
        for changed in changes:
            self._log_change(changed)
            persisted = await self._save(changed) and persisted
        state = self.scheduler.snapshot(time.monotonic())["keys"][key_id]
        return {"ok": True, "key": key_id, "changed": key_id in changes, "persisted": persisted, "state": state}
