"""The TOML configuration, validated once at start.

`load_config()` finds the file (`--config`, `$RATEFLEET_CONFIG`, `./ratefleet.toml`) and
refuses a bad one with the file, the field and the reason. Secrets stay references
(`env:NAME`, `file:PATH` or a literal) until a worker resolves them.
"""

from __future__ import annotations

import os
import re
import tomllib
import warnings
from pathlib import Path
from typing import Any, Literal
from urllib.parse import SplitResult, urlsplit

from pydantic import BaseModel, ConfigDict, Field, SecretStr, ValidationError, field_validator, model_validator

from ratefleet.schemas.config_env import EnvOverrides
from ratefleet.schemas.config_nats import NatsAuthConfig
from ratefleet.schemas.config_tracing import TracingConfig
from ratefleet.schemas.errors import ConfigError
from ratefleet.schemas.job import UpstreamRoutes
from ratefleet.schemas.key_versions import (
    IMPLICIT_VERSION_ID,
    KeyVersion,
    check_versions,
    is_literal,
    secret_ref_problem,
)
from ratefleet.schemas.subjects import TOKEN_PATTERN

DEFAULT_TIERS = (("vip", 8), ("premium", 4), ("normal", 2), ("guest", 1))
DEFAULT_NATS_URL = "nats://127.0.0.1:4222"


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)  # TOML has inf and nan


class NatsConfig(NatsAuthConfig):
    """`[nats]`: where (url), the subject prefix, and credentials/TLS (schemas/config_nats.py)."""

    url: str = DEFAULT_NATS_URL
    prefix: str = Field(default="ratefleet", pattern=r"^[A-Za-z0-9_-]+$")
    embedded_dir: str = ".ratefleet/nats"

    @field_validator("url")
    @classmethod
    def _url(cls, value: str) -> str:
        """One NATS server URL or a comma-separated list, each `nats://`, `tls://`, `ws://` or
        `wss://` (the schemes nats-py connects with) with a host and a port from 1 to 65535 if
        any (credentials may ride in it: they are never repeated in the error)."""
        problem = nats_url_problem(value)
        if problem:
            raise ValueError(problem)
        return value


def nats_url_problem(value: str) -> str | None:
    """What makes `value` no NATS URL (one server or a comma-separated list, each `nats://`,
    `tls://`, `ws://` or `wss://` or no scheme, with a host and a port from 1 to 65535 if any),
    never repeating its credentials; None when it is one."""
    servers = [part.strip() for part in value.split(",") if part.strip()]
    if not servers:
        return "must name a NATS server, e.g. nats://127.0.0.1:4222"
    for server in servers:
        parsed = urlsplit(server if "://" in server else f"nats://{server}")  # (nats-py adds nats:// too)
        bad_host = bool(parsed.hostname and _NOT_HOST.search(parsed.hostname))  # "not a url" was tried as a host
        if parsed.scheme not in ("nats", "tls", "ws", "wss") or not _has_address(parsed) or bad_host:
            # HOST:PORT only: what follows the raw text's last "@" (a password holding / ? or # is cut
            # by urlsplit before its "@", so netloc could show part of it), up to the path
            rest = server.split("://", 1)[-1]
            address = re.split(r"[/?#]", rest.rpartition("@")[2], maxsplit=1)[0]
            shown = f"{parsed.scheme}://{address}" if parsed.scheme else "a server"
            why = ""
            if "@" in rest and "@" not in parsed.netloc:  # the "@" fell into the path: a / ? # before it
                why = " (credentials holding / ? # or @ must be percent-encoded, e.g. %2F for /)"
            elif bad_host:
                why = " (its host is no host name or address)"
            elif parsed.scheme in ("nats", "tls", "ws", "wss") and parsed.hostname:
                why = " (its port must be a number from 1 to 65535)"
            return (f"{shown} is not a NATS server URL{why}: use nats://HOST:PORT (or tls://, ws://, "
                    "wss://), several separated by commas")
    return None


_NOT_HOST = re.compile(r"[\s\x00-\x1f\x7f]")  # no host name or address holds white space or a control character


def _has_address(parsed: SplitResult) -> bool:
    """Whether a parsed URL names a host and, if it has a port, one from 1 to 65535."""
    try:
        port = parsed.port  # ValueError: not a number, or out of range
    except ValueError:
        return False
    return bool(parsed.hostname) and port != 0


