"""The scheduler works out a job's A/B side once (Scheduler._variant_of), not on every
look-ahead pass; the side is the same as `variant_of` says, also after the memo is full."""

from __future__ import annotations

from ratefleet.dispatcher.core import Dispatch, KeySpec, PendingJob, PoolSpec, Scheduler, SchedulerSpec, TierSpec, WaitUntil
from ratefleet.dispatcher.core import scheduler as scheduler_module
from ratefleet.dispatcher.core.split import SplitSpec, variant_of

SPLIT = SplitSpec(("alt",), 0.5)


def scheduler(rps: float = 1.0, burst: float = 1.0) -> Scheduler:
    main = PoolSpec("main", "u", (KeySpec("m1", "main", "u", rps=rps, burst=burst),))
    alt = PoolSpec("alt", "u", (KeySpec("a1", "alt", "u", rps=rps, burst=burst),))
    return Scheduler(SchedulerSpec(pools=(main, alt), tiers=(TierSpec("premium", 1, ("main",), SPLIT),),
                                   safety_s=0.0), 0.0)


def test_each_jobs_side_is_computed_once_over_many_passes(monkeypatch):
    calls: list[str] = []

    def counting(job_id, split):
        calls.append(job_id)
        return variant_of(job_id, split)

    monkeypatch.setattr(scheduler_module, "variant_of", counting)
    s = scheduler()
    ids = [f"job-{n}" for n in range(12)]
    for job_id in ids:
        s.add(PendingJob(job_id, "premium", "u"), 0.0)
    dispatched = []
    now = 0.0
    for _ in range(60):  # one token per key per second: most passes find every key busy
        decision = s.next(now)
        if isinstance(decision, Dispatch):
            dispatched.append(decision)
        elif isinstance(decision, WaitUntil):
            now = max(now + 0.05, decision.at)
    assert len(dispatched) == len(ids)
    assert sorted(calls) == sorted(ids)
    assert all(d.variant == variant_of(d.job.job_id, SPLIT) for d in dispatched)


def test_sides_stay_right_once_the_memo_has_been_emptied(monkeypatch):
    monkeypatch.setattr(scheduler_module, "VARIANT_MEMO", 8)
    s = scheduler(rps=1e6, burst=1e6)
    ids = [f"job-{n}" for n in range(50)]
    for job_id in ids:
        s.add(PendingJob(job_id, "premium", "u"), 0.0)
    dispatched = [s.next(0.0) for _ in ids]
    assert all(isinstance(d, Dispatch) and d.variant == variant_of(d.job.job_id, SPLIT) for d in dispatched)
    assert {d.pool for d in dispatched if d.variant == "split"} == {"alt"}
