"""Tier queues and the order in which tiers get the next free key.

"weighted" is stride scheduling with exact integer arithmetic: each tier's stride is
lcm(weights) / weight and its pass grows by its stride per dispatch; the tier with the
lowest pass that has a dispatchable job goes next (ties: higher priority). A tier whose
queue goes from empty to non-empty starts at max(own pass, lowest pass of the other
non-empty tiers), so time spent idle is not banked as credit; a consequence is that a vip
job arriving behind a guest backlog gets the next free token. "strict" always serves the
highest-priority tier with a dispatchable job.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Iterator

from .types import PendingJob, Policy, TierSpec


class TierQueue:
    """One tier's FIFO of pending jobs and its counters."""

    def __init__(self, spec: TierSpec, rank: int, stride: int) -> None:
        self.spec = spec
        self.rank = rank  # 0 = highest priority
        self.stride = stride
        self.pass_value = 0
        self.jobs: deque[PendingJob] = deque()
        self.in_flight = 0
        self.dispatched = 0

    @property
    def name(self) -> str:
        return self.spec.name


class TierBook:
    """All tiers: queues, pass values and the policy that orders them."""

    def __init__(self, tiers: tuple[TierSpec, ...], policy: Policy) -> None:
        if policy not in ("weighted", "strict"):
            raise ValueError(f"unknown tier policy {policy!r}: use 'weighted' or 'strict'")
        for tier in tiers:
            if tier.weight < 1:
                raise ValueError(f"tier {tier.name!r}: weight must be an integer >= 1")
        scale = math.lcm(*(tier.weight for tier in tiers)) if tiers else 1
        self.policy = policy
        self._tiers = {t.name: TierQueue(t, rank, scale // t.weight) for rank, t in enumerate(tiers)}
        if len(self._tiers) != len(tiers):
            raise ValueError("tier names must be unique")

    def __iter__(self) -> Iterator[TierQueue]:
        return iter(self._tiers.values())

    def get(self, name: str) -> TierQueue:
        try:
            return self._tiers[name]
        except KeyError:
            known = ", ".join(self._tiers) or "none"
            raise ValueError(f"unknown tier {name!r} (configured: {known})") from None

    def find(self, name: str) -> TierQueue | None:
        """The tier named `name`, or None (e.g. removed by a config change)."""
        return self._tiers.get(name)

    def push(self, tier: TierQueue, job: PendingJob, *, front: bool = False) -> None:
        """Queue `job` (at the head when `front`), starting the tier's pass fairly."""
        if not tier.jobs:
            others = [t.pass_value for t in self._tiers.values() if t.jobs and t is not tier]
            if others:
                tier.pass_value = max(tier.pass_value, min(others))
        if front:
            tier.jobs.appendleft(job)
        else:
            tier.jobs.append(job)

    def in_order(self) -> list[TierQueue]:
        """Non-empty tiers in the order they should be offered the next free key."""
        busy = [t for t in self._tiers.values() if t.jobs]
        if self.policy == "weighted":
            busy.sort(key=lambda t: (t.pass_value, t.rank))
        return busy

    def charge(self, tier: TierQueue) -> None:
        """Account one dispatch from `tier`."""
        tier.pass_value += tier.stride
        tier.in_flight += 1
        tier.dispatched += 1

    def uncharge(self, tier: TierQueue) -> None:
        """Undo `charge` for a cancelled dispatch."""
        tier.pass_value -= tier.stride
        tier.in_flight -= 1
        tier.dispatched -= 1

    def remove(self, handles: set[int]) -> list[PendingJob]:
        """Remove and return the queued jobs whose handle is in `handles` (order kept)."""
        removed: list[PendingJob] = []
        for tier in self._tiers.values():
            if any(job.handle in handles for job in tier.jobs):
                kept = deque(job for job in tier.jobs if job.handle not in handles)
                removed.extend(job for job in tier.jobs if job.handle in handles)
                tier.jobs = kept
        return removed

    def drain(self) -> list[PendingJob]:
        """Remove and return every queued job, highest tier first."""
        jobs: list[PendingJob] = []
        for tier in self._tiers.values():
            jobs.extend(tier.jobs)
            tier.jobs.clear()
        return jobs