class UpstreamConfig(_Strict):
    base_url: str
    auth_header: str = "Authorization"
    auth_scheme: str = "Bearer"
    timeout_s: float = Field(default=60.0, gt=0)
    usage_path: str | None = None

    @field_validator("base_url")
    @classmethod
    def _base_url(cls, value: str) -> str:
        """An http(s) URL with a host, a port in 1-65535 if any, no query or fragment (a job's
        path is appended to it) and no `user:password@`: credentials in it would reach
        `config show`, the stored config and logs, and the HTTP client refuses them next to the
        key's Authorization header (every call failed); a key's secret goes in
        `[[pools.<p>.keys]] secret` (sent in `auth_header`)."""
        if not value.startswith(("http://", "https://")):
            raise ValueError("must be an http:// or https:// URL")
        parsed = urlsplit(value)
        if parsed.username is not None or parsed.password is not None or "@" in parsed.netloc:
            raise ValueError("must not hold credentials (user:password@); put the key's secret in "
                             "pools.<pool>.keys[].secret (sent in the upstream's auth_header)")
        if not _has_address(parsed):
            raise ValueError("must name a host and, if any, a port from 1 to 65535 (e.g. https://api.openai.com)")
        if "?" in value or "#" in value:  # a job's path is appended: `/base?k=v` + `/v1/x` went as `/base?k=v/v1/x`
            raise ValueError("must not hold a query (?) or a fragment (#): each job's path is appended to it; put "
                             "query parameters in the job's request.query")
        return value.rstrip("/")

    @field_validator("usage_path")
    @classmethod
    def _usage_path(cls, value: str | None) -> str | None:
        """Dotted paths into the answer's JSON, several joined by `+` to be summed
        (workers/usage.py): a misspelt one (`usage..total_tokens`, a trailing `+`) would count
        nothing, every call, and the cost bucket would keep each job's estimate."""
        if value is None:
            return None
        for term in value.split("+"):
            if not all(part.strip() for part in term.strip().split(".")):
                raise ValueError(f"{value!r}: give dotted paths into the answer's JSON, several joined by '+', "
                                 "e.g. usage.total_tokens or usage.input_tokens+usage.output_tokens")
        return value


class KeyConfig(_Strict):
    """One key id of a pool: limits (they belong to the id, whatever version is in use) and
    its secret, either one `secret` reference or `versions` for rotation (see
    schemas/key_versions.py); exactly one of the two."""

    id: str = Field(pattern=TOKEN_PATTERN)
    secret: SecretStr | None = None
    versions: list[KeyVersion] | None = None
    # strict: a key's limits are numbers (an operator's trial: `concurrency = true` passed as 1 and
    # `rps = "10"` as 10); no environment variable sets them, so no string needs converting
    rps: float = Field(gt=0, strict=True)
    burst: float | None = Field(default=None, ge=1, strict=True)
    concurrency: int | None = Field(default=None, ge=1, strict=True)
    cost_per_minute: float | None = Field(default=None, gt=0, strict=True)

    @property
    def effective_burst(self) -> float:
        return self.burst if self.burst is not None else max(1.0, self.rps)

    @field_validator("secret")
    @classmethod
    def _secret_form(cls, value: SecretStr | None) -> SecretStr | None:
        problem = secret_ref_problem(value.get_secret_value()) if value is not None else None
        if problem:
            raise ValueError(problem)
        return value

    @field_validator("versions")
    @classmethod
    def _versions_form(cls, value: list[KeyVersion] | None) -> list[KeyVersion] | None:
        return check_versions(value) if value is not None else None

    @model_validator(mode="after")
    def _one_secret_form(self) -> KeyConfig:
        if (self.secret is None) == (self.versions is None):
            raise ValueError("give either `secret` or `versions` (a list of {id, secret, status, not_before, "
                             "not_after}), not " + ("both" if self.secret is not None else "neither"))
        return self

    def secret_versions(self) -> list[KeyVersion]:
        """The key's versions; a single `secret` is one active version with id `v1`."""
        if self.versions is not None:
            return self.versions
        assert self.secret is not None  # _one_secret_form
        return [KeyVersion(id=IMPLICIT_VERSION_ID, secret=self.secret)]

    @property
    def secret_is_literal(self) -> bool:
        return any(is_literal(version.secret_ref) for version in self.secret_versions())


