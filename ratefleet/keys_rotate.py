"""`ratefleet keys rotate`: the usual key rotation step as one config edit.

`rotate(config, key_id, secret_ref, at)` takes a config as a dict (the TOML file parsed, or a
config about to be pushed) and returns a new one in which key `key_id`:
  - gets a new version `v<N+1>` with `secret = secret_ref` and `not_before = at`;
  - has every version that is active at `at` end there (`not_after = at`), so it turns
    draining at `at`: no new call uses it, calls in flight finish;
  - a key given with a single `secret` first becomes one version `v1` with that secret.
From `at` on, workers make every new call with the new version (schemas/key_versions.py);
the switch is a time in the config, so it needs no reload at `at`. The provider must accept
the new secret from `at` and keep the old one until at least `at` plus the upstream's
`timeout_s` (a call picked just before `at` reaches it a little later); then the old
version can be marked `retired` or removed.

`rotate_file(path, ...)` applies the same change to a TOML file in place with tomlkit, so its
comments and layout stay, after checking that the result is a valid config.
"""

from __future__ import annotations

import copy
import os
import re
import tempfile
import tomllib
from collections.abc import Callable, Mapping, MutableMapping
from datetime import datetime
from pathlib import Path
from typing import Any

import tomlkit
from tomlkit.items import AoT

from ratefleet.schemas.config import parse_config
from ratefleet.schemas.errors import ConfigError
from ratefleet.schemas.key_versions import IMPLICIT_VERSION_ID, is_literal, secret_ref_problem


class RotateError(ConfigError):
    """The rotation cannot be done as asked (unknown key, literal secret, bad time, ...); a
    config change refused, so a ConfigError. The message says why and what to do; it never
    contains a secret value."""


class UnknownKey(RotateError):
    """The key id is not in the config."""


def rotate(config: Mapping[str, Any], key_id: str, secret_ref: str, at: datetime) -> dict[str, Any]:
    """A copy of `config` (a config dict, e.g. from tomllib) with `key_id` rotated to a new
    version holding `secret_ref` (`env:NAME` or `file:PATH`) from `at` (aware datetime), as the
    module docstring describes. Raises RotateError."""
    rotated = copy.deepcopy(dict(config))
    rotate_entry(find_key(rotated, key_id), secret_ref, at)
    return rotated


def find_key(config: Mapping[str, Any], key_id: str) -> MutableMapping[str, Any]:
    """The table of key `key_id` in `config["pools"][*]["keys"]`; RotateError listing the known ids."""
    known = []
    for pool in (config.get("pools") or {}).values():
        for entry in pool.get("keys") or []:
            if entry.get("id") == key_id:
                return entry  # type: ignore[no-any-return]
            known.append(str(entry.get("id")))
    raise UnknownKey(f"unknown key id {key_id!r}; keys in the config: {', '.join(sorted(known)) or 'none'}")


def rotate_entry(entry: MutableMapping[str, Any], secret_ref: str, at: datetime) -> str:
    """Rotate one key table in place (a dict or a tomlkit table); returns the new version id."""
    _check_request(secret_ref, at)
    key_id = entry.get("id")
    if "versions" not in entry:
        if "secret" not in entry:
            raise RotateError(f"key {key_id!r} has neither `secret` nor `versions`")
        old = {"id": IMPLICIT_VERSION_ID, "secret": str(entry["secret"])}
        del entry["secret"]
        entry["versions"] = _versions_container(entry, [old])
    versions = entry["versions"]
    for version in versions:
        if str(version.get("secret")) == secret_ref:
            raise RotateError(f"{secret_ref} is already the secret of key {key_id!r} version {version.get('id')}; "
                              "for a file: secret, rewrite the file instead (workers re-read it)")
    for version in versions:
        if _active_at(version, at, key_id):
            version["not_after"] = at
    new_id = _next_id([str(v.get("id")) for v in versions])
    versions.append(_version_item(versions, {"id": new_id, "secret": secret_ref, "not_before": at}))
    return new_id


