"""A key's effective rate: what the provider really allows, learned from its answers.

The configured rate is a ceiling the operator promises, not a fact: a key shared with
someone else, or on a lower plan than the config says, gets 429s at a fraction of it. So
each key's bucket refills at an *effective* rate that always stays within
[floor, configured] (floor = `floor_fraction` x configured) and moves on three signals:

    429 (a fresh one)   effective = decrease x min(effective, rate actually sent)
                        (the caller passes the rate sent only when its window
                        holds enough calls to say something); the rate that drew
                        it is remembered as the peak, the return target is
                        target_fraction x that rate
    header hint         effective and target drop to the rate the provider's
                        x-ratelimit-* / ratelimit-* headers imply (`header_rate`);
                        when the lowest hint of the last HINT_WINDOW_S is well above
                        the target (a key recovering from an outage of 429s), the
                        target rises to HINT_TRUST x that hint
    success             below the target: a linear (additive) return to it over
                        `recover_s`; between the target and the peak: a slow probe
                        of `probe_per_s` x target per second; above the peak: an
                        additive increase of `increase_per_s` x configured per
                        second; never above configured

This is AIMD (as in TCP congestion avoidance, RFC 5681 section 3.1) with the memory of
where the last 429 happened, as CUBIC (RFC 9438) keeps W_max: the rate returns quickly
to just below the point that failed, creeps past it, and once past it climbs by a fixed
share of the configured rate per second, so 429s stay rare while the key is used near
what it is really allowed, and a key pulled down by an outage of 429s is back at its
configured rate within 1 / increase_per_s seconds of successes (20 s by default), with
or without rate-limit headers. Time between successes counts as climbing only up to
max(`idle_cap_s`, IDLE_CALLS / rate), the spacing of a key used at its own rate, so an
idle key does not jump on its first answer. Everything takes `now` (monotonic seconds).
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

HINT_WINDOW_S = 10.0  # header hints are upper bounds: the lowest recent one is the tightest
HINT_TRUST = 0.95  # the share of that bound a recovering key returns to before probing
IDLE_CALLS = 2.0  # a gap of up to this many calls at the current rate is use, not idleness


@dataclass(frozen=True)
class AdaptPolicy:
    """How a key's effective rate moves; `enabled=False` keeps the configured rate.

    decrease: factor applied on a 429 (0 < decrease < 1).
    target_fraction: the rate to return to after a 429, as a fraction of the rate that drew it.
    recover_s: seconds of successes to return from the dropped rate to that target.
    probe_per_s: between the target and the peak (the rate that drew the last 429), growth
        per second of successes, as a fraction of the target.
    increase_per_s: above the peak, growth per second of successes, as a fraction of the
        configured rate (0.05: from the floor to configured in about 20 s).
    floor_fraction: the effective rate never goes below this fraction of the configured one.
    first_burst: until a key's first answer comes back, its burst is at most this many
        requests (None: the configured burst). A config claiming more than the provider
        allows would otherwise spend its whole claimed burst into 429s before the first
        answer (and its headers) could say so; the rate itself is not held back.
    """

    enabled: bool = True
    decrease: float = 0.5
    target_fraction: float = 0.9
    recover_s: float = 5.0
    probe_per_s: float = 0.02
    increase_per_s: float = 0.05
    floor_fraction: float = 0.01
    first_burst: float | None = None

    def __post_init__(self) -> None:
        if not (0 < self.decrease < 1 and 0 < self.target_fraction <= 1 and 0 < self.floor_fraction <= 1):
            raise ValueError("decrease must be in (0, 1); target_fraction and floor_fraction in (0, 1]")
        if self.recover_s <= 0 or self.probe_per_s < 0 or self.increase_per_s <= 0:
            raise ValueError("recover_s and increase_per_s must be > 0, probe_per_s >= 0")
        if self.first_burst is not None and self.first_burst < 1:
            raise ValueError("first_burst must be >= 1 when set")


PACING_HORIZON_S = 60.0  # seconds: a reset further off is a quota's, not a pace to keep (`header_rate`)


def header_rate(limit: float | None, remaining: float | None, reset_s: float | None) -> float | None:
    """The refill rate (units/s) a provider's limit/remaining/reset triple implies, or None.

    For a token bucket, reset is the time until it is full again: (limit - level) / rate,
    so rate <= (limit - remaining) / reset (remaining rounds the level down). For a fixed
    window, remaining / reset is what is left per second of the window. The larger of the
    two is an upper bound for a token bucket and within a factor 2 of a fixed window's
    limit / window, so capping the effective rate with it never starves a key.

    A reset further off than PACING_HORIZON_S is a quota (a day's requests: Groq's
    x-ratelimit-*-requests are per day, an IETF policy of w=86400), not a pace: what remains
    may be spent within the horizon, and the key is cooled until the reset once nothing
    remains (key.py `_resync`). Paced over the whole reset instead, a Groq key that had used
    half its day was held at 0.167 req/s of its 4 (a provider trial: 24 of 120 jobs in 60 s).
    So past the horizon the bound is max(used / reset, remaining / PACING_HORIZON_S).
    """
    if limit is None or remaining is None or reset_s is None or reset_s <= 0 or limit <= 0:
        return None
    used = max(0.0, limit - remaining)
    if reset_s > PACING_HORIZON_S:
        rate = max(used / reset_s, max(0.0, remaining) / PACING_HORIZON_S)
    else:
        rate = max(used, remaining) / reset_s
    return rate if rate > 0 else None


class AdaptiveRate:
    """The effective rate of one bucket (requests/s or cost units/s) of one key."""

    def __init__(self, configured: float, policy: AdaptPolicy, now: float) -> None:
        if configured <= 0:
            raise ValueError("configured rate must be > 0")
        self.configured = configured
        self.policy = policy
        self.floor = configured * policy.floor_fraction
        self.rate = configured
        self.target = configured
        self.peak = configured  # the rate that drew the last 429 (no 429 yet: configured)
        self._low = configured  # where the last drop left the rate; the return starts here
        self._at = now
        self._hints: deque[tuple[float, float]] = deque(maxlen=64)

    def on_success(self, now: float, idle_cap_s: float = 2.0) -> None:
        """A call went through: climb, by the time since the last change (at most
        max(`idle_cap_s`, IDLE_CALLS / rate), so a key idle for an hour does not jump on
        its first answer while a key held at a low rate still climbs per second)."""
        if not self.policy.enabled:
            return
        cap = max(idle_cap_s, IDLE_CALLS / self.rate)
        elapsed = min(cap, max(0.0, now - self._at))
        self._at = max(self._at, now)
        if self.rate < self.target * (1 - 1e-9):
            step = (self.target - self._low) * elapsed / self.policy.recover_s
            self.rate = min(self.target, self.rate + step)
        else:
            per_s = self.configured * self.policy.increase_per_s
            if self.rate < self.peak:  # near the point that failed: creep
                per_s = self.target * self.policy.probe_per_s
            self.rate += per_s * elapsed
            self.target = self.rate
        self._clamp()

    def on_throttle(self, now: float, sent_rate: float | None) -> None:
        """A fresh 429: drop below the rate that drew it (the effective rate, or the rate
        actually sent when that was lower, e.g. because workers were the limit). The
        caller passes `sent_rate` None when too few calls were sent to measure it: a
        quiet key's lone call says nothing about the rate the provider refused."""
        if not self.policy.enabled:
            return
        drawn = self.rate if sent_rate is None or sent_rate <= 0 else min(self.rate, sent_rate)
        self.peak = drawn
        self.target = drawn * self.policy.target_fraction
        self.rate = self._low = drawn * self.policy.decrease
        self._at = max(self._at, now)
        self._clamp()

    def on_hint(self, now: float, rate: float | None) -> None:
        """The provider's headers imply at most `rate`: never run above it."""
        if not self.policy.enabled or rate is None:
            return
        self._hints.append((now, rate))
        while self._hints and self._hints[0][0] < now - HINT_WINDOW_S:
            self._hints.popleft()
        if rate < self.rate:
            self.rate = self._low = rate
        self.target = min(self.target, rate)
        room = HINT_TRUST * min(hint for _, hint in self._hints)
        if room > self.target and room > self.rate:
            self.target, self._low = room, self.rate
        self._at = max(self._at, now)
        self._clamp()

    def reconfigure(self, configured: float) -> None:
        """A new configured rate (a live config change). A rate running at the old configured
        rate moves to the new one; an adapted (lowered) rate keeps its value, capped at the
        new configured rate. ValueError for a rate <= 0."""
        if configured <= 0:
            raise ValueError("configured rate must be > 0")
        at_full = self.rate >= self.configured * (1 - 1e-9)
        self.configured = configured
        self.floor = configured * self.policy.floor_fraction
        if at_full:
            self.rate = self.target = self.peak = self._low = configured
        self._clamp()

    def _clamp(self) -> None:
        self.rate = min(self.configured, max(self.floor, self.rate))
        self.target = min(self.configured, max(self.floor, self.target))
        self._low = min(self.rate, max(self.floor, self._low))
        self.peak = min(self.configured, max(self.floor, self.peak))