class PoolConfig(_Strict):
    upstream: str | None = None
    keys: list[KeyConfig] = Field(min_length=1)


class SplitConfig(_Strict):
    """`[tiers.<t>.split]`: A/B routing. `share` (0..1) of the tier's jobs, chosen from the
    job id (sha256; the same id always lands on the same side), use the pool chain `pools`
    instead of the tier's own; a job whose upstream has no pool in `pools` stays on the
    tier's own chain. Results say which side ran them (`variant`: "control" or "split")."""

    pools: list[str] = Field(min_length=1)
    share: float = Field(ge=0, le=1)


class TierConfig(_Strict):
    weight: int = Field(default=1, ge=1, le=1000, strict=True)
    # None: every pool; an empty list would be a tier no job of which can ever run (each ended
    # no_key_available at once), so it is refused
    pools: list[str] | None = Field(default=None, min_length=1)
    split: SplitConfig | None = None
    max_attempts: int = Field(default=5, ge=1, le=100)
    # 429s are waits, not attempts: a job ends `rate_limited` only after this many (or at its deadline)
    max_rate_limited: int = Field(default=50, ge=1, le=10000)


KEEPALIVE_S = 4.0  # `[workers] keepalive_s`'s default (see WorkersConfig)


class WorkersConfig(_Strict):
    slots: int = Field(default=64, ge=1, le=10000)
    transport: Literal["aiohttp", "httpcore"] = "aiohttp"
    heartbeat_s: float = Field(default=1.0, gt=0)
    grace_s: float = Field(default=30.0, ge=0)
    id_prefix: str = Field(default="w", pattern=r"^[A-Za-z0-9_-]+$")
    # bytes of one upstream answer's body; past it the read stops and the job fails
    # `response_too_large` (not retried)
    max_response_bytes: int = Field(default=64 << 20, ge=1024)
    # seconds an idle upstream connection is kept for the next call. Under the 5 s after which
    # uvicorn (vLLM's and LiteLLM's servers) and Node close an idle connection: a call sent on a
    # connection the server is closing fails (ServerDisconnectedError) after being sent, and is
    # retried as an upstream error. httpx's and aiohttp's own default is 5 s
    keepalive_s: float = Field(default=KEEPALIVE_S, gt=0, le=3600)


class DispatcherConfig(_Strict):
    policy: Literal["weighted", "strict"] = "weighted"
    window: int = Field(default=64, ge=1, le=100000)
    lease_ttl_s: float = Field(default=3.0, ge=0.5)
    worker_timeout_s: float = Field(default=3.0, gt=0)
    breaker_fail_max: int = Field(default=5, ge=1)
    breaker_reset_s: float = Field(default=30.0, gt=0)
    cooldown_base_s: float = Field(default=1.0, gt=0)
    cooldown_max_s: float = Field(default=60.0, gt=0)
    retry_after_max_s: float = Field(default=3600.0, gt=0)  # the longest wait a provider's answer can impose on a key
    safety_ms: float = Field(default=50.0, ge=0)
    priority_reserve: float = Field(default=1.0, ge=0)
    priority_slots: int = Field(default=1, ge=0)  # worker slots lower tiers leave for the top tier (see README)
    adaptive_rate: bool = True  # keys' effective rates follow 429s and ratelimit headers (never above rps)
    rate_decrease: float = Field(default=0.5, gt=0, lt=1)  # a 429 multiplies the rate sent by this
    rate_recover_s: float = Field(default=5.0, gt=0)  # successes bring it back near the 429 point in this long
    # past the 429 point, successes add this fraction of rps per second (0.05: floor to rps in ~20 s)
    rate_increase_per_s: float = Field(default=0.05, gt=0, le=1)
    first_burst: float | None = Field(default=2.0, ge=1)  # a key's burst until its first answer (none: as configured)
    key_probe_s: float = Field(default=60.0, gt=0)  # a key disabled on provider evidence gets a probe job after this
    key_probe_max_s: float = Field(default=3600.0, gt=0)  # each failed probe doubles the delay, up to this


