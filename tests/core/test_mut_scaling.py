"""The scaling signal (dispatcher/core/scaling.py) at exact values: `desired_workers` step by
step through its rule (demand, key capacity, slots, key concurrency, clamps), the status
figures it is fed from (which keys add capacity, slots per worker, calls in flight) and the
meter's moving averages (half-life, first call, time running backwards). A wrong step here
asks the autoscaler for too many workers (more than the keys can feed) or too few (a queue
that never drains)."""

from __future__ import annotations

import math

import pytest

from ratefleet.dispatcher.core.scaling import ScalingInputs, ScalingMeter, desired_workers, inputs_from_status


def inputs(**changes) -> ScalingInputs:
    base = dict(backlog=0, in_flight=0, arrival_rate=0.0, latency_s=1.0, slots_per_worker=1,
                key_capacity_rps=1_000.0)
    return ScalingInputs(**{**base, **changes})


# (inputs, keyword arguments, desired workers), each row worked out by the rule by hand
@pytest.mark.parametrize("given, kwargs, wanted", [
    # 6,000 jobs to drain in the default 60 s: 100 jobs/s x 1 s = 100 calls, 1 slot each
    (dict(backlog=6_000), {}, 100),
    (dict(backlog=6_000), dict(drain_s=1.0), 1_000),  # capped by 1,000 req/s of keys
    (dict(backlog=30), dict(drain_s=0.5), 60),
    # arrivals and backlog add up: 20 + 6,000/60 = 120 jobs/s
    (dict(backlog=6_000, arrival_rate=20.0), {}, 120),
    # the rate, not its inverse, times the call time: 10 jobs/s x 0.5 s = 5 calls
    (dict(arrival_rate=10.0, latency_s=0.5), {}, 5),
    (dict(arrival_rate=10.0, latency_s=4.0), {}, 40),
    # 40 calls in flight over 8 slots a worker is 5 workers, not 6; 41 calls need 6
    (dict(arrival_rate=40.0, slots_per_worker=8), {}, 5),
    (dict(arrival_rate=41.0, slots_per_worker=8), {}, 6),
    (dict(arrival_rate=40.0, slots_per_worker=1), {}, 40),
    # key concurrency caps the calls in flight (and only caps: a larger one changes nothing)
    (dict(arrival_rate=40.0, key_concurrency=12), {}, 12),
    (dict(arrival_rate=40.0, key_concurrency=12, slots_per_worker=8), {}, 2),
    (dict(arrival_rate=40.0, key_concurrency=500), {}, 40),
    # work waiting means at least one worker, also when the rule itself gives 0 calls in flight
    # (calls seen to take no time, or nothing left to drain but calls running), and also when
    # the keys carry less than 1 req/s or arrivals are under 1 job/s
    (dict(backlog=1, key_capacity_rps=0.5, latency_s=0.0), {}, 1),
    (dict(arrival_rate=0.5, latency_s=0.0), {}, 1),
    (dict(in_flight=2), {}, 1),
    (dict(backlog=1, latency_s=0.0), {}, 1),
    (dict(latency_s=0.0), {}, 0),
    # no key can serve: no worker for the backlog, min_workers still holds
    (dict(backlog=500, key_capacity_rps=0.0), {}, 0),
    (dict(backlog=500, key_capacity_rps=0.0), dict(min_workers=2), 2),
    # an idle fleet: min_workers is the floor, max_workers the ceiling
    ({}, {}, 0),
    ({}, dict(min_workers=3), 3),
    (dict(backlog=6_000), dict(min_workers=3, max_workers=7), 7),
    (dict(backlog=60), dict(min_workers=3, max_workers=7), 3),
    (dict(backlog=600), dict(max_workers=50), 10),
])
def test_desired_workers_follows_the_rule_row_by_row(given, kwargs, wanted):
    assert desired_workers(inputs(**given), **kwargs) == wanted


