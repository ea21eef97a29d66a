"""The scaling signal (`ratefleet_desired_workers`): rises with backlog, caps at key capacity."""

import math

import pytest

from ratefleet.dispatcher.core.scaling import ScalingInputs, ScalingMeter, desired_workers


def inputs(**changes) -> ScalingInputs:
    base = dict(backlog=0, in_flight=0, arrival_rate=0.0, latency_s=0.2, slots_per_worker=8,
                key_capacity_rps=100.0)
    return ScalingInputs(**{**base, **changes})


def test_idle_fleet_wants_no_workers_and_min_workers_holds():
    assert desired_workers(inputs()) == 0
    assert desired_workers(inputs(), min_workers=2) == 2


def test_signal_rises_with_backlog_until_the_keys_cap_it():
    seen = [desired_workers(inputs(backlog=b)) for b in (0, 100, 1_000, 3_000, 6_000, 100_000, 10_000_000)]
    assert seen == sorted(seen) and seen[0] == 0 and seen[1] >= 1
    # 100 req/s of keys, 0.2 s per call: 20 calls in flight feed them, 8 slots a worker -> 3 workers
    assert seen[-1] == seen[-2] == 3
    assert seen[2] < seen[-1]


def test_backlog_drains_within_drain_s():
    # 6,000 jobs in 60 s = 100 jobs/s; 0.5 s per call -> 50 in flight -> 7 workers of 8 slots
    assert desired_workers(inputs(backlog=6_000, latency_s=0.5, key_capacity_rps=1_000)) == 7
    # twice the time allowed: half the rate
    assert desired_workers(inputs(backlog=6_000, latency_s=0.5, key_capacity_rps=1_000), drain_s=120) == 4


def test_arrivals_alone_keep_workers():
    # 40 jobs/s arriving, 0.2 s each -> 8 in flight -> 1 worker; 41 jobs/s -> 2
    assert desired_workers(inputs(arrival_rate=40.0)) == 1
    assert desired_workers(inputs(arrival_rate=41.0)) == 2


def test_key_concurrency_caps_the_signal():
    wide = inputs(backlog=1_000_000, latency_s=2.0, key_capacity_rps=1_000)
    assert desired_workers(wide) == 250
    assert desired_workers(ScalingInputs(**{**wide.__dict__, "key_concurrency": 20})) == 3


def test_work_waiting_means_at_least_one_worker_unless_no_key_can_serve():
    assert desired_workers(inputs(backlog=1, latency_s=0.001)) == 1
    assert desired_workers(inputs(in_flight=3, latency_s=0.001)) == 1
    assert desired_workers(inputs(backlog=500, key_capacity_rps=0.0)) == 0


def test_max_workers_and_bad_inputs():
    assert desired_workers(inputs(backlog=10_000_000, key_capacity_rps=10_000), max_workers=5) == 5
    with pytest.raises(ValueError):
        desired_workers(inputs(slots_per_worker=0))
    with pytest.raises(ValueError):
        desired_workers(inputs(backlog=-1))
    with pytest.raises(ValueError):
        desired_workers(inputs(), drain_s=0)


def test_meter_arrival_rate_converges_and_decays():
    meter = ScalingMeter(half_life_s=10.0)
    now = 0.0
    for _ in range(2_000):  # 50 jobs/s for 40 s
        now += 0.02
        meter.arrived(now)
    rate = meter.arrival_rate(now)
    assert rate == pytest.approx(50.0 * (1 - 0.5 ** 4), rel=0.02)
    assert meter.arrival_rate(now + 10.0) == pytest.approx(rate / 2, rel=0.01)
    assert meter.arrival_rate(now) == pytest.approx(rate / 2, rel=0.01)  # time never runs backwards
    assert meter.arrival_rate(now + 100.0) < 0.1


def test_meter_latency_defaults_then_follows_calls():
    meter = ScalingMeter(default_latency_s=1.5)
    assert meter.latency_s == 1.5
    meter.called(0.2)
    assert meter.latency_s == 0.2
    for _ in range(100):
        meter.called(0.4)
    assert meter.latency_s == pytest.approx(0.4, rel=0.01)
    meter.called(-1.0)  # a clock step backwards is ignored
    assert meter.latency_s == pytest.approx(0.4, rel=0.01)


