"""Environment overrides of the common settings (`RATEFLEET_*`, read with pydantic-settings).

Precedence, highest first: a command-line flag (`--nats`, `--slots`, `--config`), then the
environment, then the config file, then the default. A value from the environment is
validated like the file's (the error names the field, e.g. `workers.slots`, and the
variable). Only settings that belong to one process are overridable; the fleet's shared
settings (keys, pools, tiers) come from the file or from `ratefleet config push`.

| variable | setting |
|---|---|
| RATEFLEET_CONFIG | the config file (`--config`) |
| RATEFLEET_NATS_URL | `[nats].url` (`--nats`) |
| RATEFLEET_NATS_PREFIX | `[nats].prefix` |
| RATEFLEET_WORKERS_SLOTS | `[workers].slots` (`--slots`) |
| RATEFLEET_WORKERS_TRANSPORT | `[workers].transport` |
| RATEFLEET_WORKERS_HEARTBEAT_S | `[workers].heartbeat_s` |
| RATEFLEET_WORKERS_GRACE_S | `[workers].grace_s` |
| RATEFLEET_WORKERS_KEEPALIVE_S | `[workers].keepalive_s` |
| RATEFLEET_DISPATCHER_LEASE_TTL_S | `[dispatcher].lease_ttl_s` |
| RATEFLEET_GATEWAY_LISTEN | `[gateway].listen` |
"""

from __future__ import annotations

from typing import Any

from pydantic_settings import BaseSettings, SettingsConfigDict

# field name -> (config section, field in it); the variable is RATEFLEET_<FIELD NAME>
OVERRIDES: dict[str, tuple[str, str]] = {
    "nats_url": ("nats", "url"),
    "nats_prefix": ("nats", "prefix"),
    "workers_slots": ("workers", "slots"),
    "workers_transport": ("workers", "transport"),
    "workers_heartbeat_s": ("workers", "heartbeat_s"),
    "workers_grace_s": ("workers", "grace_s"),
    "workers_keepalive_s": ("workers", "keepalive_s"),
    "dispatcher_lease_ttl_s": ("dispatcher", "lease_ttl_s"),
    "gateway_listen": ("gateway", "listen"),
}


class EnvOverrides(BaseSettings):
    """The `RATEFLEET_*` variables that are set (module docstring); values are strings,
    validated when laid over the config (`apply`)."""

    model_config = SettingsConfigDict(env_prefix="RATEFLEET_", extra="ignore", case_sensitive=False)

    config: str | None = None
    nats_url: str | None = None
    nats_prefix: str | None = None
    workers_slots: str | None = None
    workers_transport: str | None = None
    workers_heartbeat_s: str | None = None
    workers_grace_s: str | None = None
    workers_keepalive_s: str | None = None
    dispatcher_lease_ttl_s: str | None = None
    gateway_listen: str | None = None

    def apply(self, data: dict[str, Any]) -> tuple[dict[str, Any], list[str]]:
        """`data` (parsed TOML) with every set override laid over it, and the names of the
        variables used (empty values count as unset)."""
        out = dict(data)
        used = []
        for name, (section, field) in OVERRIDES.items():
            value = getattr(self, name)
            if value:
                out[section] = {**(out.get(section) or {}), field: value}
                used.append(f"RATEFLEET_{name.upper()}")
        return out, used
