"""Builders shared by the scheduling-core tests (named to avoid clashes on sys.path)."""

from __future__ import annotations

import os
import time
from contextlib import contextmanager

from ratefleet.dispatcher.core import (
    BreakerPolicy,
    CooldownPolicy,
    Dispatch,
    KeySpec,
    PendingJob,
    PoolSpec,
    Scheduler,
    SchedulerSpec,
    TierSpec,
)

DEFAULT_TIERS = (("vip", 8), ("premium", 4), ("normal", 2), ("guest", 1))


def key(id: str, pool: str = "p", upstream: str = "u", rps: float = 10.0, burst: float = 5.0, **kw) -> KeySpec:
    return KeySpec(id=id, pool=pool, upstream=upstream, rps=rps, burst=burst, **kw)


def pool(name: str, *keys: KeySpec, upstream: str = "u") -> PoolSpec:
    return PoolSpec(name=name, upstream=upstream, keys=keys)


def make(
    *pools: PoolSpec,
    tiers: tuple[tuple[str, int], ...] = DEFAULT_TIERS,
    chains: dict[str, tuple[str, ...]] | None = None,
    now: float = 0.0,
    conservative: bool = False,
    safety_s: float = 0.0,
    fail_max: int = 3,
    reset_s: float = 10.0,
    **kw,
) -> Scheduler:
    """A scheduler over `pools`; every tier uses every pool unless `chains` says otherwise."""
    names = tuple(p.name for p in pools)
    chains = chains or {}
    spec = SchedulerSpec(
        pools=pools,
        tiers=tuple(TierSpec(n, w, chains.get(n, names)) for n, w in tiers),
        breaker=BreakerPolicy(fail_max=fail_max, reset_timeout_s=reset_s),
        cooldown=kw.pop("cooldown", CooldownPolicy(base_s=1.0, max_s=8.0)),
        safety_s=safety_s,
        **kw,
    )
    return Scheduler(spec, now, conservative=conservative)


_ids = iter(range(1, 10**9))


def job(tier: str = "normal", upstream: str = "u", cost: float = 1.0, job_id: str | None = None,
        model: str | None = None, estimated: bool = False) -> PendingJob:
    return PendingJob(job_id or f"j{next(_ids)}", tier, upstream, cost, model=model, estimated=estimated)


def dispatch(s: Scheduler, now: float) -> Dispatch:
    decision = s.next(now)
    assert isinstance(decision, Dispatch), decision
    return decision


def set_tz(name: str | None) -> None:
    """Switch the process time zone (None restores the environment's default)."""
    if name is None:
        os.environ.pop("TZ", None)
    else:
        os.environ["TZ"] = name
    time.tzset()


@contextmanager
def time_zone(name: str):
    """Run a block with the process in time zone `name` (aiobreaker mixes UTC and local)."""
    before = os.environ.get("TZ")
    set_tz(name)
    try:
        yield name
    finally:
        set_tz(before)

