"""Each caller's own limits, kept by one gateway process (pure: `now` is passed in).

Two token buckets per caller (`dispatcher.core.bucket.TokenBucket`, after
golang.org/x/time/rate):

- requests: `rps` per second up to `burst` (default max(1, rps)); a request needs one token;
- model tokens: `tokens_per_minute` / 60 per second up to `tokens_per_minute`. A request is
  charged an estimate when it is admitted (schemas/cost.py `estimate_tokens`, the estimate its
  job is charged on its key too: text characters / 4 plus max_tokens x n) and corrected with the answer's
  `usage.total_tokens` afterwards (the difference taken, or given back), so the bucket follows
  what the upstream really counted. A request is admitted while the bucket holds its estimate
  (capped at the bucket's capacity, so one large request is never refused forever).

The buckets live in the gateway process: with several gateway replicas each enforces the
caller's limits on its own share of the traffic (N replicas allow up to N times the limit).
"""

from __future__ import annotations

from dataclasses import dataclass

from ratefleet.dispatcher.core.bucket import TokenBucket
from ratefleet.gateway.callers import Caller


@dataclass
class Admission:
    """A request let through: what it was charged, to correct once the answer is in."""

    caller: str
    estimate: float
    mark: int | None  # the tokens bucket's mark of the charge (None: no tokens limit)


@dataclass(frozen=True)
class Refusal:
    """A request over the caller's limit: which one (`requests` or `tokens`) and when to retry (s)."""

    limit: str
    retry_after_s: float


class CallerLimits:
    """The buckets of every caller with limits, created on first use."""

    def __init__(self) -> None:
        self._requests: dict[str, TokenBucket] = {}
        self._tokens: dict[str, TokenBucket] = {}

    def _buckets(self, caller: Caller, now: float) -> tuple[TokenBucket | None, TokenBucket | None]:
        if caller.rps is not None and caller.name not in self._requests:
            capacity = caller.burst if caller.burst is not None else max(1.0, caller.rps)
            self._requests[caller.name] = TokenBucket(caller.rps, capacity, capacity, now)
        if caller.tokens_per_minute is not None and caller.name not in self._tokens:
            tpm = caller.tokens_per_minute
            self._tokens[caller.name] = TokenBucket(tpm / 60.0, tpm, tpm, now)
        return self._requests.get(caller.name), self._tokens.get(caller.name)

    def admit(self, caller: Caller, now: float, estimate: float) -> Admission | Refusal:
        """Let one request through (spending its request token and its token estimate) or say
        which limit refuses it and for how long (seconds, > 0)."""
        requests, tokens = self._buckets(caller, now)
        if requests is not None:
            ready = requests.ready_at(now, 1.0)
            if ready > now:
                return Refusal("requests", ready - now)
        if tokens is not None:
            ready = tokens.ready_at(now, min(estimate, tokens.capacity))
            if ready > now:
                return Refusal("tokens", ready - now)
        if requests is not None:
            requests.take(now, 1.0)
        mark = tokens.take(now, estimate) if tokens is not None else None
        return Admission(caller.name, estimate, mark)

    def settle(self, admission: Admission, now: float, used: float | None) -> None:
        """Correct the token charge with what the answer used (None: keep the estimate)."""
        tokens = self._tokens.get(admission.caller)
        if tokens is None or admission.mark is None or used is None:
            return
        if used > admission.estimate:
            tokens.take(now, used - admission.estimate)
        elif used < admission.estimate:
            tokens.refund(now, admission.estimate - used, admission.mark)
