"""Values that cross the scheduling core's boundary.

Specs (what the operator configured), jobs and reservations (what the shell hands in and
gets back), decisions (what `Scheduler.next` returns for the shell to carry out) and
outcomes (what a worker reports after a call). All are frozen dataclasses: the core never
keeps a reference it expects the shell to mutate.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

from ratefleet.schemas.internal import OutcomeReport
from ratefleet.schemas.outcome import OutcomeKind, RateLimitInfo
from ratefleet.schemas.result import ErrorCode
from ratefleet.schemas.signals import MODEL_UNAVAILABLE_CODES

from .adaptive import AdaptPolicy
from .split import SplitSpec

Policy = Literal["weighted", "strict"]


@dataclass(frozen=True)
class KeySpec:
    """One API key's limits: token bucket (rps, burst), calls in flight, cost per minute."""

    id: str
    pool: str
    upstream: str
    rps: float
    burst: float
    concurrency: int | None = None
    cost_per_minute: float | None = None


@dataclass(frozen=True)
class PoolSpec:
    """A named group of keys of one upstream."""

    name: str
    upstream: str
    keys: tuple[KeySpec, ...]


@dataclass(frozen=True)
class TierSpec:
    """A priority tier: its share under weighted scheduling and its pool fallback chain;
    `split`: A/B routing of a share of its jobs to another chain (split.py), None: off."""

    name: str
    weight: int
    pools: tuple[str, ...]
    split: SplitSpec | None = None


@dataclass(frozen=True)
class BreakerPolicy:
    """Open a key's breaker after `fail_max` consecutive upstream errors; probe after the reset."""

    fail_max: int = 5
    reset_timeout_s: float = 30.0


@dataclass(frozen=True)
class CooldownPolicy:
    """n consecutive 429s on a key cool it down base_s * 2**(n-1), capped at max_s.

    A Retry-After is a floor under that backoff (the longer of the two), never a way
    around it: `Retry-After: 0` on repeated 429s still backs off exponentially.
    A wait the provider names (Retry-After, an x-ratelimit-reset at 0 remaining) counts up to
    `retry_after_max_s` seconds: a daily quota may say 86,400 s, a faulty or hostile answer a
    million; the key is then tried again after that long, and another 429 cools it again.
    """

    base_s: float = 1.0
    max_s: float = 60.0
    retry_after_max_s: float = 3600.0


@dataclass(frozen=True)
class ProbePolicy:
    """A key disabled on provider evidence gets one real job as a probe `base_s` after it was
    disabled; each failed probe doubles the delay, capped at `max_s` (seconds). Like the
    breaker's half-open probe, but for credentials."""

    base_s: float = 60.0
    max_s: float = 3600.0


@dataclass(frozen=True)
class SchedulerSpec:
    """Everything the scheduler needs; tiers are listed highest priority first.

    `safety_s`: a request bucket never uses the last `safety_s * rps` tokens of its burst
    (capacity stays >= 1), and a cost bucket the last `safety_s` of its cost rate (but for a
    job that needs the whole budget), so network jitter cannot compress a burst into the
    provider's own bucket.

    `priority_reserve`: while the highest tier has nothing queued, lower tiers leave this
    many request tokens on every key whose capacity allows it, so a top-tier job that
    arrives gets a key at once instead of waiting for the next refill. It costs no
    throughput (the bucket just hovers that much higher) and lapses as soon as top-tier
    jobs are queued, so weighted shares under contention are unchanged. 0 turns it off.

    `priority_slots`: while the highest tier has nothing queued, lower tiers leave this many
    worker slots free (at most one in SLOT_RESERVE_SHARE of all slots: none below 8), so a
    top-tier job that arrives while slow calls of a bulk tier fill every slot gets one at once
    instead of waiting for a call to end (slots filled together free together: a whole call's
    length). Costs at most that share of throughput when slots, not keys, are the limit. 0 turns
    it off.

    `adapt`: how each key's effective rate follows 429s and ratelimit headers
    (see adaptive.py); `AdaptPolicy(enabled=False)` keeps every key at its configured rate.
    """

    pools: tuple[PoolSpec, ...]
    tiers: tuple[TierSpec, ...]
    policy: Policy = "weighted"
    breaker: BreakerPolicy = BreakerPolicy()
    cooldown: CooldownPolicy = CooldownPolicy()
    probe: ProbePolicy = ProbePolicy()
    safety_s: float = 0.05
    priority_reserve: float = 0.0
    priority_slots: int = 0
    adapt: AdaptPolicy = AdaptPolicy()


