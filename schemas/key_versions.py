"""Versions of one key id's secret, for rotation without a restart.

A key id (`pools.<pool>.keys[]`) holds either one `secret` (one active version, id `v1`) or a
list of `versions`, each a secret reference (`env:NAME`, `file:PATH` or a literal) with a
`status` and an optional validity window `[not_before, not_after)` in RFC 3339 times (TOML
offset date-times, RFC 3339 section 5.6; a time without a UTC offset is refused):

    keys = [{ id = "k1", rps = 20, versions = [
      { id = "v1", secret = "env:OPENAI_KEY_OLD", not_after = 2026-12-01T00:00:00Z },
      { id = "v2", secret = "env:OPENAI_KEY_NEW", not_before = 2026-12-01T00:00:00Z },
    ] }]

A version's state at `now` (`version_state`):
  retired  - status `retired`: never used again.
  draining - status `draining`, or `active` past its `not_after`: no new call uses it; calls
             already made with it finish (the worker holds their secret until they end).
  pending  - `active` before its `not_before`: not used yet.
  active   - usable for a new call.

A new call uses the newest active version (`current_version`): the one with the latest
`not_before` (none counts as the earliest), the later-listed one on a tie. So a new version
takes over at its `not_before` even while the old one is still valid: the overlap. Limits,
token buckets and breaker state belong to the key id; the dispatcher never sees versions,
the worker picks one when it makes the call.

Rotation rule (the switch race): a call that picked the old version just before the switch
reaches the provider a little later. So the provider must accept the new secret from the new
version's `not_before` and keep accepting the old one until at least the old version's
`not_after` plus the upstream's `timeout_s`. `ratefleet keys rotate` writes exactly this:
new `not_before` = old `not_after` = the switch time.
"""

from __future__ import annotations

from datetime import datetime
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, SecretStr, field_validator, model_validator

from ratefleet.schemas.subjects import TOKEN_PATTERN

VersionStatus = Literal["active", "draining", "retired"]
VersionState = Literal["active", "pending", "draining", "retired"]
IMPLICIT_VERSION_ID = "v1"  # the version id of a key given with a single `secret`


def secret_ref_problem(raw: str, example: str = "OPENAI_KEY_1", path_example: str = "/run/secrets/k1") -> str | None:
    """Why a secret reference (`env:NAME`, `file:PATH` or a literal) is malformed, or None;
    `example` / `path_example` name a variable / path in the message. One rule for key
    secrets, caller keys and NATS credentials."""
    if not raw:
        return "must not be empty (use env:NAME, file:PATH or a literal)"
    if raw.startswith("env:") and not raw[4:]:
        return f"env: needs a variable name, e.g. env:{example}"
    if raw.startswith("file:") and not raw[5:]:
        return f"file: needs a path, e.g. file:{path_example}"
    return None


def is_literal(ref: str) -> bool:
    """True when a secret reference is the secret itself (neither env: nor file:)."""
    return not ref.startswith(("env:", "file:"))


class KeyVersion(BaseModel):
    """One version of a key's secret: `id` (a token, e.g. `v2`; shown in logs and Results),
    `secret` (a reference, never shown), `status`, and the window `[not_before, not_after)`
    as timezone-aware datetimes (RFC 3339 with an offset)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    id: str = Field(pattern=TOKEN_PATTERN)
    secret: SecretStr
    status: VersionStatus = "active"
    not_before: datetime | None = None
    not_after: datetime | None = None

    @field_validator("secret")
    @classmethod
    def _secret_form(cls, value: SecretStr) -> SecretStr:
        problem = secret_ref_problem(value.get_secret_value())
        if problem:
            raise ValueError(problem)
        return value

    @field_validator("not_before", "not_after")
    @classmethod
    def _with_offset(cls, value: datetime | None) -> datetime | None:
        if value is not None and value.utcoffset() is None:
            raise ValueError("needs a UTC offset (RFC 3339), e.g. 2026-12-01T00:00:00Z")
        return value

    @model_validator(mode="after")
    def _window(self) -> KeyVersion:
        if self.not_before is not None and self.not_after is not None and self.not_after <= self.not_before:
            raise ValueError("not_after must be later than not_before")
        return self

    @property
    def secret_ref(self) -> str:
        return self.secret.get_secret_value()


def check_versions(versions: list[KeyVersion]) -> list[KeyVersion]:
    """Validate a key's version list: at least one, ids unique. Raises ValueError."""
    if not versions:
        raise ValueError("needs at least one version")
    ids = [v.id for v in versions]
    twice = sorted({i for i in ids if ids.count(i) > 1})
    if twice:
        raise ValueError(f"version id {twice[0]!r} is used twice")
    return versions


def version_state(version: KeyVersion, now: datetime) -> VersionState:
    """The state of `version` at `now` (timezone-aware), per the table in this module's docstring."""
    if version.status == "retired":
        return "retired"
    if version.status == "draining" or (version.not_after is not None and now >= version.not_after):
        return "draining"
    if version.not_before is not None and now < version.not_before:
        return "pending"
    return "active"


def current_version(versions: list[KeyVersion], now: datetime) -> KeyVersion | None:
    """The version a new call uses at `now`: the newest active one (latest `not_before`, the
    later-listed on a tie), or None when no version is active."""
    best: tuple[datetime | None, int, KeyVersion] | None = None
    for index, version in enumerate(versions):
        if version_state(version, now) != "active":
            continue
        if best is None or _newer(version.not_before, index, best[0], best[1]):
            best = (version.not_before, index, version)
    return best[2] if best else None


def _newer(start: datetime | None, index: int, best_start: datetime | None, best_index: int) -> bool:
    if start == best_start:
        return index > best_index
    if start is None or best_start is None:
        return best_start is None
    return start > best_start


def describe_versions(versions: list[KeyVersion], now: datetime) -> str:
    """A short account of every version's state at `now`, for errors: e.g.
    "v1 draining since 2026-12-01T00:00:00+00:00, v2 pending until 2026-12-02T00:00:00+00:00"."""
    parts = []
    for version in versions:
        state = version_state(version, now)
        if state == "draining" and version.status == "active" and version.not_after is not None:
            parts.append(f"{version.id} draining since {version.not_after.isoformat()}")
        elif state == "pending" and version.not_before is not None:
            parts.append(f"{version.id} pending until {version.not_before.isoformat()}")
        else:
            parts.append(f"{version.id} {state}")
    return ", ".join(parts)