class StreamsConfig(_Strict):
    jobs_max_msgs: int = Field(default=1_000_000, ge=-1)
    jobs_max_bytes: int = Field(default=-1, ge=-1)
    max_job_bytes: int = Field(default=1 << 20, ge=256)
    ack_wait_s: float = Field(default=10.0, ge=1)
    max_deliver: int = Field(default=20, ge=2)
    duplicate_window_s: float = Field(default=600.0, gt=0)
    results_max_age_s: float = Field(default=86400.0, gt=0)
    dead_max_age_s: float = Field(default=7 * 86400.0, gt=0)
    replicas: int = Field(default=1, ge=1, le=5)

    @model_validator(mode="after")
    def _results_outlive_dedup(self) -> StreamsConfig:
        # a job sent again after its Result expired but inside the dedup window is dropped as a
        # duplicate of a message already acked: it never runs and no Result ever comes
        if self.results_max_age_s < self.duplicate_window_s:
            raise ValueError(f"results_max_age_s ({self.results_max_age_s:g}) is shorter than duplicate_window_s "
                             f"({self.duplicate_window_s:g}): a job re-sent after its Result expired but within "
                             "the dedup window would be dropped as a duplicate and never end (`submit --wait` "
                             "would wait for it for ever); make results_max_age_s at least duplicate_window_s")
        return self


# -- the gateway (`ratefleet gateway`): callers and where it listens -------------------------



class CallerConfig(_Strict):
    """`[callers.<name>]`: who may call the gateway, on which tier, with which limits.

    `key` is the caller's ratefleet key (sent as `Authorization: Bearer <key>`), given like a
    key secret: `env:NAME`, `file:PATH` or a literal (local use; warns). The gateway keeps only
    its SHA-256 digest. `upstreams` / `models` (None: any) restrict what the caller may use;
    `rps` + `burst` (requests per second, token bucket) and `tokens_per_minute` (model tokens,
    charged from the answer's `usage.total_tokens`) are the caller's own limits, kept by each
    gateway process; `timeout_s` is how long one request may take, queue wait included.
    `cache_ttl_s` (seconds; None: off) answers a repeated identical request from the fleet's
    cache for that long (see ratefleet/runtime/cache.py). `batch_tier` is the tier its Batch
    API batches run on (None: the config's lowest tier, its last): a batch's lines queue in
    order within their tier, so on the caller's own tier they would hold back its online
    requests until the batch ends. OpenAI runs Batch API work apart from online requests, within
    a 24-hour window ("Batch API" guide); the lowest tier is ratefleet's form of that. `paths`
    (None: every path but the provider account's stored objects, ratefleet/gateway/translate.py
    `check_path`) are the request paths the caller may use, as shell-style patterns (`*` any
    characters, Python's fnmatch), e.g. `/openai/deployments/*/chat/completions`."""

    key: SecretStr
    tier: str
    batch_tier: str | None = None
    upstreams: list[str] | None = None
    models: list[str] | None = None
    rps: float | None = Field(default=None, gt=0, strict=True)
    burst: float | None = Field(default=None, ge=1, strict=True)
    tokens_per_minute: float | None = Field(default=None, gt=0, strict=True)
    timeout_s: float = Field(default=60.0, gt=0, strict=True)
    cache_ttl_s: float | None = Field(default=None, gt=0, strict=True)
    paths: list[str] | None = None

    @field_validator("paths")
    @classmethod
    def _path_patterns(cls, value: list[str] | None) -> list[str] | None:
        for pattern in value or []:
            if not pattern.startswith("/"):
                raise ValueError(f"{pattern!r} is no path: each starts with / (e.g. /v1/chat/completions, "
                                 "/openai/deployments/*/chat/completions)")
        return value

    @field_validator("key")
    @classmethod
    def _key_form(cls, value: SecretStr) -> SecretStr:
        problem = secret_ref_problem(value.get_secret_value(), "RATEFLEET_CALLER_KEY", "/run/secrets/caller")
        if problem:
            raise ValueError(problem)
        return value

    @property
    def key_is_literal(self) -> bool:
        return not self.key.get_secret_value().startswith(("env:", "file:"))


