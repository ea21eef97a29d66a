"""Hypothesis properties of the scheduler, driven through a fake-clock fleet (fleet_sim).

Random configurations (1-3 pools x 1-4 keys, rps 1-50, burst 1-10, optional concurrency
and cost per minute), random tiers and chains, random arrivals, outcomes, latencies and
cancellations. The whole module runs with the process in a non-UTC time zone.
"""

from __future__ import annotations

from collections import Counter

import pytest
from core_helpers import time_zone
from fleet_sim import FleetSim, Script, max_window_excess
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from ratefleet.dispatcher.core import (
    BreakerPolicy,
    CooldownPolicy,
    KeySpec,
    Outcome,
    PendingJob,
    PoolSpec,
    RateLimitInfo,
    SchedulerSpec,
    TierSpec,
)

START = 50_000.0  # monotonic clocks are large; float rounding must not matter
EPS = 1e-6
# each property runs once per time zone below: 75 examples in each, 150 per property in all (the
# scheduling core takes `now` and reads no clock, so a time-zone bug would show in any example)
SETTINGS = settings(max_examples=75, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@pytest.fixture(autouse=True, scope="module", params=["Asia/Tokyo", "America/Los_Angeles"])
def _non_utc(request):
    with time_zone(request.param):
        yield


@st.composite
def key_specs(draw, pool: str, upstream: str, index: int) -> KeySpec:
    return KeySpec(
        id=f"{pool}k{index}", pool=pool, upstream=upstream,
        rps=draw(st.floats(1, 50, allow_nan=False)),
        burst=draw(st.floats(1, 10, allow_nan=False)),
        concurrency=draw(st.none() | st.integers(1, 8)),
        cost_per_minute=draw(st.none() | st.sampled_from([10.0, 30.0, 60.0, 300.0])),
    )


@st.composite
def scheduler_specs(draw) -> SchedulerSpec:
    pools = []
    for p in range(draw(st.integers(1, 3))):
        name, upstream = f"p{p}", draw(st.sampled_from(["u", "u", "v"]))
        keys = tuple(draw(key_specs(name, upstream, k)) for k in range(draw(st.integers(1, 4))))
        pools.append(PoolSpec(name, upstream, keys))
    names = [p.name for p in pools]
    tiers = tuple(
        TierSpec(f"t{i}", draw(st.integers(1, 8)),
                 tuple(draw(st.permutations(names))[: draw(st.integers(1, len(names)))]))
        for i in range(draw(st.integers(1, 4)))
    )
    return SchedulerSpec(
        pools=tuple(pools), tiers=tiers, policy=draw(st.sampled_from(["weighted", "strict"])),
        breaker=BreakerPolicy(fail_max=draw(st.integers(1, 3)), reset_timeout_s=draw(st.floats(0.5, 5))),
        cooldown=CooldownPolicy(base_s=0.5, max_s=4.0),
        safety_s=draw(st.sampled_from([0.0, 0.05])),
    )


ratelimits = st.none() | st.builds(
    RateLimitInfo,
    remaining_requests=st.none() | st.integers(0, 3).map(float),
    remaining_tokens=st.none() | st.integers(0, 50).map(float),
    reset_requests_s=st.none() | st.floats(0, 2),
    reset_tokens_s=st.none() | st.floats(0, 2),
)
ok = st.builds(Outcome, kind=st.just("ok"), status=st.just(200))
outcomes = st.one_of(
    ok, ok, ok, ok,
    st.builds(Outcome, kind=st.just("ok"), status=st.just(200), ratelimit=ratelimits),
    st.builds(Outcome, kind=st.just("upstream_error"), status=st.sampled_from([None, 500, 503])),
    st.builds(Outcome, kind=st.just("rate_limited"), status=st.just(429),
              retry_after_s=st.none() | st.floats(0, 3), ratelimit=ratelimits),
    st.builds(Outcome, kind=st.just("bad_request"), status=st.just(400)),
    st.builds(Outcome, kind=st.just("key_error"), status=st.sampled_from([401, 403])),
)
scripts = st.lists(
    st.builds(
        Script,
        outcome=st.one_of(st.none(), outcomes, outcomes, outcomes),
        latency=st.floats(0, 2),
        actual_fraction=st.none() | st.floats(0, 1),
    ),
    min_size=1, max_size=40,
)


@st.composite
def scenarios(draw):
    spec = draw(scheduler_specs())
    arrivals, at = [], START
    for i in range(draw(st.integers(1, 60))):
        at += draw(st.floats(0, 0.5))
        tier = draw(st.sampled_from(spec.tiers)).name
        upstream = draw(st.sampled_from(["u", "u", "u", "v", "w"]))
        arrivals.append((at, PendingJob(f"j{i}", tier, upstream, draw(st.sampled_from([0.5, 1, 2, 5, 12])))))
    return spec, arrivals, draw(scripts), draw(st.integers(1, 12)), draw(st.booleans())


def simulate(spec, arrivals, script, slots, conservative):
    sim = FleetSim(spec, start=START, slots=slots, conservative=conservative)
    for at, job in arrivals:
        sim.arrive(at, job)
    return sim, sim.run(script)


@SETTINGS
@given(scenarios())
def test_limits_hold_and_every_job_ends_in_one_place(scenario):
    spec, arrivals, script, slots, conservative = scenario
    sim, record = simulate(spec, arrivals, script, slots, conservative)
    for key_id, calls in record.calls.items():
        key = sim.keys[key_id]
        # (1) requests: at most burst + rps*T in any window of length T
        assert max_window_excess([(c.at, 1.0) for c in calls], key.rps) <= key.burst + EPS
        # (3) cost: at most cost_per_minute + rate*T in any window
        if key.cost_per_minute is not None:
            excess = max_window_excess([(c.at, c.cost) for c in calls], key.cost_per_minute / 60)
            assert excess <= key.cost_per_minute * (1 + EPS)
    # (4) every job ends done or rejected exactly once; nothing stays queued or in flight
    assert Counter(record.state.values()).keys() <= {"done", "rejected"}
    assert len(record.state) == len(arrivals)
    assert all(sim.scheduler.pending(t.name) == 0 and sim.scheduler.in_flight(t.name) == 0
               for t in spec.tiers)
    assert all(v["in_flight"] == 0 for v in sim.scheduler.snapshot(sim.clock)["keys"].values())


@pytest.mark.timeout(360)  # up to 1280 jobs per example through the real leader machine
@SETTINGS
@given(
    weights=st.tuples(st.integers(1, 8), st.integers(1, 8)),
    rps=st.floats(1, 50), burst=st.floats(1, 10), latency=st.floats(0, 0.5),
)
def test_weighted_shares_follow_weights(weights, rps, burst, latency):
    """(5) Two permanently backlogged tiers on one key share dispatches by weight (±10%)."""
    spec = SchedulerSpec(
        pools=(PoolSpec("p", "u", (KeySpec("k", "p", "u", rps, burst),)),),
        tiers=(TierSpec("hi", weights[0], ("p",)), TierSpec("lo", weights[1], ("p",))),
    )
    sim = FleetSim(spec, start=START, slots=4, conservative=False)
    rounds = 40 * sum(weights)
    for i in range(rounds):
        sim.arrive(START, PendingJob(f"h{i}", "hi", "u"))
        sim.arrive(START, PendingJob(f"l{i}", "lo", "u"))
    sim.run([Script(Outcome("ok", 200), latency)], stop_after=rounds, max_steps=40_000)
    tiers = Counter(job_id[0] for job_id, state in sim.record.state.items() if state != "pending")
    expected = rounds * weights[0] / sum(weights)
    assert tiers["h"] == pytest.approx(expected, rel=0.1)


def test_half_open_never_has_two_probes():
    """(6) A key never has a second call while its half-open probe is in flight.

    FleetSim asserts it at every dispatch; here the breaker is made to trip often, and the
    run as a whole must have seen probes (else the property held only vacuously).
    """
    probes: list[int] = []

    @SETTINGS
    @given(
        fail_max=st.integers(1, 3), reset=st.floats(0.1, 3), slots=st.integers(1, 8),
        script=st.lists(st.builds(Script, outcome=st.none() | st.sampled_from([
            Outcome("ok", 200), Outcome("upstream_error", 503), Outcome("upstream_error", 503),
            Outcome("bad_request", 400), Outcome("rate_limited", 429, retry_after_s=0.1)]),
            latency=st.floats(0, 1)), min_size=1, max_size=30),
    )
    def check(fail_max, reset, slots, script):
        spec = SchedulerSpec(
            pools=(PoolSpec("p", "u", (KeySpec("k", "p", "u", 50.0, 10.0, concurrency=8),
                                       KeySpec("k2", "p", "u", 5.0, 2.0))),),
            tiers=(TierSpec("t", 1, ("p",)),),
            breaker=BreakerPolicy(fail_max=fail_max, reset_timeout_s=reset),
        )
        sim = FleetSim(spec, start=START, slots=slots, conservative=False)
        for i in range(60):
            sim.arrive(START + i * 0.05, PendingJob(f"j{i}", "t", "u"))
        record = sim.run(script)
        assert set(record.state.values()) <= {"done"}
        probes.append(record.probes)
        event(f"half-open probes: {'some' if record.probes else 'none'}")

    check()
    assert sum(1 for n in probes if n) >= len(probes) // 10, f"half-open probes in {probes}"
