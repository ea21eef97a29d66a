"""Per-key limits of the mock upstream, as plain arithmetic over a `now` passed in.

A `KeyLimiter` combines a request token bucket (``burst`` capacity, ``rps`` refill), an
optional cost bucket (``cost_per_minute`` capacity, refilled per second) and an optional
cap on calls in flight. `admit` checks all three and spends only when all pass, so a
refused call costs nothing. Buckets refill lazily from timestamps: exact, no polling.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from ratefleet.mock.settings import MockKey

# Float slack when comparing token levels, so 0.9999999999 tokens counts as one whole
# token both when admitting and when reporting x-ratelimit-remaining-*.
EPSILON = 1e-9


@dataclass
class TokenBucket:
    """A token bucket whose level is computed from the last stamp when read."""

    rate: float
    capacity: float
    level: float
    stamp: float

    @classmethod
    def full(cls, rate: float, capacity: float, now: float) -> TokenBucket:
        return cls(rate=rate, capacity=capacity, level=capacity, stamp=now)

    def level_at(self, now: float) -> float:
        """Level at `now` (changes nothing; a clock reading older than the stamp counts as the stamp)."""
        return min(self.capacity, self.level + max(0.0, now - self.stamp) * self.rate)

    def wait_for(self, amount: float, now: float) -> float:
        """Seconds from `now` until `amount` tokens are available (inf if never)."""
        if amount > self.capacity:
            return math.inf
        deficit = amount - self.level_at(now)
        return deficit / self.rate if deficit > EPSILON else 0.0

    def time_to_full(self, now: float) -> float:
        return (self.capacity - self.level_at(now)) / self.rate

    def take(self, amount: float, now: float) -> None:
        """Spend `amount` tokens at `now`; the caller has checked they are there."""
        self.level = self.level_at(now) - amount
        self.stamp = max(self.stamp, now)

    def refill(self, now: float) -> None:
        self.level = self.capacity
        self.stamp = max(self.stamp, now)


@dataclass(frozen=True)
class BucketView:
    """What the x-ratelimit-* headers report about one bucket after a decision."""

    limit: int
    remaining: int
    reset_s: float


@dataclass(frozen=True)
class Admission:
    """The verdict on one call: admitted, or refused with the reason and when to retry."""

    allowed: bool
    reason: str | None
    retry_after_s: float
    requests: BucketView
    tokens: BucketView | None


def _view(bucket: TokenBucket, now: float) -> BucketView:
    return BucketView(
        limit=math.floor(bucket.capacity),
        remaining=max(0, math.floor(bucket.level_at(now) + EPSILON)),
        reset_s=bucket.time_to_full(now),
    )


class KeyLimiter:
    """All limits of one key; the only state is its two buckets and the in-flight count."""

    def __init__(self, key: MockKey, now: float) -> None:
        self.requests = TokenBucket.full(key.rps, key.burst, now)
        self.tokens = (
            TokenBucket.full(key.cost_per_minute / 60.0, key.cost_per_minute, now)
            if key.cost_per_minute is not None
            else None
        )
        self.concurrency = key.concurrency
        self.in_flight = 0

    def admit(self, now: float, cost: float = 0.0) -> Admission:
        """Admit one call costing `cost` at `now`, spending only when every limit allows it."""
        reason, retry_after = self._refusal(now, cost)
        if reason is None:
            self.requests.take(1.0, now)
            if self.tokens is not None:
                self.tokens.take(cost, now)
            self.in_flight += 1
        return Admission(
            allowed=reason is None,
            reason=reason,
            retry_after_s=retry_after,
            requests=_view(self.requests, now),
            tokens=_view(self.tokens, now) if self.tokens is not None else None,
        )

    def _refusal(self, now: float, cost: float) -> tuple[str | None, float]:
        if self.concurrency is not None and self.in_flight >= self.concurrency:
            return "concurrency", 0.0
        wait = self.requests.wait_for(1.0, now)
        if wait > 0:
            return "requests", wait
        if self.tokens is not None:
            if cost > self.tokens.capacity:
                return "too_large", math.inf  # larger than the whole budget: no wait makes it fit
            wait = self.tokens.wait_for(cost, now)
            if wait > 0:
                return "tokens", wait
        return None, 0.0

    def settle(self, charged: float, used: float, now: float) -> None:
        """Correct a call's charge of `charged` tokens to the `used` its answer reports
        (Anthropic's output tokens: reserved from max_tokens on entry, adjusted at the end);
        the bucket never goes above its capacity."""
        if self.tokens is not None and used != charged:
            self.tokens.level = min(self.tokens.capacity, self.tokens.level_at(now) + charged - used)
            self.tokens.stamp = max(self.tokens.stamp, now)

    def release(self) -> None:
        """A call admitted earlier has finished."""
        self.in_flight = max(0, self.in_flight - 1)

    def refill(self, now: float) -> None:
        self.requests.refill(now)
        if self.tokens is not None:
            self.tokens.refill(now)


def format_duration(seconds: float) -> str:
    """OpenAI/Go style duration, rounded up to the millisecond: "20ms", "1.5s", "6m0s"."""
    if math.isinf(seconds):
        return "inf"
    millis = math.ceil(round(seconds * 1000.0, 6))
    if millis <= 0:
        return "0s"
    if millis < 1000:
        return f"{millis}ms"
    hours, rest = divmod(millis, 3_600_000)
    minutes, rest = divmod(rest, 60_000)
    text = f"{rest / 1000:.3f}".rstrip("0").rstrip(".") + "s"
    if hours or minutes:
        text = f"{minutes}m{text}"
    if hours:
        text = f"{hours}h{text}"
    return text


def retry_after_seconds(wait_s: float) -> int:
    """Retry-After value: whole seconds, rounded up, at least 1."""
    if math.isinf(wait_s):
        return 60
    return max(1, math.ceil(round(wait_s, 6)))


def ratelimit_headers(admission: Admission) -> dict[str, str]:
    """The x-ratelimit-* headers (and Retry-After when refused) for one verdict."""
    headers = {
        "x-ratelimit-limit-requests": str(admission.requests.limit),
        "x-ratelimit-remaining-requests": str(admission.requests.remaining),
        "x-ratelimit-reset-requests": format_duration(admission.requests.reset_s),
    }
    if admission.tokens is not None:
        headers["x-ratelimit-limit-tokens"] = str(admission.tokens.limit)
        headers["x-ratelimit-remaining-tokens"] = str(admission.tokens.remaining)
        headers["x-ratelimit-reset-tokens"] = format_duration(admission.tokens.reset_s)
    if not admission.allowed and admission.reason != "too_large":
        headers["retry-after"] = str(retry_after_seconds(admission.retry_after_s))
    return headers
