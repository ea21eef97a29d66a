"""Who is calling the gateway: ratefleet keys -> callers -> tier, upstreams, models, limits.

A caller presents its ratefleet key as `Authorization: Bearer <key>` (what the OpenAI SDK
sends for `api_key`). The keys are resolved once at start exactly like key secrets
(`env:NAME`, `file:PATH` or a literal: `workers.secrets.SecretResolver`) and only their
SHA-256 digests are kept; a presented key is hashed and looked up. The key itself is never
stored, logged or put in an error.

A caller whose key cannot be used on this machine (variable unset or blank, file unreadable
or empty, not an HTTP header value) is left out, with the reason: its key then names no
caller (401) and every other caller is served. One caller's missing secret must not take the
gateway down for all of them (`ratefleet up` restarts a gateway that exits, forever).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

from ratefleet.schemas import Config
from ratefleet.schemas.config import CallerConfig
from ratefleet.schemas.errors import ConfigError, SecretUnavailable
from ratefleet.workers.secrets import SecretResolver


@dataclass(frozen=True)
class Caller:
    """One configured caller, without its key. `upstreams`/`models`: None means any."""

    name: str
    tier: str
    upstreams: tuple[str, ...] | None
    models: frozenset[str] | None
    timeout_s: float
    rps: float | None
    burst: float | None
    tokens_per_minute: float | None
    cache_ttl_s: float | None = None  # the answer cache (ratefleet/runtime/cache.py); None: off
    batch_tier: str | None = None  # the tier of its Batch API batches (Config.batch_tier); None: `tier`
    paths: tuple[str, ...] | None = None  # path patterns it may use (translate.check_path); None: the default rule

    @classmethod
    def from_config(cls, name: str, caller: CallerConfig, batch_tier: str | None = None) -> Caller:
        """`batch_tier`: where its Batch API batches run (`Config.batch_tier(name)`); None: `tier`."""
        return cls(name=name, tier=caller.tier, batch_tier=batch_tier,
                   upstreams=None if caller.upstreams is None else tuple(caller.upstreams),
                   models=None if caller.models is None else frozenset(caller.models),
                   timeout_s=caller.timeout_s, rps=caller.rps, burst=caller.burst,
                   tokens_per_minute=caller.tokens_per_minute, cache_ttl_s=caller.cache_ttl_s,
                   paths=None if caller.paths is None else tuple(caller.paths))


def key_digest(key: str) -> bytes:
    """SHA-256 of a caller key (UTF-8): what the gateway keeps instead of the key."""
    return hashlib.sha256(key.encode("utf-8", "surrogatepass")).digest()


def bearer_token(authorization: str | None) -> str | None:
    """The token of an `Authorization: Bearer <token>` header (scheme case-insensitive,
    RFC 6750 section 2.1), or None when there is none."""
    if not authorization:
        return None
    scheme, _, token = authorization.strip().partition(" ")
    token = token.strip()
    return token if scheme.lower() == "bearer" and token else None


def single_field(values: list[str]) -> str | None:
    """The one value of a header that may appear once (`Authorization`: RFC 9110 section 5.3,
    a singleton field), or None when it is absent or sent more than once: two keys in one
    request name no caller, rather than whichever came first."""
    return values[0] if len(values) == 1 else None


def _caller_key(name: str, caller: CallerConfig) -> str:
    """The caller's key, resolved here; SecretUnavailable (`.reason` names no value) when it cannot be used."""
    return SecretResolver._resolve(f"caller {name}", caller.key.get_secret_value())  # noqa: SLF001


def _caller_keys(config: Config) -> tuple[dict[str, str], dict[str, str]]:
    """({caller name: its key}, {caller name: why its key cannot be used here})."""
    keys: dict[str, str] = {}
    left_out: dict[str, str] = {}
    for name, caller in config.callers.items():
        try:
            keys[name] = _caller_key(name, caller)
        except SecretUnavailable as exc:
            left_out[name] = exc.reason
    return keys, left_out


def unusable_callers(config: Config) -> dict[str, str]:
    """{caller name: why its key cannot be used on this machine}, e.g. {"tpm": "TPM_KEY not
    set"}, for the callers a gateway started here would leave out; reasons never hold a key."""
    return _caller_keys(config)[1]


class CallerTable:
    """Callers by the SHA-256 digest of their key. `identify` never sees a stored key: a
    match needs a presented key with the same digest (a dict lookup of the digest, so the
    time taken says nothing about any stored key). `left_out`: {caller name: why its key
    cannot be used here} for the configured callers that are not in the table."""

    def __init__(self, by_digest: dict[bytes, Caller], left_out: dict[str, str] | None = None) -> None:
        self._by_digest = by_digest
        self.left_out = dict(left_out or {})

    @classmethod
    def from_config(cls, config: Config) -> CallerTable:
        """Resolve every caller's key. A caller whose key cannot be used here is left out
        (`left_out`, with the reason). ConfigError naming the caller (never the key) when two
        callers share a key, or when callers are configured and none of their keys can be used."""
        by_digest: dict[bytes, Caller] = {}
        keys, left_out = _caller_keys(config)
        for name, key in keys.items():
            digest = key_digest(key)
            if digest in by_digest:
                raise ConfigError(f"callers.{name}.key: the same key as caller {by_digest[digest].name!r}; "
                                  "every caller needs its own key")
            by_digest[digest] = Caller.from_config(name, config.callers[name], config.batch_tier(name))
        if left_out and not by_digest:
            listed = "; ".join(f"callers.{name}.key: {reason}" for name, reason in left_out.items())
            raise ConfigError(f"no caller has a usable key ({listed}); set the environment variables or secret "
                              "files for the gateway, or fix the callers' `key` in the config")
        return cls(by_digest, left_out)

    def __len__(self) -> int:
        return len(self._by_digest)

    def identify(self, authorization: str | None) -> Caller | None:
        """The caller whose key the `Authorization` header carries, or None."""
        token = bearer_token(authorization)
        return None if token is None else self._by_digest.get(key_digest(token))
