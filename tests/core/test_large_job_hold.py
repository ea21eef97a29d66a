"""A job too large for any key's cost bucket right now waits for one key only: the jobs
behind it run on the route's other keys, never on the key it waits for (so it is not
starved), and a job no key can take without a completion still holds the whole route."""

from __future__ import annotations

import pytest
from core_helpers import job, key, make, pool

from ratefleet.dispatcher.core import Dispatch, Reject, WaitUntil

t0, t1 = 100.0, 101.0


def two_keys(**extra):
    # cost 6,000/min = 100 per second, both buckets full (6,000)
    return make(pool("p", key("k1", rps=100, burst=100, cost_per_minute=6000, **extra),
                     key("k2", rps=100, burst=100, cost_per_minute=6000, **extra)), now=t0)


def test_small_jobs_run_on_the_other_key_while_a_large_one_waits_for_its_refill():
    s = two_keys()
    for _ in range(2):  # both keys down to 2,000
        s.add(job(cost=4000), t0)
        assert isinstance(s.next(t0), Dispatch)
    large = job(cost=5000)
    s.add(large, t0)
    smalls = [job(cost=10) for _ in range(3)]
    for small in smalls:
        s.add(small, t0)
    served = [s.next(t0) for _ in smalls]
    assert all(isinstance(d, Dispatch) for d in served)  # before: WaitUntil(t0 + 30) for all of them
    waited_for = {"k1", "k2"} - {d.reservation.key_id for d in served}
    assert len(waited_for) == 1  # every small job went to the same, other key
    decision = s.next(t0)
    assert decision == WaitUntil(pytest.approx(t0 + 30.0))  # 3,000 short at 100/s: the large job's time is kept
    assert s.next(t0 + 30.0).reservation.job.job_id == large.job_id


def test_a_job_that_waits_for_a_completion_holds_the_whole_route():
    s = two_keys(concurrency=1)
    s.add(job(cost=1), t0)
    s.add(job(cost=1), t0)
    first, second = s.next(t0), s.next(t0)
    assert isinstance(first, Dispatch) and isinstance(second, Dispatch)
    s.add(job(cost=1), t0)
    s.add(job(cost=1), t0)
    assert not isinstance(s.next(t1), Dispatch)  # both keys at their cap: nothing runs, order kept


def test_an_estimated_job_goes_past_a_pool_too_small_for_it_to_one_that_fits():
    """Two pools with different budgets: a job whose estimate is above the first pool's
    tokens/min runs on the second (before, without a cost, it was charged 1, sent to the
    small key, and ended request_too_large on the provider's 429)."""
    s = make(pool("small", key("s1", pool="small", rps=100, burst=100, cost_per_minute=12000)),
             pool("big", key("b1", pool="big", rps=100, burst=100, cost_per_minute=100000)),
             chains={"normal": ("small", "big")}, now=t0)
    s.add(job(cost=50000, estimated=True), t0)
    assert s.next(t0).reservation.key_id == "b1"


def test_an_estimate_above_every_key_is_charged_the_largest_budget_a_stated_cost_is_refused():
    s = make(pool("p", key("k1", rps=100, burst=100, cost_per_minute=6000)), now=t0)
    s.add(job(cost=9000, estimated=True), t0)
    dispatched = s.next(t0)
    assert isinstance(dispatched, Dispatch) and dispatched.reservation.cost == 6000  # the provider decides
    s.add(job(cost=9000), t0)
    assert isinstance(s.next(t0), Reject)


def test_a_pass_with_no_key_ready_reads_each_key_a_few_times_not_once_per_job(monkeypatch):
    """All keys waiting for a refill (a rate limit's usual state) and a queue behind them:
    each job behind the first holds the next key in line. Every one of them (LOOKAHEAD) read
    every key twice before: 64 keys, 1,808 key reads a pass, now 128 (2 per key)."""
    from ratefleet.dispatcher.core.key import KeyState

    keys = 64
    s = make(pool("p", *[key(f"k{i}", rps=10, burst=1) for i in range(keys)]), now=t0)
    for _ in range(keys):  # each key's one request token spent
        s.add(job(cost=1), t0)
        assert isinstance(s.next(t0), Dispatch)
    for _ in range(300):
        s.add(job(cost=1), t0)
    reads = 0
    ready_at = KeyState.ready_at

    def counted(self, *args, **kwargs):
        nonlocal reads
        reads += 1
        return ready_at(self, *args, **kwargs)

    monkeypatch.setattr(KeyState, "ready_at", counted)
    decision = s.next(t0 + 0.001)
    assert decision == WaitUntil(pytest.approx(t0 + 0.1))  # the first refill, as before
    assert reads <= 2 * keys, reads