@dataclass(frozen=True)
class PendingJob:
    """A queued job as the core sees it; `handle` is the shell's opaque companion object."""

    job_id: str
    tier: str
    upstream: str
    cost: float = 1.0
    handle: Any = field(default=None, compare=False)
    model: str | None = None  # the model it asks for (schemas/job.py requested_model): keys known to lack it wait
    estimated: bool = False  # `cost` is the fleet's estimate (the job gave none): never a reason to refuse it


@dataclass(frozen=True)
class Reservation:
    """Tokens, a concurrency slot and (when `probe`) the half-open probe, held for one call.

    `generation` is the key's breaker generation at reservation time; an outcome from an
    older generation does not feed the breaker. `adopted` marks a placeholder returned by
    `Scheduler.adopt_in_flight` (a call a previous leader started; no tokens, no tier).
    """

    id: int
    job: PendingJob
    key_id: str
    pool: str
    cost: float
    generation: int
    at: float
    probe: bool
    adopted: bool = False
    key_probe: bool = False  # the probe of a key disabled on provider evidence (keyhealth.py)
    denial_final: bool = True  # a "denied" (401/403, a model's 404) ends the job: it has no other key left to try


@dataclass(frozen=True)
class Dispatch:
    """Run `job` on `key_id` now; the tokens are already spent."""

    job: PendingJob
    key_id: str
    pool: str
    reservation: Reservation
    variant: str | None = None  # A/B routing: "control" or "split"; None when the tier has no split


@dataclass(frozen=True)
class Reject:
    """`job` can never run with the current configuration; `message` says what to change."""

    job: PendingJob
    code: ErrorCode
    message: str


@dataclass(frozen=True)
class WaitUntil:
    """Nothing is dispatchable before `at` (monotonic seconds)."""

    at: float


@dataclass(frozen=True)
class Idle:
    """Nothing to do until add(), complete(), cancel() or adopt changes something."""


Decision = Dispatch | Reject | WaitUntil | Idle


@dataclass(frozen=True)
class Outcome:
    """What a worker observed for one call; `code` is the provider's error code or type
    from the answer's body (`signals.provider_code`), e.g. "invalid_api_key". `scope`, for a
    429 only: "key" (the key had no room), "request" (this request alone was refused while
    the key had room, ratelimit_scope.py), or None (no evidence either way)."""

    kind: OutcomeKind
    status: int | None = None
    retry_after_s: float | None = None
    ratelimit: RateLimitInfo | None = None
    actual_cost: float | None = None
    latency_ms: float | None = None
    code: str | None = None
    scope: Literal["key", "request"] | None = None

    def __post_init__(self) -> None:
        # a plain string ("ok") becomes the enum; one outside the vocabulary fails here, loudly
        if type(self.kind) is not OutcomeKind:
            object.__setattr__(self, "kind", OutcomeKind(self.kind))

    @classmethod
    def from_report(cls, report: OutcomeReport) -> Outcome:
        """The core's view of a worker's report: the same kind and rate-limit info; a scope
        only for a 429 (it means nothing for another kind)."""
        return cls(kind=report.kind, status=report.status, retry_after_s=report.retry_after_s,
                   ratelimit=report.ratelimit, actual_cost=report.actual_cost, latency_ms=report.latency_ms,
                   code=report.code, scope=report.scope if report.kind == OutcomeKind.RATE_LIMITED else None)

    @property
    def lacks_model(self) -> bool:
        """A denial saying the key cannot reach the job's model (schemas/signals.py
        MODEL_UNAVAILABLE_CODES: OpenAI's 403 or 404 `model_not_found`, Azure's
        `DeploymentNotFound`, Anthropic's and Google's model 404s): no strike on the key."""
        return self.kind == OutcomeKind.DENIED and self.code in MODEL_UNAVAILABLE_CODES
