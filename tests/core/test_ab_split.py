"""A/B routing in the pure core: the share of a tier's jobs that use the split chain, chosen
from the job id alone (dispatcher/core/split.py, Scheduler._route)."""

from __future__ import annotations

import hashlib

import pytest

from ratefleet.dispatcher.core import Dispatch, KeySpec, PendingJob, PoolSpec, Scheduler, SchedulerSpec, TierSpec
from ratefleet.dispatcher.core.split import SplitSpec, split_point, variant_of

IDS = [f"job-{n:05d}" for n in range(10_000)]


@pytest.mark.parametrize("share", [0.1, 0.3, 0.5, 0.9])
def test_the_split_share_of_10000_ids_is_within_2_percent(share):
    split = SplitSpec(pools=("alt",), share=share)
    measured = sum(variant_of(job_id, split) == "split" for job_id in IDS) / len(IDS)
    assert measured == pytest.approx(share, abs=0.02)


def test_the_side_is_a_function_of_the_id_only():
    split = SplitSpec(pools=("alt",), share=0.3)
    first = [variant_of(job_id, split) for job_id in IDS[:500]]
    again = [variant_of(job_id, SplitSpec(pools=("other",), share=0.3)) for job_id in IDS[:500]]
    assert first == again
    # the published rule: the first 8 bytes of SHA-256(id) as a fraction of 2**64
    assert split_point("abc") == int.from_bytes(hashlib.sha256(b"abc").digest()[:8], "big") / 2**64
    assert 0.0 <= min(map(split_point, IDS)) and max(map(split_point, IDS)) < 1.0


def test_a_larger_share_keeps_every_earlier_split_job_on_the_split_side():
    small, large = SplitSpec(("alt",), 0.1), SplitSpec(("alt",), 0.2)
    assert all(variant_of(i, large) == "split" for i in IDS if variant_of(i, small) == "split")


def test_no_split_or_share_zero_means_no_variant():
    assert {variant_of(i, None) for i in IDS[:200]} == {None}
    assert {variant_of(i, SplitSpec(("alt",), 0.0)) for i in IDS[:200]} == {None}
    assert {variant_of(i, SplitSpec(("alt",), 1.0)) for i in IDS[:200]} == {"split"}
    with pytest.raises(ValueError):
        SplitSpec(("alt",), 1.5)


def scheduler(split: SplitSpec | None, *, alt_upstream: str = "u") -> Scheduler:
    main = PoolSpec("main", "u", (KeySpec("m1", "main", "u", rps=1e6, burst=1e6),))
    alt = PoolSpec("alt", alt_upstream, (KeySpec("a1", "alt", alt_upstream, rps=1e6, burst=1e6),))
    tiers = (TierSpec("premium", 1, ("main",), split),)
    return Scheduler(SchedulerSpec(pools=(main, alt), tiers=tiers, safety_s=0.0), 0.0)


def run_all(s: Scheduler, ids: list[str]) -> list[Dispatch]:
    for job_id in ids:
        s.add(PendingJob(job_id, "premium", "u"), 0.0)
    out = []
    for _ in ids:
        decision = s.next(0.0)
        assert isinstance(decision, Dispatch)
        out.append(decision)
    return out


def test_split_jobs_use_the_split_chain_and_say_so():
    dispatched = run_all(scheduler(SplitSpec(("alt",), 0.3)), IDS[:2000])
    by_side = {"control": set(), "split": set()}
    for d in dispatched:
        by_side[d.variant].add(d.pool)
        assert d.variant == variant_of(d.job.job_id, SplitSpec(("alt",), 0.3))
    assert by_side == {"control": {"main"}, "split": {"alt"}}
    assert sum(d.variant == "split" for d in dispatched) / 2000 == pytest.approx(0.3, abs=0.03)


@pytest.mark.parametrize("split", [None, SplitSpec(("alt",), 0.0)])
def test_without_a_split_every_job_stays_on_the_tier_chain(split):
    dispatched = run_all(scheduler(split), IDS[:300])
    assert {(d.pool, d.variant) for d in dispatched} == {("main", None)}


def test_a_split_chain_without_the_jobs_upstream_leaves_the_job_in_control():
    dispatched = run_all(scheduler(SplitSpec(("alt",), 1.0), alt_upstream="other"), IDS[:50])
    assert {(d.pool, d.variant) for d in dispatched} == {("main", "control")}


def test_an_unknown_split_pool_is_refused():
    with pytest.raises(ValueError, match="nowhere"):
        scheduler(SplitSpec(("nowhere",), 0.5))
