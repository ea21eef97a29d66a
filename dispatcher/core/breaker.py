"""A key's circuit breaker: aiobreaker's state machine, timed by the core's monotonic `now`.

aiobreaker keeps the failure counter, `fail_max` and the closed/open/half-open transitions;
outcomes are fed to it through `CircuitBreaker.call` with a function that returns (a
success) or raises a marker exception (a failure). What it gets wrong for us is time: its
open -> half-open step reads `utcnow()`, and `opens_at`/`time_until_open` mix UTC with
local time, so they are wrong outside UTC. This wrapper therefore owns the timing, in the
style of sony/gobreaker:

* it records `opened_at = now` (monotonic) when aiobreaker reports the transition to OPEN
  (through a listener) and calls `half_open()` itself once `now >= opened_at + reset`;
* it never reads aiobreaker's time properties and never calls `call` while OPEN;
* half-open admits exactly one probe in flight (aiobreaker alone lets every call through);
* every state change starts a new generation; an outcome reserved under an older
  generation does not feed the breaker, so late results cannot flip a fresh state;
* while closed, a job's failures count once until the key's next success: `fail_max`
  consecutive failures means that many different jobs failed in a row. One request the
  upstream always answers 500 (retried on the same key, the only one of its pool) opened
  the breaker on its own before and held every other caller's requests for the reset
  timeout (a gateway trial: the next healthy request waited 15 s, then timed out).

Verdicts (`verdict`): upstream_error is a failure, ok a success; rate_limited, bad_request
and key_error do not count while closed. For the half-open probe, rate_limited and
bad_request count as a success: the upstream answered coherently, which is what the probe
asks (a 429 also cools the key down, so traffic does not rush back). A key_error probe only
frees the probe slot: the key is disabled anyway.
"""

from __future__ import annotations

from datetime import timedelta
from enum import StrEnum
from typing import Any

from aiobreaker import CircuitBreaker, CircuitBreakerError, CircuitBreakerListener
from aiobreaker.state import CircuitBreakerState

from ratefleet.schemas.outcome import OutcomeKind

from .types import BreakerPolicy


class BreakerState(StrEnum):
    """The three states, named as the status output spells them."""

    CLOSED = "closed"
    OPEN = "open"
    HALF_OPEN = "half_open"


_FROM_AIOBREAKER = {
    CircuitBreakerState.CLOSED: BreakerState.CLOSED,
    CircuitBreakerState.OPEN: BreakerState.OPEN,
    CircuitBreakerState.HALF_OPEN: BreakerState.HALF_OPEN,
}


class _CallFailed(Exception):
    """Marker raised inside `CircuitBreaker.call` to report a failed upstream call."""


class _OnStateChange(CircuitBreakerListener):  # type: ignore[misc]  # aiobreaker ships no type information
    def __init__(self, owner: KeyBreaker) -> None:
        self._owner = owner

    def state_change(self, breaker: CircuitBreaker, old: Any, new: Any) -> None:  # aiobreaker's CircuitBreakerState (untyped)
        if old is None or old.state is not new.state:
            self._owner._changed(new.state)


def verdict(kind: OutcomeKind, probe: bool) -> bool | None:
    """True = success, False = failure, None = does not feed the breaker."""
    if kind == OutcomeKind.UPSTREAM_ERROR:
        return False
    if kind == OutcomeKind.OK:
        return True
    if probe and kind in (OutcomeKind.RATE_LIMITED, OutcomeKind.BAD_REQUEST):
        return True
    return None


class KeyBreaker:
    """One key's breaker: state, generation, monotonic `opened_at` and the probe slot."""

    def __init__(self, policy: BreakerPolicy, name: str) -> None:
        self.reset_timeout_s = policy.reset_timeout_s
        self.generation = 0
        self.opened_at: float | None = None
        self.probe: int | None = None  # reservation id of the half-open probe in flight
        self._now = 0.0
        self._failed_jobs: set[str] = set()  # jobs that failed since the last success (closed only)
        self._cb = CircuitBreaker(
            fail_max=policy.fail_max,
            timeout_duration=timedelta(seconds=policy.reset_timeout_s),
            listeners=[_OnStateChange(self)],
            name=name,
        )

    @property
    def state(self) -> BreakerState:
        return _FROM_AIOBREAKER[self._cb.current_state]

    def gate(self, now: float) -> float | None:
        """When the breaker admits a call: `now`, a later time (open), or None (probe busy).

        Moves OPEN to HALF_OPEN when the reset timeout has passed.
        """
        if self.state is BreakerState.OPEN:
            reopen = self._half_open_at()
            if now < reopen:
                return reopen
            self._now = now
            self._cb.half_open()
        if self.state is BreakerState.HALF_OPEN and self.probe is not None:
            return None
        return now

    def view(self, now: float) -> BreakerState:
        """The state as of `now`, without moving it (for status output)."""
        if self.state is BreakerState.OPEN and now >= self._half_open_at():
            return BreakerState.HALF_OPEN
        return self.state

    def take_probe(self, reservation_id: int) -> bool:
        """Claim the probe slot if half-open; returns whether the call is the probe."""
        if self.state is not BreakerState.HALF_OPEN:
            return False
        self.probe = reservation_id
        return True

    def release_probe(self, reservation_id: int) -> bool:
        """Free the probe slot if `reservation_id` holds it; returns whether it did."""
        if self.probe is not None and self.probe == reservation_id:
            self.probe = None
            return True
        return False

    def settle(self, reservation_id: int, generation: int, kind: OutcomeKind, now: float,
               job_id: str | None = None) -> None:
        """Feed one outcome: frees the probe, then counts it if from the current generation
        (a failure of `job_id` only once until the next success, while closed; None: always)."""
        was_probe = self.release_probe(reservation_id)
        if generation != self.generation or self.state is BreakerState.OPEN:
            return
        success = verdict(kind, was_probe)
        if success is None:
            return
        if success:
            self._failed_jobs.clear()
        elif self.state is BreakerState.CLOSED and job_id is not None:
            if job_id in self._failed_jobs:
                return  # this job's own failure again: no more evidence against the key
            self._failed_jobs.add(job_id)
        self._feed(success, now)

    def _feed(self, success: bool, now: float) -> None:
        def outcome() -> None:
            if not success:
                raise _CallFailed

        self._now = now
        try:
            self._cb.call(outcome)
        except (_CallFailed, CircuitBreakerError):
            pass

    def _half_open_at(self) -> float:
        assert self.opened_at is not None
        return self.opened_at + self.reset_timeout_s

    def _changed(self, new: CircuitBreakerState) -> None:
        self.generation += 1
        self.probe = None
        self._failed_jobs.clear()
        if new is CircuitBreakerState.OPEN:
            self.opened_at = self._now