@pytest.mark.parametrize("field", ["backlog", "in_flight", "arrival_rate", "latency_s", "key_capacity_rps"])
def test_each_negative_input_is_refused(field):
    with pytest.raises(ValueError, match="negative"):
        desired_workers(inputs(**{field: -1}))


@pytest.mark.parametrize("given, kwargs", [
    (dict(slots_per_worker=0), {}), ({}, dict(drain_s=0.0)), ({}, dict(drain_s=-5.0)),
    (dict(slots_per_worker=0, backlog=10), dict(drain_s=30.0)),
])
def test_a_worker_without_slots_or_no_time_to_drain_is_refused(given, kwargs):
    with pytest.raises(ValueError, match="drain_s must be > 0 and slots_per_worker"):
        desired_workers(inputs(**given), **kwargs)


def key(rps: float | None, *, concurrency: int | None = None, disabled: bool = False,
        breaker: str = "closed") -> dict:
    return {"effective_rps": rps, "concurrency": concurrency, "disabled": disabled, "breaker": breaker}


def status(keys: list[dict], slots: list[int] = (), tiers: dict | None = None) -> dict:
    return {"keys": {f"k{i}": k for i, k in enumerate(keys)},
            "workers": [{"id": f"w{i}", "slots": s} for i, s in enumerate(slots)],
            "tiers": tiers if tiers is not None else {}}


@pytest.mark.parametrize("keys, capacity, concurrency", [
    ([key(10.0), key(5.0)], 15.0, None),
    ([key(10.0, concurrency=3), key(5.0, concurrency=4)], 15.0, 7),
    ([key(10.0, concurrency=3), key(5.0)], 15.0, None),  # one key without a cap: no cap at all
    ([key(10.0, disabled=True), key(5.0)], 5.0, None),
    ([key(10.0, breaker="open"), key(5.0, concurrency=2)], 5.0, 2),
    ([key(10.0, breaker="half_open", concurrency=1), key(5.0, concurrency=2)], 15.0, 3),
    ([key(None), key(0.0), key(2.5)], 2.5, None),  # a key without a rate adds nothing
    ([key(10.0, disabled=True, concurrency=3), key(5.0, breaker="open", concurrency=4)], 0.0, None),
    ([], 0.0, None),
])
def test_only_usable_keys_add_capacity_and_concurrency(keys, capacity, concurrency):
    got = inputs_from_status(status(keys), ScalingMeter(), 0.0, backlog=0)
    assert got.key_capacity_rps == capacity
    assert got.key_concurrency == concurrency


@pytest.mark.parametrize("slots, per_worker", [
    ([], 8), ([4], 4), ([4, 8], 6), ([1], 1), ([1, 1, 1], 1), ([0], 1), ([10, 20, 30], 20),
])
def test_slots_per_worker_is_the_workers_mean_or_the_default(slots, per_worker):
    got = inputs_from_status(status([key(1.0)], slots), ScalingMeter(), 0.0, backlog=0)
    assert got.slots_per_worker == per_worker


def test_default_slots_is_used_only_without_workers():
    meter = ScalingMeter()
    assert inputs_from_status(status([], []), meter, 0.0, backlog=0, default_slots=3).slots_per_worker == 3
    assert inputs_from_status(status([], [5]), meter, 0.0, backlog=0, default_slots=3).slots_per_worker == 5


def test_calls_in_flight_are_summed_over_tiers_and_an_empty_status_is_an_idle_fleet():
    tiers = {"vip": {"pending": 4, "in_flight": 3}, "guest": {"in_flight": 2}, "old": {"pending": 1}}
    got = inputs_from_status(status([key(1.0)], [2], tiers), ScalingMeter(), 0.0, backlog=9)
    assert (got.in_flight, got.backlog) == (5, 9)
    empty = inputs_from_status({}, ScalingMeter(), 0.0, backlog=0)
    assert empty == ScalingInputs(backlog=0, in_flight=0, arrival_rate=0.0, latency_s=1.0, slots_per_worker=8,
                                  key_capacity_rps=0.0, key_concurrency=None)
    assert desired_workers(empty) == 0


