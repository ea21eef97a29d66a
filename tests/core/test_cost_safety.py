"""A key's cost bucket leaves its last `safety_s` of the cost rate unspent, as its request bucket
leaves the last `safety_s * rps` of its burst: the provider's own bucket sees each call when it
arrives, and a call whose transit is shorter than the first one's (the first call of a connection
opens it) reaches it sooner, relative to its bucket, than the leader spent it. Seen as one 429 in
tests/e2e/test_dispatch_limits.py (cost_per_minute 1200, cost 10 a call, 2 calls/s once the
minute's budget was spent) on a loaded machine."""

from __future__ import annotations

import pytest

from ratefleet.dispatcher.core import BreakerPolicy, CooldownPolicy
from ratefleet.dispatcher.core.adaptive import AdaptPolicy
from ratefleet.dispatcher.core.bucket import EPSILON, TokenBucket
from ratefleet.dispatcher.core.key import KeyState
from ratefleet.dispatcher.core.types import KeySpec

CPM, COST = 1200.0, 10.0  # 20 cost tokens a second: one call every 0.5 s once the budget is spent


def key(safety_s: float) -> KeyState:
    spec = KeySpec(id="k1", pool="p", upstream="u", rps=200.0, burst=20.0, cost_per_minute=CPM)
    return KeyState(spec, safety_s=safety_s, breaker=BreakerPolicy(), cooldown=CooldownPolicy(1.0, 60.0), now=0.0,
                    conservative=False, adapt=AdaptPolicy(enabled=False))


def provider_refusals(safety_s: float, first_transit_s: float, calls: int = 160) -> int:
    """Calls sent as soon as the key is ready (each done at once), the first arriving
    `first_transit_s` after it was sent and the rest at once; counted against a provider bucket
    of the same limit, full at the start: how many it would refuse (a 429 each)."""
    k = key(safety_s)
    provider = TokenBucket(CPM / 60.0, CPM, CPM, 0.0)
    refused, now = 0, 0.0
    for number in range(calls):
        now = k.ready_at(now, COST)
        assert now is not None
        k.reserve(now, COST)
        arrives = now + (first_transit_s if number == 0 else 0.0)
        if provider.advance(arrives) + EPSILON < COST:
            refused += 1
        else:
            provider.take(arrives, COST)
    return refused


def test_without_the_margin_a_slower_first_call_gets_later_calls_refused():
    assert provider_refusals(safety_s=0.0, first_transit_s=0.03) > 0  # the mechanism the margin is for


@pytest.mark.parametrize("first_transit_s", [0.0, 0.01, 0.03, 0.049])
def test_the_margin_absorbs_transit_jitter_up_to_safety_s(first_transit_s):
    assert provider_refusals(safety_s=0.05, first_transit_s=first_transit_s) == 0


def test_the_margin_costs_safety_s_once_not_a_share_of_the_rate():
    """Once the budget is spent, calls still go out at the cost rate (one each 0.5 s here),
    only safety_s later than without the margin."""
    k, now, sent = key(0.05), 0.0, []
    for _ in range(130):
        now = k.ready_at(now, COST)
        k.reserve(now, COST)
        sent.append(now)
    gaps = [b - a for a, b in zip(sent[-5:], sent[-4:], strict=False)]
    assert gaps == pytest.approx([COST / (CPM / 60.0)] * 4)


def test_a_job_that_needs_the_whole_budget_still_runs_once_it_is_full():
    k = key(0.05)
    k.reserve(0.0, CPM)  # the whole minute at once
    ready = k.ready_at(0.0, CPM)
    assert ready == pytest.approx(60.0)  # full again, not never (the margin would exceed the capacity)
