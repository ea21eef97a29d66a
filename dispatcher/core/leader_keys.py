"""The leader's key-health decisions: what to persist, log and answer (the KV bucket, log
lines and replies are the shell's, dispatcher/shell/keycontrol.py).

* Persistence: every disabled key is a record in the keys bucket; `restore` applies what
  earlier leaders saved (times relative to when they saved it), `flush` names what changed.
* Operator commands: `{"action": "disable"|"enable", "key": "k1", "reason": "..."}` ->
  `{"ok": true, "key": "k1", "changed": bool, "persisted": bool, "state": {...}}` or
  `{"ok": false, "error": "..."}`.
* Secrets: keys whose secret no live worker can use are out of rotation with the workers'
  reason; they come back as soon as a worker that holds them beats.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from .commands import Command, Log, Respond, SaveKey
from .fleet import Fleet
from .scheduler import Scheduler

MAX_REASON_CHARS = 500
MALFORMED = 'send {"action": "disable"|"enable", "key": ID, "reason": TEXT}'


class KeyKeeper:
    """Key-health bookkeeping around the scheduler's KeyAdmin surface."""

    def __init__(self, scheduler: Scheduler, fleet: Fleet) -> None:
        self.scheduler, self.fleet = scheduler, fleet
        self.key_ids = scheduler.key_ids()
        self._missing: dict[str, str] = {}

    def restore(self, records: Mapping[str, Mapping[str, Any]], wall: float, now: float) -> list[Command]:
        """Apply records saved by earlier leaders (`saved_at`: epoch seconds; `wall`: now in
        epoch seconds); malformed ones are logged and skipped. Restoring is not news."""
        out: list[Command] = []
        for key_id, saved in records.items():
            try:
                record = dict(saved)
                elapsed = max(0.0, wall - float(record.get("saved_at") or wall))
                if record.get("probe_in_s") is not None:
                    record["probe_in_s"] = max(0.0, float(record["probe_in_s"]) - elapsed)
                record["disabled_for_s"] = float(record.get("disabled_for_s") or 0.0) + elapsed
                self.scheduler.restore_key(key_id, record, now)
            except (KeyError, ValueError, TypeError) as exc:
                out.append(Log("warning", "persisted key state skipped", {"key_id": key_id,
                                                                           "error": type(exc).__name__}))
                continue
            self.scheduler.key_changes()
            out.append(Log("warning", "key disabled (state kept from an earlier leader)",
                           {"key_id": key_id, "by": record["by"], "reason": record["reason"]}))
        return out

    def flush(self, now: float) -> list[Command]:
        """Log and persist the keys whose state changed (after outcomes and commands)."""
        out: list[Command] = []
        for key_id in self.scheduler.key_changes():
            out.append(self._change(key_id, now))
            out.append(SaveKey(key_id, self.scheduler.key_record(key_id, now)))
        return out

    def _change(self, key_id: str, now: float) -> Log:
        view = self.scheduler.snapshot(now)["keys"][key_id]
        if view["disabled_by"] == "provider":
            return Log("error", "KEY DISABLED: the upstream refused its credentials or credit; a probe job follows",
                       {"key_id": key_id, "reason": view["disabled_reason"], "probe_in_s": view["probe_in_s"]})
        if view["disabled_by"] == "operator":
            return Log("warning", "key disabled by an operator", {"key_id": key_id, "reason": view["disabled_reason"]})
        return Log("warning", "key enabled again", {"key_id": key_id})

    def sync_secrets(self) -> list[Command]:
        """Take keys no live worker can call out of rotation (and bring them back)."""
        missing = self.fleet.missing_everywhere(self.key_ids)
        if missing == self._missing:
            return []
        out: list[Command] = []
        for key_id, reason in missing.items():
            if self._missing.get(key_id) != reason:
                out.append(Log("error", "no worker has this key's secret; key out of rotation",
                               {"key_id": key_id, "problem": reason}))
        for key_id in sorted(self._missing.keys() - missing.keys()):
            if key_id in self.key_ids:  # a key a config change removed: no news about secrets
                out.append(Log("info", "a worker has this key's secret again", {"key_id": key_id}))
        self._missing = missing
        self.scheduler.set_secret_missing(missing)
        return out

    def command(self, request: Any, reply: str, error: str | None, now: float) -> list[Command]:
        """An operator's disable/enable (module docstring); the caller checks the lease."""
        if error is None and not isinstance(request, dict):
            error = "AttributeError"
        if error is None:
            try:
                return self._command(request, reply, now)
            except (ValueError, TypeError, AttributeError) as exc:
                error = type(exc).__name__
        return [Respond(reply, {"ok": False, "error": f"malformed request ({error}); {MALFORMED}"})]

    def _command(self, request: dict[str, Any], reply: str, now: float) -> list[Command]:
        action, key_id = request.get("action"), request.get("key")
        if key_id not in self.key_ids:
            return [Respond(reply, {"ok": False, "error": f"unknown key {key_id!r}; configured: "
                                                         f"{', '.join(self.key_ids)}"})]
        assert isinstance(key_id, str)
        if action == "disable":
            reason = str(request.get("reason") or "disabled by an operator")[:MAX_REASON_CHARS]
            self.scheduler.disable_key(key_id, reason, now)
        elif action == "enable":
            self.scheduler.enable_key(key_id, now)
        else:
            return [Respond(reply, {"ok": False, "error": f"unknown action {action!r}; use disable or enable"})]
        changes = self.scheduler.key_changes()
        out: list[Command] = [self._change(changed, now) for changed in changes]
        saves = tuple(SaveKey(changed, self.scheduler.key_record(changed, now)) for changed in changes)
        state = self.scheduler.snapshot(now)["keys"][key_id]
        answer = {"ok": True, "key": key_id, "changed": key_id in changes, "persisted": True, "state": state}
        return [*out, Respond(reply, answer, saves)]
