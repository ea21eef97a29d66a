"""Everything the running mock remembers: keys and their limiters, runtime knobs, stats, log.

One `MockState` is built per app from `MockSettings` and lives on the event loop that
serves it; nothing here reads the clock, callers pass `now` (monotonic seconds).
"""

from __future__ import annotations

import random
from collections import Counter, deque
from dataclasses import asdict, dataclass, field
from typing import Any

from ratefleet.mock.limits import KeyLimiter
from ratefleet.mock.settings import MockKey, MockSettings, check_status, unknown_key_id

# Strangers (unknown secrets) remembered at most; beyond this they get 401, so a client
# inventing secrets cannot grow the mock without bound.
MAX_UNKNOWN_KEYS = 10_000
TOKENS_WINDOW_S = 60.0  # the window of a key's max_tokens_per_minute


@dataclass
class KeyStats:
    """Counters for one key; `calls` counts every request that presented it."""

    calls: int = 0
    ok: int = 0
    rate_limited: int = 0
    errors: int = 0
    rejected: int = 0
    max_in_flight: int = 0
    tokens: int = 0  # tokens the admitted calls used (their usage.total_tokens)
    max_tokens_per_minute: int = 0  # the most `tokens` of calls admitted within any 60 s
    first_at: float | None = None
    last_at: float | None = None

    def count_status(self, status: int) -> None:
        if 200 <= status < 300:
            self.ok += 1
        elif status == 429:
            self.rate_limited += 1
        elif status >= 500:
            self.errors += 1
        elif status >= 400:
            self.rejected += 1


@dataclass
class KeyEntry:
    """A key the mock answers for: its limits, the status forced on it, its counters."""

    key: MockKey
    limiter: KeyLimiter
    forced_status: int | None
    stats: KeyStats = field(default_factory=KeyStats)
    _minute: deque[tuple[float, int]] = field(default_factory=deque, repr=False)
    _minute_sum: int = 0

    def count_tokens(self, tokens: int, now: float) -> None:
        """Add an admitted call's `tokens` at `now` (s) to the total and the 60 s peak."""
        self.stats.tokens += tokens
        self._minute.append((now, tokens))
        self._minute_sum += tokens
        while self._minute and self._minute[0][0] <= now - TOKENS_WINDOW_S:
            self._minute_sum -= self._minute.popleft()[1]
        self.stats.max_tokens_per_minute = max(self.stats.max_tokens_per_minute, self._minute_sum)

    def arrive(self, now: float) -> None:
        self.stats.calls += 1
        if self.stats.first_at is None:
            self.stats.first_at = now
        self.stats.last_at = now

    def note_in_flight(self) -> None:
        self.stats.max_in_flight = max(self.stats.max_in_flight, self.limiter.in_flight)

    def as_json(self) -> dict[str, Any]:
        return {**asdict(self.stats), "in_flight": self.limiter.in_flight}


@dataclass
class RuntimeConfig:
    """The knobs /_mock/config may change while the mock runs."""

    latency_ms: float
    latency_jitter_ms: float
    fail_rate: float
    fail_status: int


def _checked_number(changes: dict[str, Any], name: str, low: float, high: float) -> float | None:
    if name not in changes:
        return None
    value = changes[name]
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not low <= value <= high:
        raise ValueError(f"{name} must be a number within {low}..{high}, got {value!r}")
    return float(value)