def test_the_leader_feeds_the_meter_and_the_signal_caps_at_its_keys():
    from leader_helpers import T0, Run, assigned, beat, delivery, machine

    from ratefleet.dispatcher.core import events as ev
    from ratefleet.dispatcher.core.scaling import inputs_from_status
    from ratefleet.dispatcher.core.types import Outcome

    run = Run(machine(rps=10.0, burst=10.0, keys=2))  # 2 keys x 10 req/s
    run.at(T0, beat("w1", 4))
    run.at(T0, ev.Tick())
    sent = []
    for seq in range(1, 21):
        sent += assigned(run.at(T0 + seq * 0.05, delivery(seq)))
    run.at(T0 + 1.0, delivery(1, 2))  # a redelivery is not an arrival
    assert len(sent) == 4  # the worker's 4 slots
    for a in sent:
        key_id = run.m.fleet.by_assignment[a.assignment].key_id
        run.at(T0 + 1.1, ev.OutcomeReported(a.assignment, key_id, Outcome(kind="ok", status=200, latency_ms=2000)))
    now = T0 + 1.2
    assert run.m.scaling.latency_s == pytest.approx(2.0)
    tau = 30.0 / math.log(2)  # the default half-life, 30 s
    assert run.m.scaling.arrival_rate(now) == pytest.approx(20 / tau, rel=0.03)  # 20 arrivals, not 21

    status = run.m.status(now)
    small = inputs_from_status(status, run.m.scaling, now, backlog=60)
    assert small.slots_per_worker == 4 and small.key_capacity_rps == pytest.approx(20.0, rel=0.2)
    huge = inputs_from_status(status, run.m.scaling, now, backlog=10_000_000)
    # 20 req/s x 2 s = 40 calls in flight at most, 4 slots a worker: 10 workers, however deep the queue
    assert desired_workers(small) < desired_workers(huge) == 10
    run.at(now, ev.KeyCommand({"action": "disable", "key": "k1"}, "inbox"))
    halved = inputs_from_status(run.m.status(now), run.m.scaling, now, backlog=10_000_000)
    assert desired_workers(halved) == 5  # a disabled key feeds nobody


def test_an_idle_fleet_asks_for_no_worker_once_arrivals_have_died_down():
    """The arrival rate is an exponentially decaying average: after a batch it stays above 0 for
    hours (1e-6 jobs/s ten minutes later), and the signal held 1 worker all that time, so KEDA's
    minReplicaCount 0 (examples/keda) never scaled the workers to zero."""
    meter = ScalingMeter(half_life_s=30.0)
    meter.arrived(0.0, 600)
    later = meter.arrival_rate(600.0)
    assert 0 < later < 1e-3
    assert desired_workers(inputs(arrival_rate=later)) == 0
    assert desired_workers(inputs(arrival_rate=1 / 60)) == 1  # one job a minute still keeps one


def test_keys_of_pools_no_busy_tier_may_use_add_no_capacity():
    """An operator's trial: 1,500 normal-tier jobs on k1 and k2 (pool shared) with k3 in a
    vip-only pool: the signal read 3, and disabling the idle k3 dropped it to 1."""
    from ratefleet.dispatcher.core.scaling import ScalingMeter, inputs_from_status

    status = {"keys": {"k1": {"pool": "shared", "effective_rps": 3.5}, "k2": {"pool": "shared", "effective_rps": 3.5},
                       "k3": {"pool": "vip", "effective_rps": 10.0}},
              "workers": [{"slots": 8}], "tiers": {"normal": {"pending": 64, "in_flight": 7}}}
    meter = ScalingMeter(default_latency_s=1.0)
    every = inputs_from_status(status, meter, 0.0, backlog=1500)
    shared = inputs_from_status(status, meter, 0.0, backlog=1500, pools={"shared"})
    assert every.key_capacity_rps == 17.0 and shared.key_capacity_rps == 7.0
    assert desired_workers(every) == 3 and desired_workers(shared) == 1