def rotate_file(path: Path, key_id: str, secret_ref: str, at: datetime,
                before_write: Callable[[], None] | None = None) -> str:
    """Rotate `key_id` in the TOML config file `path` in place (comments kept, written
    atomically with the file's mode); returns the new version id. RotateError when the
    rotation is refused or the edited file would not be a valid config (nothing written).
    `before_write`: called once the rotation is known to be valid, just before the write
    (what it raises leaves the file as it was)."""
    try:
        text = path.read_text()
    except OSError as exc:
        raise RotateError(f"{path}: cannot read the config file ({exc.strerror})") from None
    try:
        document = tomlkit.parse(text)
    except tomlkit.exceptions.ParseError as exc:
        raise RotateError(f"{path}: not valid TOML: {exc}") from None
    new_id = rotate_entry(find_key(document, key_id), secret_ref, at)
    edited = tomlkit.dumps(document)
    try:
        parse_config(tomllib.loads(edited), source=str(path))
    except (ConfigError, tomllib.TOMLDecodeError) as exc:
        raise RotateError(f"the rotated config would be invalid, nothing written:\n{exc}") from None
    if before_write is not None:
        before_write()
    _write_atomically(path, edited)
    return new_id


def _check_request(secret_ref: str, at: datetime) -> None:
    problem = secret_ref_problem(secret_ref, example="OPENAI_KEY_NEW")
    if problem:
        raise RotateError(f"--secret {problem}")
    if is_literal(secret_ref):
        raise RotateError("--secret takes a reference, env:NAME or file:PATH, never the secret itself "
                          "(it would stay in the shell history and the config file)")
    if at.utcoffset() is None:
        raise RotateError("--at needs a UTC offset (RFC 3339), e.g. 2026-12-01T00:00:00Z")


def _active_at(version: Mapping[str, Any], at: datetime, key_id: object) -> bool:
    """True when `version` would still be active at `at` (so it must end there)."""
    if version.get("status", "active") != "active":
        return False
    not_after = _time(version.get("not_after"))
    if not_after is not None and not_after <= at:
        return False
    not_before = _time(version.get("not_before"))
    if not_before is not None and not_before >= at:
        raise RotateError(f"key {key_id!r} version {version.get('id')} starts at {not_before.isoformat()}, "
                          "not before --at; choose a later --at or remove that version first")
    return True


def _time(value: Any) -> datetime | None:
    if value is None or isinstance(value, datetime):
        return value
    try:
        return datetime.fromisoformat(str(value))
    except ValueError:
        raise RotateError(f"not an RFC 3339 time: {value!r}") from None


def _next_id(ids: list[str]) -> str:
    numbers = [int(m.group(1)) for i in ids if (m := re.fullmatch(r"v(\d+)", i))]
    number = max(numbers, default=len(ids)) + 1
    while f"v{number}" in ids:
        number += 1
    return f"v{number}"


def _versions_container(entry: MutableMapping[str, Any], versions: list[dict[str, Any]]) -> Any:
    """The new `versions` value: a plain list, or for a tomlkit inline table a multi-line
    array of inline tables (a `[[...keys]]` table gets `[[...keys.versions]]` tables)."""
    if isinstance(entry, tomlkit.items.InlineTable):
        array = tomlkit.array()
        array.multiline(True)
        for version in versions:
            array.append(_inline(version))
        return array
    return versions


def _version_item(versions: Any, version: dict[str, Any]) -> Any:
    if isinstance(versions, tomlkit.items.Array):
        return _inline(version)
    return version if not isinstance(versions, AoT) else tomlkit.item(version)


def _inline(version: dict[str, Any]) -> Any:
    table = tomlkit.inline_table()
    table.update(version)
    return table


def _write_atomically(path: Path, text: str) -> None:
    mode = path.stat().st_mode & 0o7777
    handle, temp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(handle, "w") as out:
            out.write(text)
        os.chmod(temp, mode)
        os.replace(temp, path)
    except BaseException:
        Path(temp).unlink(missing_ok=True)
        raise
