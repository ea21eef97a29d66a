"""The scheduler's key-health surface for the shell: operator decisions, missing secrets,
persisted state, and which keys changed (a mixin of `Scheduler`; see keyhealth.py).

The shell persists what `key_record` returns for every id `key_changes` names, and hands
it to `restore_key` when a new leader takes over, so a disabled key and its reason survive
a failover. Times cross this boundary as durations relative to `now` (the core has no
wall clock).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .denials import DenialBook
    from .key import KeyState


class KeyAdmin:
    """Key-level operations on `self._keys` (KeyState by id); `_tick` is the Scheduler's."""

    _keys: dict[str, KeyState]
    _changed: set[str]
    _tick: Callable[[float], float]  # the Scheduler's: advances every key to `now`, returns it
    _denials: DenialBook

    def key_ids(self) -> list[str]:
        return list(self._keys)

    def is_disabled(self, key_id: str) -> bool:
        """Disabled (by provider evidence or an operator), or no worker holds its secret."""
        key = self._keys.get(key_id)
        return key is not None and key.disabled_reason is not None

    def disable_key(self, key_id: str, reason: str, now: float) -> bool:
        """An operator takes the key out until `enable_key` (never probed). KeyError for an
        unknown id; returns whether anything changed."""
        now = self._tick(now)
        changed = self._keys[key_id].health.disable("operator", reason, now)
        if changed:
            self._changed.add(key_id)
        return changed

    def enable_key(self, key_id: str, now: float) -> bool:
        """Back in rotation (from any disabled state); KeyError for an unknown id."""
        self._tick(now)
        changed = self._keys[key_id].health.enable()
        self._denials.forget_key(key_id)
        if changed:
            self._changed.add(key_id)
        return changed

    def set_secret_missing(self, missing: Mapping[str, str]) -> None:
        """Keys no live worker can call, with why (e.g. "LOCAL_KEY_1 not set"); every key
        not named has its secret somewhere. Not persisted: heartbeats say it again."""
        for key_id, key in self._keys.items():
            key.health.secret_missing = missing.get(key_id)

    def restore_key(self, key_id: str, record: Mapping[str, Any], now: float) -> None:
        """Apply a `key_record` a previous leader persisted; unknown ids and malformed
        records raise KeyError/ValueError/TypeError (the shell logs and skips them)."""
        now = self._tick(now)
        by = record["by"]
        if by not in ("provider", "operator"):
            raise ValueError(f"unknown disabled_by {by!r}")
        self._keys[key_id].health.restore(
            by, str(record["reason"]), now, probe_delay_s=float(record.get("probe_delay_s") or 0.0),
            probe_in_s=None if record.get("probe_in_s") is None else float(record["probe_in_s"]),
            disabled_for_s=float(record.get("disabled_for_s") or 0.0))

    def key_record(self, key_id: str, now: float) -> dict[str, Any] | None:
        """The persistable state of a disabled key (None when enabled): `by`, `reason`,
        `probe_delay_s`, `probe_in_s`, `disabled_for_s` (seconds)."""
        health = self._keys[key_id].health
        if health.by is None:
            return None
        view = health.view(now)
        return {"by": health.by, "reason": health.reason, "probe_delay_s": health.probe_delay_s,
                "probe_in_s": view["probe_in_s"], "disabled_for_s": view["disabled_for_s"]}

    def key_changes(self) -> list[str]:
        """Ids of keys whose disabled state changed since the last call (then forgotten)."""
        changed = sorted(k for k in self._changed if k in self._keys)  # not keys removed by a config change
        self._changed.clear()
        return changed