def test_the_meter_feeds_rate_and_latency_read_at_now():
    meter = ScalingMeter(half_life_s=10.0, default_latency_s=0.5)
    meter.arrived(100.0, 20)
    meter.called(2.0)
    got = inputs_from_status(status([key(4.0, concurrency=5)], [2]), meter, 110.0, backlog=3)
    tau = 10.0 / math.log(2)
    assert got.arrival_rate == pytest.approx(20 / tau / 2, rel=1e-9)  # one half-life later
    assert got == ScalingInputs(backlog=3, in_flight=0, arrival_rate=got.arrival_rate, latency_s=2.0,
                                slots_per_worker=2, key_capacity_rps=4.0, key_concurrency=5)


def test_meter_defaults_half_life_30_s_and_latency_1_s():
    meter = ScalingMeter()
    assert meter.latency_s == 1.0
    assert meter.arrival_rate(50.0) == 0.0  # nothing seen: no rate
    meter.arrived(50.0)  # one job
    first = meter.arrival_rate(50.0)
    assert first == pytest.approx(math.log(2) / 30.0, rel=1e-12)
    assert meter.arrival_rate(80.0) == pytest.approx(first / 2, rel=1e-12)


@pytest.mark.parametrize("kwargs", [dict(half_life_s=0.0), dict(half_life_s=-1.0), dict(default_latency_s=0.0),
                                    dict(default_latency_s=-0.5)])
def test_meter_refuses_a_non_positive_half_life_or_latency(kwargs):
    with pytest.raises(ValueError, match="half_life_s and default_latency_s"):
        ScalingMeter(**kwargs)


def test_meter_accepts_short_half_life_and_latency():
    meter = ScalingMeter(half_life_s=0.5, default_latency_s=0.25)
    assert meter.latency_s == 0.25
    meter.arrived(7.0, 3)
    assert meter.arrival_rate(7.5) == pytest.approx(3 * math.log(2) / 0.5 / 2, rel=1e-12)


def test_meter_arrivals_add_and_decay_by_elapsed_time_only():
    tau = 10.0 / math.log(2)
    meter = ScalingMeter(half_life_s=10.0)
    meter.arrived(1_000.0, 4)
    assert meter.arrival_rate(1_000.0) == pytest.approx(4 / tau, rel=1e-12)
    meter.arrived(1_010.0, 2)  # one half-life later: 2 + 2 new
    assert meter.arrival_rate(1_010.0) == pytest.approx(4 / tau, rel=1e-12)
    assert meter.arrival_rate(1_020.0) == pytest.approx(2 / tau, rel=1e-12)
    # a reading from the past neither decays nor moves the clock back: the next decays from 1,020
    assert meter.arrival_rate(1_005.0) == pytest.approx(2 / tau, rel=1e-12)
    assert meter.arrival_rate(1_020.0) == pytest.approx(2 / tau, rel=1e-12)
    assert meter.arrival_rate(1_030.0) == pytest.approx(1 / tau, rel=1e-12)


def test_meter_latency_is_the_first_call_then_a_tenth_of_each_new_one():
    meter = ScalingMeter(default_latency_s=3.0)
    meter.called(0.0)  # an instant call counts (a negative one does not)
    assert meter.latency_s == 0.0
    meter.called(1.0)
    assert meter.latency_s == pytest.approx(0.1, rel=1e-12)
    meter.called(2.0)
    assert meter.latency_s == pytest.approx(0.9 * 0.1 + 0.2, rel=1e-12)
    meter.called(-0.5)
    assert meter.latency_s == pytest.approx(0.29, rel=1e-12)
    other = ScalingMeter()
    other.called(0.5)
    other.called(4.0)
    assert other.latency_s == pytest.approx(0.85, rel=1e-12)
