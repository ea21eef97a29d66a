"""ratefleet's scheduling core: pure Python, `now` passed in, decisions returned as values.

    LeaderMachine       leader.py     the leader as a state machine: handle(event, now) -> commands
    events, commands    events.py, commands.py  its inputs and outputs (frozen dataclasses)
    (leader parts)      leader_fleet.py, leader_keys.py, pulls.py, handout.py, fleet.py, delivery.py
    Scheduler           scheduler.py  queue -> key decisions, outcome feedback, status
    TierBook            tiers.py      tier FIFOs, stride (weighted) / strict ordering
    Chain, pick_key     choice.py     pool fallback chain, key choice, never-runnable jobs
    KeyState            key.py        one key: buckets, cooldown, disable, counters
    KeyHealth           keyhealth.py  enabled / disabled (provider, operator), key probe, secret
    DenialBook          denials.py    401/403: the key's fault or the request's
    KeyAdmin            keyadmin.py   operator disable/enable, persisted state, missing secrets
    KeyBreaker          breaker.py    aiobreaker state machine with monotonic timing
    TokenBucket         bucket.py     x/time/rate-style bucket with safe refunds and rate changes
    AdaptiveRate        adaptive.py   a key's effective rate: AIMD on 429s, ratelimit header hints
    parse_* / classify  signals.py    HTTP answer -> Outcome fields (used by workers)
    specs and values    types.py
"""

from ratefleet.schemas.outcome import OutcomeKind, RateLimitInfo, is_retryable
from ratefleet.schemas.signals import classify, parse_duration, parse_ratelimit, parse_retry_after, provider_code

from .adaptive import AdaptiveRate, AdaptPolicy, header_rate
from .breaker import BreakerState, KeyBreaker
from .bucket import TokenBucket
from .scheduler import LOOKAHEAD, Scheduler
from .types import (
    BreakerPolicy,
    CooldownPolicy,
    Decision,
    Dispatch,
    Idle,
    KeySpec,
    Outcome,
    PendingJob,
    PoolSpec,
    ProbePolicy,
    Reject,
    Reservation,
    SchedulerSpec,
    TierSpec,
    WaitUntil,
)

__all__ = [
    "AdaptPolicy", "AdaptiveRate", "header_rate",
    "BreakerPolicy", "BreakerState", "CooldownPolicy", "Decision", "Dispatch", "Idle",
    "KeyBreaker", "KeySpec", "LOOKAHEAD", "Outcome", "OutcomeKind", "PendingJob", "PoolSpec",
    "ProbePolicy", "RateLimitInfo", "Reject", "Reservation", "Scheduler", "SchedulerSpec", "TierSpec",
    "TokenBucket", "WaitUntil", "classify", "is_retryable", "parse_duration",
    "parse_ratelimit", "parse_retry_after", "provider_code",
]
