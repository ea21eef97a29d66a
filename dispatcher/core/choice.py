"""Key choice along a tier's pool chain, and the test for jobs that can never run.

A chain is the tier's pools, in fallback order, restricted to one upstream. The first
pool with any usable key is used; within it the key with the most request tokens relative
to capacity wins (ties: fewest calls in flight, then configuration order). Later pools
are tried only when no key of the earlier ones is usable.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from ratefleet.schemas.result import ErrorCode

from .key import KeyState
from .types import PendingJob


@dataclass(frozen=True)
class Chain:
    """The keys a tier may use for one upstream, pool by pool in fallback order."""

    tier: str
    upstream: str
    all_pools: tuple[str, ...]  # the tier's whole chain, for messages
    pools: tuple[tuple[str, tuple[KeyState, ...]], ...]

    def keys(self) -> list[KeyState]:
        return [key for _, keys in self.pools for key in keys]


@dataclass(frozen=True)
class Reach:
    """What a chain can ever serve: keys that are enabled or will be probed, and the largest
    cost capacity among them."""

    enabled: int
    largest_cost: float


def reach(chain: Chain, now: float) -> Reach:
    """Keys that may still serve a job (enabled, or provider-disabled with a probe
    scheduled: a job waits for that probe rather than fail)."""
    enabled = [key for key in chain.keys() if key.health.comes_back(now)]
    return Reach(len(enabled), max((key.cost_capacity for key in enabled), default=0.0))


def _unusable(chain: Chain, now: float) -> str:
    parts = []
    for key in chain.keys():
        probe = key.health.view(now)["probe_in_s"]
        when = f"; next probe in {probe:g} s" if probe is not None else ""
        parts.append(f"{key.spec.id}: {key.disabled_reason or 'unusable'}{when}")
    return "; ".join(parts)


def never_runnable(chain: Chain, reach: Reach, job: PendingJob, now: float) -> str | None:
    """Why no key of `chain` can ever serve `job` (the Reject message, code no_key_available),
    or None if one can; a cost too large for every key is `over_budget`'s."""
    if not chain.pools:
        return (
            f"tier {chain.tier!r} has no pool for upstream {job.upstream!r} "
            f"(its pools: {', '.join(chain.all_pools) or 'none'}); "
            f"add a pool of upstream {job.upstream!r} to tiers.{chain.tier}.pools"
        )
    names = ", ".join(name for name, _ in chain.pools)
    if not reach.enabled:
        return (
            f"every key of pool(s) {names} (upstream {job.upstream!r}) used by tier "
            f"{chain.tier!r} is disabled or has no secret on any worker ({_unusable(chain, now)}); "
            f"enable an operator-disabled key (`ratefleet keys enable KEY`), set the secrets on "
            f"the workers, replace the keys, or add a pool with working keys to tiers.{chain.tier}.pools"
        )
    return None


def over_budget(chain: Chain, reach: Reach, job: PendingJob) -> tuple[ErrorCode, str] | None:
    """Why `job`'s stated cost can never be spent on `chain` (above every usable key's
    cost_per_minute), as the Reject's code and message, or None. The code is
    request_too_large (the job's own fault, as the provider's "Request too large": a replay
    fails the same way) unless a key out of use now could hold it (no_key_available). A cost
    the fleet estimated (`PendingJob.estimated`) is no reason: the scheduler charges such a
    job the largest capacity (`charged_cost`), and the provider says whether it fits."""
    if job.estimated or job.cost <= reach.largest_cost:
        return None
    names = ", ".join(name for name, _ in chain.pools)
    fits_one = any(key.cost_capacity >= job.cost for key in chain.keys())
    return (ErrorCode.NO_KEY_AVAILABLE if fits_one else ErrorCode.REQUEST_TOO_LARGE,
            f"job cost {job.cost:g} exceeds the cost capacity (cost_per_minute) of every "
            f"usable key of pool(s) {names} for tier {chain.tier!r} "
            f"(largest: {reach.largest_cost:g}); split the job or raise cost_per_minute")


def pick_key(chain: Chain, cost: float, now: float, waits: list[float],
             reserve: float = 0.0, skip: frozenset[str] = frozenset()) -> tuple[str, KeyState] | None:
    """The (pool, key) to use now, or None; appends future ready times to `waits`.

    `reserve` request tokens stay on each key for a higher tier (see SchedulerSpec). Keys
    in `skip` are passed over (no free worker holds them, or they refused this job).
    """
    for pool, keys in chain.pools:
        best: KeyState | None = None
        best_rank: tuple[float, int] = (math.inf, 0)
        for key in keys:
            if key.spec.id in skip:
                continue
            at = key.ready_at(now, cost, reserve)
            if at is None:
                continue
            if at > now:
                waits.append(at)
                continue
            rank = (-key.requests.advance(now) / key.requests.capacity, key.in_flight)
            if best is None or rank < best_rank:
                best, best_rank = key, rank
        if best is not None:
            return pool, best
    return None


class KeyRanking:
    """The keys of `chain` in the order they can take a job of `cost` after `now` (seconds),
    for the jobs of that cost in one scheduler pass: the key a job that cannot run now waits
    for (scheduler.py). The keys' ready times are read once, and each job behind a held one
    gets the next key in line. Before, every such job read every key twice again: with nothing
    ready (all keys waiting for a refill, a rate limit's usual state) a pass read the keys up
    to 2 x LOOKAHEAD times."""

    def __init__(self, chain: Chain, cost: float, now: float, reserve: float = 0.0) -> None:
        times = ((key.ready_at(now, cost, reserve), key.spec.id) for key in chain.keys())
        # (sorted is stable: keys ready at the same time keep their order, the first one wins)
        self._ids = [key_id for _, key_id in sorted(((at, key_id) for at, key_id in times if at is not None),
                                                    key=lambda item: item[0])]
        self._next = 0

    def soonest(self, skip: frozenset[str]) -> str | None:
        """The id of the key outside `skip` that can take the job soonest, or None when none can
        without a completion first (all at their concurrency cap, disabled, in a probe). `skip`
        only grows between calls (the keys held in this pass)."""
        while self._next < len(self._ids) and self._ids[self._next] in skip:
            self._next += 1  # (skipped once, skipped for the rest of the pass)
        return self._ids[self._next] if self._next < len(self._ids) else None


def charged_cost(job: PendingJob, reach: Reach) -> float:
    """What `job` is charged on its route: its cost, but an estimate at most the route's
    largest cost capacity (an estimate may be far above the real usage: inline data)."""
    return min(job.cost, reach.largest_cost) if job.estimated else job.cost
