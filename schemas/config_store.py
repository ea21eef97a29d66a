"""The fleet config as stored in the KV bucket `ratefleet_config` (key `current`).

`ratefleet config push FILE` validates the file, refuses it when it holds a literal secret
(only references, `env:NAME` / `file:PATH`, are stored: each worker resolves them itself),
and stores a `StoredConfig` document; its KV revision is the config revision. Every
dispatcher and worker follows the bucket and applies a new revision live (`fleet_view`):

* applied live: `[upstreams]`, `default_upstream`, `[pools]` (keys, limits), `[tiers]` (weights,
  pools, max_attempts, max_rate_limited), `[dispatcher].policy`, `.priority_reserve` and
  `.priority_slots`;
* stored and shown, not applied by anyone: every other section; each process takes those
  from its own file or environment when it starts (a process started after a push runs the
  live sections of the stored revision over its own file). `[nats]` is never stored: how a
  process reaches NATS is its own business.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

from pydantic import BaseModel

from ratefleet.schemas.config import Config, parse_config
from ratefleet.schemas.errors import ConfigError

CURRENT_KEY = "current"
LIVE_SECTIONS = ("upstreams", "pools", "tiers")  # (`fleet_view`)
LIVE_SETTINGS = ("default_upstream",)  # top-level settings applied live
LIVE_DISPATCHER_FIELDS = ("policy", "priority_reserve", "priority_slots")
LOCAL_SECTIONS = ("nats",)


class StoredConfig(BaseModel):
    """One revision's document (JSON in the KV value). `config`: the file's tables as parsed
    TOML, secrets as references only, without `[nats]`; `source`: the file it came from;
    `pushed_at`: epoch seconds; `sha256`: of `config` as canonical JSON (a push of the same
    content is not a new revision)."""

    format: int = 1
    config: dict[str, Any]
    source: str
    pushed_at: float
    sha256: str
    pushed_by: str | None = None

    def validated(self, revision: int | None = None) -> Config:
        """The stored config, validated again (a document written by other means than
        `config push`); ConfigError naming the revision, the field and why."""
        where = f"config revision {revision}" if revision is not None else self.source
        return parse_config(self.config, source=where)


def literal_secrets(config: Config) -> list[str]:
    """Where `config` holds a literal secret (field path and id; never the value)."""
    found = []
    for pool_name, pool in config.pools.items():
        for index, key in enumerate(pool.keys):
            if key.secret_is_literal:
                found.append(f"pools.{pool_name}.keys.{index}.secret (key {key.id!r})")
    for name, caller in config.callers.items():
        if caller.key_is_literal:
            found.append(f"callers.{name}.key")
    return found


class LiteralSecretRefused(ConfigError):
    """A config that is valid but holds a literal secret, so it cannot be pushed (stored in NATS)."""


def storable(data: dict[str, Any], *, source: str, pushed_at: float, pushed_by: str | None = None) -> StoredConfig:
    """The document to push for a parsed TOML file: validated (ConfigError with the file,
    the field and why), refused when it holds a literal secret (LiteralSecretRefused, a
    ConfigError, naming where) or defines no key (ConfigError: pushed live it would take every
    key from the running fleet; an operations trial emptied the watched file for 3 s and 242 of
    300 queued jobs ended `no_key_available` or `unknown_upstream` without a call; `ratefleet up`
    refuses such a file at start the same way), `[nats]` left out."""
    config = parse_config(data, source=source)
    if not config.keys():
        raise ConfigError(f"{source}: refused: it defines no API keys, and pushed live it would leave the fleet no key "
                          "to call (queued jobs would end failed / no_key_available); a fleet config needs "
                          "[pools.NAME] with keys = [...] (an empty or half-written file reads this way; the fleet "
                          "keeps its running revision)")
    literals = literal_secrets(config)
    if literals:
        raise LiteralSecretRefused(f"{source}: refused: a pushed config is stored in NATS and must hold secret references only "
                          "(env:NAME or file:PATH, resolved by each worker); literal secret at "
                          + ", ".join(literals))
    kept = {name: value for name, value in data.items() if name not in LOCAL_SECTIONS}
    digest = hashlib.sha256(json.dumps(kept, sort_keys=True, default=str).encode()).hexdigest()
    return StoredConfig(config=kept, source=source, pushed_at=pushed_at, sha256=digest, pushed_by=pushed_by)


def fleet_view(local: Config, stored: Config) -> Config:
    """The config a process runs: its own, with the live sections of the stored revision
    (module docstring). Both are validated configs; the live sections reference only each
    other, so the result is consistent."""
    live_dispatcher = {name: getattr(stored.dispatcher, name) for name in LIVE_DISPATCHER_FIELDS}
    return local.model_copy(update={
        **{name: getattr(stored, name) for name in (*LIVE_SECTIONS, *LIVE_SETTINGS)},
        "dispatcher": local.dispatcher.model_copy(update=live_dispatcher)})

