"""Settings of the mock upstream: its keys, their limits, and how it misbehaves.

`MockSettings` is what the server starts from; `parse_key_spec` turns a CLI flag such as
``k1=SECRET:rps=20:burst=5:concurrency=4:cost_per_minute=9000`` into a `MockKey`.
Secrets are excluded from every ``repr`` so they cannot leak into logs or tracebacks.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass, field

LOOPBACK_HOSTS = frozenset({"127.0.0.1", "::1", "localhost"})


def _check_positive(name: str, value: float) -> None:
    if not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0):
        raise ValueError(f"{name} must be a positive number, got {value!r}")


def check_status(name: str, value: int | None) -> None:
    """Refuse anything that is not an HTTP status code (None means "not forced")."""
    if value is None:
        return
    # 1xx are not final answers, so they cannot be forced.
    if isinstance(value, bool) or not isinstance(value, int) or not 200 <= value <= 599:
        raise ValueError(f"{name} must be an HTTP status between 200 and 599, got {value!r}")


@dataclass(frozen=True)
class MockKey:
    """One API key the mock knows, with the limits it enforces for that key.

    ``rps``/``burst`` form the request token bucket, ``concurrency`` caps calls in
    flight, ``cost_per_minute`` is a second bucket charged ``tokens_per_call`` per call (or,
    without it, each call's size: the prompt's tokens plus max_tokens per choice),
    and ``status`` forces every answer for this key (e.g. 401 for a revoked key).
    """

    id: str
    secret: str = field(repr=False)
    rps: float
    burst: float
    concurrency: int | None = None
    cost_per_minute: float | None = None
    status: int | None = None

    def __post_init__(self) -> None:
        if not self.id:
            raise ValueError("key id must not be empty")
        if not self.secret:
            raise ValueError(f"key {self.id}: secret must not be empty")
        _check_positive(f"key {self.id}: rps", self.rps)
        if not (isinstance(self.burst, (int, float)) and math.isfinite(self.burst) and self.burst >= 1):
            # A bucket that can never hold one whole token would refuse every call.
            raise ValueError(f"key {self.id}: burst must be >= 1, got {self.burst!r}")
        if self.concurrency is not None and (
            isinstance(self.concurrency, bool) or not isinstance(self.concurrency, int) or self.concurrency < 1
        ):
            raise ValueError(f"key {self.id}: concurrency must be an integer >= 1, got {self.concurrency!r}")
        if self.cost_per_minute is not None:
            _check_positive(f"key {self.id}: cost_per_minute", self.cost_per_minute)
        check_status(f"key {self.id}: status", self.status)


@dataclass(frozen=True)
class MockSettings:
    """Everything the mock upstream starts from; runtime changes go through /_mock/config."""

    host: str = "127.0.0.1"
    port: int = 8900
    keys: tuple[MockKey, ...] = ()
    accept_unknown: bool = True
    default_rps: float = 20.0
    default_burst: float = 5.0
    latency_ms: float = 0.0
    latency_jitter_ms: float = 0.0
    fail_rate: float = 0.0
    fail_status: int = 500
    tokens_per_call: int | None = 10  # None: each call charged and answered by its size (api.py)
    auth_header: str = "Authorization"
    auth_scheme: str = "Bearer"
    seed: int = 0
    log_size: int = 100_000
    control_allow_remote: bool = False

    def __post_init__(self) -> None:
        object.__setattr__(self, "keys", tuple(self.keys))
        ids = [key.id for key in self.keys]
        secrets = [key.secret for key in self.keys]
        if len(set(ids)) != len(ids):
            raise ValueError("key ids must be unique")
        if len(set(secrets)) != len(secrets):
            raise ValueError("two keys share one secret")
        if not 0 <= self.port <= 65535:
            raise ValueError(f"port must be 0..65535, got {self.port!r}")
        _check_positive("default_rps", self.default_rps)
        if not (math.isfinite(self.default_burst) and self.default_burst >= 1):
            raise ValueError(f"default_burst must be >= 1, got {self.default_burst!r}")
        if self.latency_ms < 0 or self.latency_jitter_ms < 0:
            raise ValueError("latency_ms and latency_jitter_ms must be >= 0")
        if not 0 <= self.fail_rate <= 1:
            raise ValueError(f"fail_rate must be within 0..1, got {self.fail_rate!r}")
        check_status("fail_status", self.fail_status)
        if (self.tokens_per_call is not None and self.tokens_per_call < 0) or self.log_size < 1:
            raise ValueError("tokens_per_call must be >= 0 and log_size >= 1")


def unknown_key_id(secret: str) -> str:
    """Stable, non-reversible id for a secret the mock was not configured with."""
    return "unknown-" + hashlib.sha256(secret.encode()).hexdigest()[:8]


_NUMBER_FIELDS = {"rps": float, "burst": float, "cost_per_minute": float, "concurrency": int, "status": int}


def _parse_field(part: str) -> tuple[str, float | int]:
    name, sep, raw = part.partition("=")
    name = name.strip()
    if not sep or name not in _NUMBER_FIELDS:
        allowed = ", ".join(_NUMBER_FIELDS)
        raise ValueError(f"bad key spec part {name or part!r}: expected one of {allowed} as NAME=VALUE")
    kind = _NUMBER_FIELDS[name]
    try:
        return name, kind(raw.strip())
    except ValueError:
        raise ValueError(f"bad key spec part {name!r}: {raw.strip()!r} is not a valid {kind.__name__}") from None


def parse_key_spec(text: str, *, default_rps: float = 20.0, default_burst: float = 5.0) -> MockKey:
    """Parse ``ID=SECRET[:rps=R][:burst=B][:concurrency=C][:cost_per_minute=T][:status=S]``.

    Errors name the offending part but never the secret.
    """
    head, *parts = text.split(":")
    key_id, sep, secret = head.partition("=")
    key_id = key_id.strip()
    if not sep or not key_id or not secret:
        raise ValueError(f"bad key spec {key_id or '<empty>'!r}: must start with ID=SECRET")
    values: dict[str, float | int] = {"rps": default_rps, "burst": default_burst}
    seen: set[str] = set()
    for part in parts:
        name, value = _parse_field(part)
        if name in seen:
            raise ValueError(f"bad key spec part {name!r}: given twice")
        seen.add(name)
        values[name] = value
    return MockKey(id=key_id, secret=secret, **values)  # type: ignore[arg-type]