class MockState:
    """Key registry, runtime knobs, counters and the request log of one mock upstream."""

    def __init__(self, settings: MockSettings, now: float) -> None:
        self.settings = settings
        self.config = RuntimeConfig(
            settings.latency_ms, settings.latency_jitter_ms, settings.fail_rate, settings.fail_status
        )
        self._by_secret: dict[str, KeyEntry] = {}
        self._by_id: dict[str, KeyEntry] = {}
        self._configured_ids = frozenset(key.id for key in settings.keys)
        for key in settings.keys:
            self._add(key, now)
        self.requests = 0
        self.hosts: Counter[str] = Counter()
        self.log: deque[tuple[float, str | None, str, str, int, str]] = deque(maxlen=settings.log_size)
        self._seed_randomness()

    def _seed_randomness(self) -> None:
        self._fail_random = random.Random(self.settings.seed)
        self._latency_random = random.Random(self.settings.seed + 1)

    def _add(self, key: MockKey, now: float) -> KeyEntry:
        entry = KeyEntry(key=key, limiter=KeyLimiter(key, now), forced_status=key.status)
        self._by_secret[key.secret] = entry
        self._by_id[key.id] = entry
        return entry

    def resolve(self, secret: str | None, now: float) -> KeyEntry | None:
        """The entry for `secret`, creating a default-limits one for strangers if allowed."""
        if not secret:
            return None
        entry = self._by_secret.get(secret)
        strangers = len(self._by_id) - len(self._configured_ids)
        if entry is None and self.settings.accept_unknown and strangers < MAX_UNKNOWN_KEYS:
            stranger = MockKey(
                id=unknown_key_id(secret),
                secret=secret,
                rps=self.settings.default_rps,
                burst=self.settings.default_burst,
            )
            entry = self._add(stranger, now)
        return entry

    def record(self, entry: KeyEntry | None, request: tuple[str, str, str], status: int, now: float) -> None:
        """Count one answered API request; `request` is (method, path, host)."""
        method, path, host = request
        self.requests += 1
        self.hosts[host] += 1
        self.log.append((now, entry.key.id if entry else None, method, path, status, host))
        if entry is not None:
            entry.stats.count_status(status)

    def should_fail(self) -> bool:
        rate = self.config.fail_rate
        return rate > 0 and self._fail_random.random() < rate

    def latency_s(self) -> float:
        """One sample of the added latency: uniform around the mean, never negative."""
        mean, jitter = self.config.latency_ms, self.config.latency_jitter_ms
        if jitter > 0:
            mean += self._latency_random.uniform(-jitter, jitter)
        return max(0.0, mean) / 1000.0

    def stats(self) -> dict[str, Any]:
        """Counters; ``first_at``/``last_at`` are this process's `time.monotonic` at arrival."""
        return {
            "requests": self.requests,
            "keys": {key_id: entry.as_json() for key_id, entry in self._by_id.items()},
            "hosts": dict(self.hosts),
        }

    def recent(self, limit: int) -> list[dict[str, Any]]:
        names = ("t", "key", "method", "path", "status", "host")
        rows = list(self.log)[-limit:] if limit > 0 else []
        return [dict(zip(names, row)) for row in rows]

    def configuration(self) -> dict[str, Any]:
        return {
            **asdict(self.config),
            "keys_status": {key_id: entry.forced_status for key_id, entry in self._by_id.items()},
        }

    def configure(self, changes: dict[str, Any]) -> dict[str, Any]:
        """Apply a validated subset of knobs; nothing changes unless all of it is valid."""
        unknown = set(changes) - {*asdict(self.config), "keys_status"}
        if unknown:
            raise ValueError(f"unknown config fields: {', '.join(sorted(unknown))}")
        latency = _checked_number(changes, "latency_ms", 0, 3_600_000)
        jitter = _checked_number(changes, "latency_jitter_ms", 0, 3_600_000)
        fail_rate = _checked_number(changes, "fail_rate", 0, 1)
        fail_status = changes.get("fail_status", self.config.fail_status)
        check_status("fail_status", fail_status)
        statuses = self._checked_key_statuses(changes.get("keys_status", {}))
        self.config = RuntimeConfig(
            latency_ms=self.config.latency_ms if latency is None else latency,
            latency_jitter_ms=self.config.latency_jitter_ms if jitter is None else jitter,
            fail_rate=self.config.fail_rate if fail_rate is None else fail_rate,
            fail_status=fail_status,
        )
        for key_id, status in statuses.items():
            self._by_id[key_id].forced_status = status
        return self.configuration()

    def _checked_key_statuses(self, statuses: Any) -> dict[str, int | None]:
        if not isinstance(statuses, dict):
            raise ValueError("keys_status must be an object {key id: status or null}")
        for key_id, status in statuses.items():
            if key_id not in self._by_id:
                raise ValueError(f"keys_status: unknown key id {key_id!r}")
            check_status(f"keys_status.{key_id}", status)
        return statuses

    def reset(self, now: float) -> None:
        """Zero the counters and log, refill every bucket, forget idle strangers.

        In-flight counts survive, so a concurrency cap still holds across a reset.
        """
        for key_id, entry in list(self._by_id.items()):
            if key_id not in self._configured_ids and entry.limiter.in_flight == 0:
                del self._by_id[key_id]
                del self._by_secret[entry.key.secret]
                continue
            entry.limiter.refill(now)
            entry.stats = KeyStats(max_in_flight=entry.limiter.in_flight)
            entry._minute.clear()
            entry._minute_sum = 0
        self.requests = 0
        self.hosts.clear()
        self.log.clear()
        self._seed_randomness()