class CacheConfig(_Strict):
    """`[cache]`: the fleet's answer cache (KV bucket `ratefleet_cache`). `max_ttl_s` is the
    bucket's max age, so the upper bound of any entry's life (a longer `cache_ttl_s` is
    capped); `max_entry_bytes` the largest entry kept (bigger answers are not cached)."""

    max_ttl_s: float = Field(default=86400.0, gt=0)
    max_entry_bytes: int = Field(default=512 << 10, ge=1024)


def split_listen(value: str, *, example: str = "127.0.0.1:8080", any_port: bool = False) -> tuple[str, int]:
    """`HOST:PORT` or `[IPv6]:PORT`, port 1-65535 in ASCII digits (0 too with `any_port`: the
    system picks one) -> (host without brackets, port). ValueError saying what to give
    otherwise (`example` shows the form): an IPv6 address without brackets (`::1`, the port
    forgotten, read as host `:` and port 1) included. One parser for `[gateway] listen`,
    `--listen` and `--http`."""
    host, sep, port = value.rpartition(":")
    lowest = 0 if any_port else 1
    if not sep or not (port.isascii() and port.isdigit()) or not lowest <= int(port) < 65536 or not host.strip("[]"):
        raise ValueError(f"give HOST:PORT, e.g. {example}")
    if ":" in host and not (host.startswith("[") and host.endswith("]")):
        raise ValueError(f"write an IPv6 address in brackets, e.g. [::1]:{example.rpartition(':')[2]}")
    return host.strip("[]"), int(port)


class GatewayConfig(_Strict):
    """`[gateway]`: `listen` is the HOST:PORT `ratefleet gateway` (and `up --gateway`) serves on."""

    listen: str = "127.0.0.1:8080"

    @field_validator("listen")
    @classmethod
    def _listen(cls, value: str) -> str:
        """HOST:PORT (or [IPv6]:PORT), port 1-65535: refused here, so a bad `[gateway] listen` or
        `RATEFLEET_GATEWAY_LISTEN` is named like any other field (the gateway only parses it)."""
        try:
            split_listen(value)
        except ValueError as exc:
            raise ValueError(f"{value!r}: {exc}") from None
        return value


