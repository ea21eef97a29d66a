"""Translating the validated config into the scheduling core's plain spec."""

from __future__ import annotations

from ratefleet.dispatcher.core import (
    AdaptPolicy,
    BreakerPolicy,
    CooldownPolicy,
    KeySpec,
    PoolSpec,
    ProbePolicy,
    SchedulerSpec,
    TierSpec,
)
from ratefleet.dispatcher.core.split import SplitSpec
from ratefleet.schemas import Config


def scheduler_spec(config: Config) -> SchedulerSpec:
    pools = []
    for name, pool in config.pools.items():
        upstream = config.pool_upstream(name)
        keys = tuple(KeySpec(id=k.id, pool=name, upstream=upstream, rps=k.rps, burst=k.effective_burst,
                             concurrency=k.concurrency, cost_per_minute=k.cost_per_minute) for k in pool.keys)
        pools.append(PoolSpec(name=name, upstream=upstream, keys=keys))
    tiers = tuple(TierSpec(name=name, weight=tier.weight, pools=tuple(config.tier_pools(name)),
                           split=SplitSpec(pools=tuple(tier.split.pools), share=tier.split.share) if tier.split else None)
                  for name, tier in config.tiers.items())
    d = config.dispatcher
    return SchedulerSpec(
        pools=tuple(pools), tiers=tiers, policy=d.policy,
        breaker=BreakerPolicy(fail_max=d.breaker_fail_max, reset_timeout_s=d.breaker_reset_s),
        cooldown=CooldownPolicy(base_s=d.cooldown_base_s, max_s=d.cooldown_max_s,
                                retry_after_max_s=d.retry_after_max_s),
        probe=ProbePolicy(base_s=d.key_probe_s, max_s=max(d.key_probe_s, d.key_probe_max_s)),
        safety_s=d.safety_ms / 1000, priority_reserve=d.priority_reserve, priority_slots=d.priority_slots,
        adapt=AdaptPolicy(enabled=d.adaptive_rate, decrease=d.rate_decrease, recover_s=d.rate_recover_s,
                          increase_per_s=d.rate_increase_per_s, first_burst=d.first_burst),
    )
