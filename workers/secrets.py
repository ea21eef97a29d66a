"""Resolving key secrets inside the worker (invariant 5: workers own secrets).

A secret reference is `env:NAME`, `file:PATH` or a literal. Resolved values are cached per
key id and never logged; errors name the key id and the reference, not the value.
"""

from __future__ import annotations

import os
from pathlib import Path

from ratefleet.errors import SecretUnavailable
from schemas import Config


class SecretResolver:
    def __init__(self, config: Config):
        self._refs = {key_id: key.secret.get_secret_value() for key_id, key in config.keys().items()}
        self._cache: dict[str, str] = {}

    def get(self, key_id: str) -> str:
        if key_id in self._cache:
            return self._cache[key_id]
        ref = self._refs.get(key_id)
        if ref is None:
            raise SecretUnavailable(f"key {key_id!r} is not in this worker's config; deploy the same config to every worker")
        value = self._resolve(key_id, ref)
        self._cache[key_id] = value
        return value

    def check_all(self) -> list[str]:
        """Problems resolving any key, for a warning at start (values are never shown)."""
        problems = []
        for key_id in self._refs:
            try:
                self.get(key_id)
            except SecretUnavailable as exc:
                problems.append(str(exc))
        return problems

    @staticmethod
    def _resolve(key_id: str, ref: str) -> str:
        if ref.startswith("env:"):
            value = os.environ.get(ref[4:])
            if not value:
                raise SecretUnavailable(f"key {key_id!r}: environment variable {ref[4:]} is not set on this worker")
            return value
        if ref.startswith("file:"):
            try:
                value = Path(ref[5:]).read_text().strip()
            except OSError as exc:
                raise SecretUnavailable(f"key {key_id!r}: cannot read secret file {ref[5:]} ({exc.strerror})") from None
            if not value:
                raise SecretUnavailable(f"key {key_id!r}: secret file {ref[5:]} is empty")
            return value
        return ref