class Config(_Strict):
    """The whole file. Tiers are listed highest priority first."""

    nats: NatsConfig = NatsConfig()
    upstreams: dict[str, UpstreamConfig] = Field(default_factory=dict)
    pools: dict[str, PoolConfig] = Field(default_factory=dict)
    tiers: dict[str, TierConfig] = Field(default_factory=dict)
    workers: WorkersConfig = WorkersConfig()
    dispatcher: DispatcherConfig = DispatcherConfig()
    streams: StreamsConfig = StreamsConfig()
    callers: dict[str, CallerConfig] = Field(default_factory=dict)
    gateway: GatewayConfig = GatewayConfig()
    cache: CacheConfig = CacheConfig()
    tracing: TracingConfig = TracingConfig()
    # where a job, or a pool, that names no upstream goes when several are configured (one upstream:
    # that one, whatever this says; "" or unset with several: nowhere, a job must name one). Applied
    # live. Set it when adding a second upstream: the queued jobs that name none, and the producers
    # that send such jobs, keep going to the first (a break-it trial's push of a second upstream
    # ended about 100 of 200 queued jobs `invalid` / `unknown_upstream`)
    default_upstream: str | None = None

    @model_validator(mode="before")
    @classmethod
    def _defaults(cls, data: Any) -> Any:
        if isinstance(data, dict) and not data.get("tiers"):
            pools = list((data.get("pools") or {}).keys())
            data = {**data, "tiers": {name: {"weight": w, "pools": pools} if pools else {"weight": w}
                                      for name, w in DEFAULT_TIERS}}  # no pools at all: a client's file
        return data

    @model_validator(mode="after")
    def _references(self) -> Config:
        for section, names in (("tiers", self.tiers), ("pools", self.pools), ("upstreams", self.upstreams)):
            for name in names:
                if not name.replace("_", "a").replace("-", "a").isalnum():
                    raise ValueError(f"{section}.{name}: name {name!r} must match [A-Za-z0-9_-]+")
        if self.default_upstream and self.default_upstream not in self.upstreams:
            raise ValueError(f"default_upstream: unknown upstream {self.default_upstream!r}; "
                             f"known: {sorted(self.upstreams)}")
        seen: set[str] = set()
        for pool_name, pool in self.pools.items():
            upstream = self.pool_upstream(pool_name)
            if upstream not in self.upstreams:
                raise ValueError(f"pools.{pool_name}.upstream: unknown upstream {upstream!r}; "
                                 f"known: {sorted(self.upstreams)}")
            for key in pool.keys:
                if key.id in seen:
                    raise ValueError(f"pools.{pool_name}.keys: key id {key.id!r} is used twice")
                seen.add(key.id)
        for tier_name, tier in self.tiers.items():
            for pool_name in tier.pools or []:
                if pool_name not in self.pools:
                    raise ValueError(f"tiers.{tier_name}.pools: unknown pool {pool_name!r}; known: {sorted(self.pools)}")
            for pool_name in tier.split.pools if tier.split else []:
                if pool_name not in self.pools:
                    raise ValueError(f"tiers.{tier_name}.split.pools: unknown pool {pool_name!r}; "
                                     f"known: {sorted(self.pools)}")
        return self

    @model_validator(mode="after")
    def _heartbeat_inside_worker_timeout(self) -> Config:
        # a leader gives up a worker not heard of for worker_timeout_s, and a worker drops what it
        # reads after such a silence of its own: beats that far apart mean every job is dropped
        beat, timeout = self.workers.heartbeat_s, self.dispatcher.worker_timeout_s
        if beat >= timeout:
            raise ValueError(f"workers.heartbeat_s ({beat:g}) must be below dispatcher.worker_timeout_s ({timeout:g}), "
                             "ideally a third of it: a worker beating less often is given up by the leader "
                             "between its beats and drops the assignments it reads then")
        return self

    @model_validator(mode="after")
    def _caller_references(self) -> Config:
        for name, caller in self.callers.items():
            if caller.tier not in self.tiers:
                raise ValueError(f"callers.{name}.tier: unknown tier {caller.tier!r}; known: {list(self.tiers)}")
            if caller.batch_tier is not None and caller.batch_tier not in self.tiers:
                raise ValueError(f"callers.{name}.batch_tier: unknown tier {caller.batch_tier!r}; "
                                 f"known: {list(self.tiers)}")
            for upstream in caller.upstreams or []:
                if upstream not in self.upstreams:
                    raise ValueError(f"callers.{name}.upstreams: unknown upstream {upstream!r}; "
                                     f"known: {sorted(self.upstreams)}")
        return self

    def pool_upstream(self, pool_name: str) -> str | None:
        pool = self.pools[pool_name]
        if pool.upstream:
            return pool.upstream
        if (implicit := self.implicit_upstream()) is not None:
            return implicit
        raise ValueError(f"pools.{pool_name}.upstream: required when more than one upstream is configured "
                         "and none is the default_upstream")

    def tier_pools(self, tier: str) -> list[str]:
        pools = self.tiers[tier].pools
        return list(self.pools) if pools is None else pools

    def batch_tier(self, caller: str) -> str:
        """The tier caller `caller`'s Batch API batches run on: its `batch_tier`, else the lowest
        tier (the last listed) with a pool for each upstream the caller may use, else its own
        tier. KeyError for an unknown caller. (A reviewer's finding on the first version: the
        lowest tier's pools served another upstream, and every line of a batch ended
        `no_key_available`.)"""
        entry = self.callers[caller]
        if entry.batch_tier is not None:
            return entry.batch_tier
        return next((tier for tier in reversed(list(self.tiers)) if not self.unserved(tier, caller)), entry.tier)

    def unserved(self, tier: str, caller: str) -> list[str]:
        """The upstreams caller `caller` may use (its `upstreams`, else every one) that no pool of
        `tier` calls. Raises KeyError for an unknown tier or caller."""
        served = set()
        for pool in self.tier_pools(tier):
            try:
                served.add(self.pool_upstream(pool))
            except ValueError:  # (refused when the config is read: several upstreams, a pool naming none)
                continue
        return [upstream for upstream in self.callers[caller].upstreams or list(self.upstreams) if upstream not in served]

    def upstream_routes(self) -> UpstreamRoutes:
        """The upstreams as `upstream_problem` checks a job against them: name -> the header the
        keys go in, and `default_upstream` (the dispatcher's intake and `ratefleet submit`)."""
        return UpstreamRoutes({name: upstream.auth_header for name, upstream in self.upstreams.items()},
                              self.default_upstream)

    def implicit_upstream(self) -> str | None:
        """Where a job or pool that names no upstream goes: the only upstream, else
        `default_upstream` (None: nowhere; such a job ends `invalid` / `unknown_upstream`)."""
        if len(self.upstreams) == 1:
            return next(iter(self.upstreams))
        return self.default_upstream or None

    def keys(self) -> dict[str, KeyConfig]:
        return {key.id: key for pool in self.pools.values() for key in pool.keys}


