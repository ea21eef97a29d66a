"""How the config becomes the scheduler's settings (dispatcher/spec.py `scheduler_spec`):
tier weights and order, each tier's pool fallback chain in the order written, key limits,
safety margin, priority reserve, breaker, cooldown and key-probe policy. Then the same
config drives a real Scheduler, so a chain read backwards shows as a job on the wrong pool.
"""

from __future__ import annotations

import warnings

import pytest

from ratefleet.dispatcher.core import (
    AdaptPolicy,
    BreakerPolicy,
    CooldownPolicy,
    Dispatch,
    KeySpec,
    PendingJob,
    ProbePolicy,
    Scheduler,
    TierSpec,
)
from ratefleet.dispatcher.spec import scheduler_spec
from ratefleet.schemas.config import parse_config

CONFIG = {
    "upstreams": {"openai": {"base_url": "https://api.example.test"},
                  "other": {"base_url": "https://other.example.test"}},
    "pools": {
        "shared": {"upstream": "openai", "keys": [
            {"id": "s1", "secret": "env:S1", "rps": 20, "burst": 5, "concurrency": 16, "cost_per_minute": 90000},
            {"id": "s2", "secret": "env:S2", "rps": 3.5}]},
        "vip": {"upstream": "openai", "keys": [{"id": "v1", "secret": "env:V1", "rps": 0.5}]},
        "side": {"upstream": "other", "keys": [{"id": "o1", "secret": "env:O1", "rps": 7, "burst": 2}]},
    },
    "tiers": {
        "vip": {"weight": 8, "pools": ["vip", "shared"]},
        "normal": {"weight": 3, "pools": ["shared", "side"]},
        "guest": {"weight": 1},
    },
    "dispatcher": {"policy": "strict", "breaker_fail_max": 7, "breaker_reset_s": 12.5, "cooldown_base_s": 0.75,
                   "cooldown_max_s": 45.0, "safety_ms": 200.0, "priority_reserve": 2.5, "priority_slots": 3, "key_probe_s": 90.0,
                   "key_probe_max_s": 1800.0, "adaptive_rate": False, "rate_decrease": 0.7, "rate_recover_s": 9.0,
                   "first_burst": 3.0},
}


def test_tiers_keep_their_weights_order_and_pool_fallback_chains():
    spec = scheduler_spec(parse_config(CONFIG))
    assert spec.tiers == (
        TierSpec("vip", 8, ("vip", "shared")),
        TierSpec("normal", 3, ("shared", "side")),
        TierSpec("guest", 1, ("shared", "vip", "side")),  # no pools: every pool, in the file's order
    )


def test_default_tiers_weigh_8_4_2_1_and_use_every_pool_in_file_order():
    config = parse_config({"upstreams": CONFIG["upstreams"], "pools": CONFIG["pools"]})
    spec = scheduler_spec(config)
    assert [(t.name, t.weight) for t in spec.tiers] == [("vip", 8), ("premium", 4), ("normal", 2), ("guest", 1)]
    assert {t.pools for t in spec.tiers} == {("shared", "vip", "side")}


def test_pools_carry_their_upstream_and_every_key_limit():
    spec = scheduler_spec(parse_config(CONFIG))
    assert [(p.name, p.upstream) for p in spec.pools] == [("shared", "openai"), ("vip", "openai"), ("side", "other")]
    shared, vip, side = spec.pools
    assert shared.keys == (
        KeySpec(id="s1", pool="shared", upstream="openai", rps=20, burst=5, concurrency=16, cost_per_minute=90000),
        KeySpec(id="s2", pool="shared", upstream="openai", rps=3.5, burst=3.5),  # burst defaults to rps
    )
    assert vip.keys == (KeySpec(id="v1", pool="vip", upstream="openai", rps=0.5, burst=1.0),)  # at least 1
    assert side.keys == (KeySpec(id="o1", pool="side", upstream="other", rps=7, burst=2),)


def test_dispatcher_policies_come_from_the_config_in_seconds():
    spec = scheduler_spec(parse_config(CONFIG))
    assert spec.policy == "strict"
    assert spec.breaker == BreakerPolicy(fail_max=7, reset_timeout_s=12.5)
    assert spec.cooldown == CooldownPolicy(base_s=0.75, max_s=45.0)
    assert spec.probe == ProbePolicy(base_s=90.0, max_s=1800.0)
    assert spec.safety_s == pytest.approx(0.2)  # safety_ms is milliseconds
    assert spec.priority_reserve == 2.5 and spec.priority_slots == 3
    assert spec.adapt == AdaptPolicy(enabled=False, decrease=0.7, recover_s=9.0, first_burst=3.0)


def test_defaults_when_the_config_says_nothing():
    spec = scheduler_spec(parse_config({"upstreams": CONFIG["upstreams"], "pools": CONFIG["pools"]}))
    assert spec.policy == "weighted"
    assert spec.breaker == BreakerPolicy(fail_max=5, reset_timeout_s=30.0)
    assert spec.cooldown == CooldownPolicy(base_s=1.0, max_s=60.0)
    assert spec.probe == ProbePolicy(base_s=60.0, max_s=3600.0)
    assert spec.safety_s == pytest.approx(0.05) and spec.priority_reserve == 1.0 and spec.priority_slots == 1
    assert spec.adapt == AdaptPolicy(enabled=True, decrease=0.5, recover_s=5.0, first_burst=2.0)


def test_a_probe_cap_below_the_first_probe_delay_is_raised_to_it():
    config = parse_config({**CONFIG, "dispatcher": {"key_probe_s": 120.0, "key_probe_max_s": 30.0}})
    assert scheduler_spec(config).probe == ProbePolicy(base_s=120.0, max_s=120.0)


def test_the_scheduler_built_from_the_config_tries_a_tiers_pools_in_the_written_order():
    spec = scheduler_spec(parse_config(CONFIG))
    scheduler = Scheduler(spec, 0.0)
    pools = []
    for i in range(4):
        scheduler.add(PendingJob(f"j{i}", "vip", "openai"), 0.0)
        decision = scheduler.next(0.0)
        assert isinstance(decision, Dispatch), decision
        pools.append(decision.pool)
    # v1 has burst 1 (rps 0.5) minus nothing: the first vip job goes to the vip pool, the
    # rest fall back to shared
    assert pools == ["vip", "shared", "shared", "shared"]


def test_the_safety_margin_from_the_config_holds_back_the_last_tokens_of_a_burst():
    def dispatched_at_once(safety_ms: float) -> int:
        config = parse_config({"upstreams": {"u": {"base_url": "https://u.example.test"}},
                               "pools": {"p": {"keys": [{"id": "k", "secret": "env:K", "rps": 10, "burst": 5}]}},
                               "dispatcher": {"safety_ms": safety_ms, "priority_reserve": 0, "first_burst": None}})
        scheduler = Scheduler(scheduler_spec(config), 0.0)
        for i in range(10):
            scheduler.add(PendingJob(f"j{i}", "normal", "u"), 0.0)
        count = 0
        while isinstance(scheduler.next(0.0), Dispatch):
            count += 1
        return count

    assert dispatched_at_once(0) == 5
    assert dispatched_at_once(200) == 3  # 0.2 s x 10 rps = 2 tokens never used


@pytest.fixture(autouse=True)
def _quiet():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield
