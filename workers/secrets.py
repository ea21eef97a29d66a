"""Resolving key secrets inside the worker (invariant 5: workers own secrets).

A secret reference is `env:NAME`, `file:PATH` or a literal. Resolved values are cached per
key id and never logged; errors name the key id and the reference, never the value.

A secret is usable only if it can be sent as an HTTP header value: RFC 9110 section 5.5
allows visible ASCII, obs-text (0x80-0xFF, i.e. latin-1) and spaces/tabs inside a field
value; CR, LF, other control characters and anything beyond latin-1 cannot be sent
(httpx raises on them). `check_all` finds every unusable secret at worker start.
"""

from __future__ import annotations

import os
from pathlib import Path

from ratefleet.schemas import Config
from ratefleet.schemas.errors import SecretUnavailable


def header_problem(value: str) -> str | None:
    """Why `value` cannot be an HTTP header value (RFC 9110 5.5), or None; never quotes it."""
    for char in value:
        code = ord(char)
        if char in "\r\n":
            return "contains a line break (CR/LF)"
        if code > 0xFF:
            return "contains a character outside latin-1, which an HTTP header cannot carry"
        if (code < 0x20 and char != "\t") or code == 0x7F:
            return "contains a control character"
    return None


class SecretResolver:
    """Secrets by key id for one worker: `get` resolves (cached), `check_all` reports."""

    def __init__(self, config: Config):
        self._refs = {key_id: key.secret.get_secret_value() for key_id, key in config.keys().items()}
        self._cache: dict[str, str] = {}

    def get(self, key_id: str) -> str:
        """The secret of `key_id`; SecretUnavailable (with `.reason`) when it cannot be used."""
        if key_id in self._cache:
            return self._cache[key_id]
        ref = self._refs.get(key_id)
        if ref is None:
            raise SecretUnavailable(f"key {key_id!r} is not in this worker's config; deploy the same config to every worker",
                                    reason="key not in this worker's config")
        value = self._resolve(key_id, ref)
        self._cache[key_id] = value
        return value

    def check_all(self) -> dict[str, str]:
        """{key id: short reason} for every key whose secret cannot be used here, e.g.
        {"k1": "LOCAL_KEY_1 not set"}; values are never part of a reason."""
        problems = {}
        for key_id in self._refs:
            try:
                self.get(key_id)
            except SecretUnavailable as exc:
                problems[key_id] = exc.reason
        return problems

    @staticmethod
    def _resolve(key_id: str, ref: str) -> str:
        if ref.startswith("env:"):
            name = ref[4:]
            value = os.environ.get(name)
            if not value:
                raise SecretUnavailable(f"key {key_id!r}: environment variable {name} is not set on this worker",
                                        reason=f"{name} not set")
            where = name
        elif ref.startswith("file:"):
            path = ref[5:]
            try:
                value = Path(path).read_text().strip()
            except (OSError, UnicodeDecodeError) as exc:
                why = getattr(exc, "strerror", None) or "not UTF-8 text"
                raise SecretUnavailable(f"key {key_id!r}: cannot read secret file {path} ({why})",
                                        reason=f"file {path} unreadable ({why})") from None
            if not value:
                raise SecretUnavailable(f"key {key_id!r}: secret file {path} is empty", reason=f"file {path} empty")
            where = f"file {path}"
        else:
            value, where = ref, "literal secret"
        problem = header_problem(value)
        if problem is not None:
            raise SecretUnavailable(f"key {key_id!r}: {where} {problem}", reason=f"{where} {problem}")
        return value