def config_path(explicit: str | os.PathLike[str] | None) -> Path | None:
    """The config file to use: explicit, else $RATEFLEET_CONFIG, else ./ratefleet.toml if present."""
    if explicit:
        return Path(explicit)
    from_env = EnvOverrides().config
    if from_env:
        return Path(from_env)
    default = Path("ratefleet.toml")
    return default if default.exists() else None


def parse_config(data: dict[str, Any], *, source: str = "<config>") -> Config:
    try:
        config = Config.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(_describe(exc, source)) from None
    for key_id, key in config.keys().items():
        if key.secret_is_literal:
            warnings.warn(f"{source}: key {key_id!r} has a literal secret; use env:NAME or file:PATH outside local tests",
                          stacklevel=2)
    for name in config.nats.literal_secrets():
        warnings.warn(f"{source}: nats.{name} is a literal secret; use env:NAME or file:PATH outside local tests",
                      stacklevel=2)
    for name, caller in config.callers.items():
        if caller.key_is_literal:
            warnings.warn(f"{source}: caller {name!r} has a literal key; use env:NAME or file:PATH outside local tests",
                          stacklevel=2)
    return config


def load_config(path: str | os.PathLike[str] | None = None, *, nats_url: str | None = None) -> Config:
    """Load and validate the config; raise ConfigError naming the file, the field and why."""
    data, source = _read_config(path, nats_url)
    return parse_config(data, source=source)


def load_nats_only(path: str | os.PathLike[str] | None = None, *, nats_url: str | None = None) -> Config:
    """The config with only its `[nats]` section read (env overrides and `nats_url` applied as by
    `load_config`), for client commands that need nothing else: an error in another section
    (a half-done edit of a key) must not lock an operator out of `status` or `results`.
    Raises ConfigError when the file cannot be read or `[nats]` itself is invalid."""
    data, source = _read_config(path, nats_url)
    nats = data.get("nats")
    return parse_config({"nats": nats if isinstance(nats, dict) else {}}, source=source)


def _read_config(path: str | os.PathLike[str] | None, nats_url: str | None) -> tuple[dict[str, Any], str]:
    """The config file's TOML (none: `{}`) with the RATEFLEET_* overrides (config_env.py) and
    `nats_url` (a flag: it wins) applied, and the source to name in errors. Raises
    ConfigError when the file is missing or not TOML."""
    found = config_path(path)
    data: dict[str, Any] = {}
    source = "<defaults>" if found is None else str(found)
    if found is not None:
        try:
            data = tomllib.loads(found.read_text())
        except FileNotFoundError:
            raise ConfigError(f"{source}: no such config file (pass --config FILE or set RATEFLEET_CONFIG)") from None
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"{source}: not valid TOML: {exc}") from None
    data, used = EnvOverrides().apply(data)
    if nats_url:
        data = {**data, "nats": {**data.get("nats", {}), "url": nats_url}}
        # (the flag wins: name it, not only the file; typer passes $RATEFLEET_NATS_URL as the flag too)
        used = [*(name for name in used if name != "RATEFLEET_NATS_URL"), "--nats or $RATEFLEET_NATS_URL"]
    return data, f"{source} (with {', '.join(used)})" if used else source


def _describe(error: ValidationError, source: str) -> str:
    lines = []
    for item in error.errors(include_url=False):
        where = ".".join(str(p) for p in item["loc"])
        message = item["msg"].removeprefix("Value error, ")
        lines.append(f"{source}: {where}: {message}" if where else f"{source}: {message}")
    return "invalid configuration:\n  " + "\n  ".join(lines)
