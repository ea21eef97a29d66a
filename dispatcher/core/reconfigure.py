"""A live config change of the scheduler: keys, pools, tiers and weights, policy.

The rule (issue 9 section 2): a key whose spec did not change keeps all of its state; a key
with new limits keeps its state too (breaker, cooldown, health, counters, calls in flight)
and its buckets keep their level, so a reload never refills a burst (a smaller burst cuts
the level, a larger one only leaves room to refill); a new key starts like a key at leader
start; a removed key takes no new job, and its calls in flight finish and are accounted
(it is kept aside until the last one completes). Tiers: queued jobs keep their place, a
removed tier's queued jobs are returned to the caller (the leader hands them back).

`plan_keys` is the pure decision; `Reconfigure.reconfigure` (a mixin of `Scheduler`)
carries it out with `now` passed in.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from .adaptive import AdaptiveRate
from .bucket import TokenBucket
from .key import KeyState
from .tiers import TierBook
from .types import KeySpec, PendingJob, SchedulerSpec

if TYPE_CHECKING:
    from .choice import Chain
    from .split import Variant


@dataclass(frozen=True)
class KeyPlan:
    """What a config change does to each key id (each tuple in the new spec's order,
    `removed` in the old one's)."""

    kept: tuple[str, ...] = ()
    changed: tuple[str, ...] = ()
    added: tuple[str, ...] = ()
    removed: tuple[str, ...] = ()


@dataclass(frozen=True)
class Reconfigured:
    """The outcome of `Scheduler.reconfigure`: the key plan, tier names added and removed, and
    the jobs that were queued in removed tiers (no longer in the scheduler)."""

    keys: KeyPlan
    tiers_added: tuple[str, ...] = ()
    tiers_removed: tuple[str, ...] = ()
    dropped: tuple[PendingJob, ...] = field(default=())


def plan_keys(old: Mapping[str, KeySpec], new: Mapping[str, KeySpec]) -> KeyPlan:
    """Sort key ids into kept (same spec), changed (same id, other limits or pool), added and
    removed. Pure; specs compare by value."""
    kept = tuple(k for k, spec in new.items() if old.get(k) == spec)
    changed = tuple(k for k, spec in new.items() if k in old and old[k] != spec)
    added = tuple(k for k in new if k not in old)
    removed = tuple(k for k in old if k not in new)
    return KeyPlan(kept, changed, added, removed)


def relimit(key: KeyState, spec: KeySpec, now: float) -> None:
    """Give `key` new limits at `now` without refilling anything (see the module docstring).

    A cost limit that is new starts empty (what the key spent in the last minute is not
    known); one that is dropped stops counting."""
    key.spec = spec
    key._capacity = max(1.0, spec.burst - key._safety_s * spec.rps)
    key.request_rate.reconfigure(spec.rps)
    if spec.cost_per_minute is None:
        key.cost, key.cost_rate = None, None
    elif key.cost is None or key.cost_rate is None:
        cpm = spec.cost_per_minute
        key.cost = TokenBucket(cpm / 60.0, cpm, 0.0, now)
        key.cost_rate = AdaptiveRate(cpm / 60.0, key.request_rate.policy, now)
    else:
        key.cost_rate.reconfigure(spec.cost_per_minute / 60.0)
        key.cost.set_rate(now, key.cost_rate.rate, spec.cost_per_minute)
    key._apply_rates(now)


class Reconfigure:
    """`Scheduler.reconfigure`; the attributes are the Scheduler's."""

    _keys: dict[str, KeyState]
    _retired: dict[str, KeyState]
    _pool_upstream: dict[str, str]
    _tiers: TierBook
    _chains: dict[tuple[str, str, Variant | None], Chain]  # (tier, upstream, A/B variant)
    _reserve: float
    _slot_reserve: int
    _tick: Callable[[float], float]
    _spec: SchedulerSpec

    def reconfigure(self, spec: SchedulerSpec, now: float) -> Reconfigured:
        """Apply a new spec at `now` (monotonic seconds). Validates it first: ValueError (and
        nothing changed) for a spec `Scheduler(spec)` would refuse. Breaker, cooldown, probe,
        adapt and safety policies apply to keys added from now on."""
        now = self._tick(now)
        checked = check_spec(spec)
        specs, tiers, pool_upstream = checked.keys, checked.tiers, checked.pool_upstream
        self._spec = spec  # the policies of keys added from now on (`_new_key`)
        plan = plan_keys({k: key.spec for k, key in self._keys.items()}, specs)
        self._apply_keys(plan, specs, now)
        old_tiers = {t.name for t in self._tiers}
        removed, dropped = self._move_tiers(tiers)
        self._tiers, self._pool_upstream, self._chains = tiers, pool_upstream, {}
        self._reserve = spec.priority_reserve
        self._slot_reserve = spec.priority_slots
        added = tuple(t.name for t in tiers if t.name not in old_tiers)
        return Reconfigured(plan, added, tuple(removed), tuple(dropped))

    def _apply_keys(self, plan: KeyPlan, specs: Mapping[str, KeySpec], now: float) -> None:
        keys: dict[str, KeyState] = {}
        for key_id, spec in specs.items():
            if key_id in plan.added:
                # a key removed and added back while its calls still run keeps its state
                retired = self._retired.pop(key_id) if key_id in self._retired else None
                keys[key_id] = retired or self._new_key(spec, now)
                if keys[key_id].spec != spec:
                    relimit(keys[key_id], spec, now)
            else:
                keys[key_id] = self._keys[key_id]
                if key_id in plan.changed:
                    relimit(keys[key_id], spec, now)
        for key_id in plan.removed:
            if self._keys[key_id].in_flight > 0:
                self._retired[key_id] = self._keys[key_id]  # its calls in flight finish and are counted
        self._keys = keys

    def _move_tiers(self, tiers: TierBook) -> tuple[list[str], list[PendingJob]]:
        """Carry queues and counters over to `tiers`; jobs of removed tiers are returned."""
        old = {t.name: t for t in self._tiers}
        removed: list[str] = []
        dropped: list[PendingJob] = []
        for name, queue in old.items():
            try:
                target = tiers.get(name)
            except ValueError:
                removed.append(name)
                dropped.extend(queue.jobs)
                continue
            target.jobs, target.in_flight, target.dispatched = queue.jobs, queue.in_flight, queue.dispatched
        return removed, dropped

    def _key(self, key_id: str) -> KeyState | None:
        """A configured key, or a removed one whose calls are still in flight."""
        return self._keys.get(key_id) or self._retired.get(key_id)

    def _new_key(self, spec: KeySpec, now: float) -> KeyState:
        return key_state(self._spec, spec, now, conservative=False)

    def retire_if_idle(self, key_id: str) -> None:
        """Forget a removed key once its last call in flight completed."""
        key = self._retired.get(key_id)
        if key is not None and key.in_flight <= 0:
            del self._retired[key_id]


@dataclass(frozen=True)
class CheckedSpec:
    """A valid spec's key specs by id, its tiers, and the upstream of each pool by name."""

    keys: dict[str, KeySpec]
    tiers: TierBook
    pool_upstream: dict[str, str]


def check_spec(spec: SchedulerSpec) -> CheckedSpec:
    """Everything `Scheduler(spec)` and `reconfigure(spec)` refuse, in one place: ValueError
    naming the problem (pool names twice, a key's own checks, a key id twice, a negative
    `priority_reserve`, tier names twice, a tier or its A/B split naming an unknown pool)."""
    if len({pool.name for pool in spec.pools}) != len(spec.pools):
        raise ValueError("pool names must be unique")
    keys: dict[str, KeySpec] = {}
    for pool in spec.pools:
        for key in checked_keys(pool.name, pool.upstream, pool.keys):
            if key.id in keys:
                raise ValueError(f"key id {key.id!r} appears twice")
            keys[key.id] = key
    if spec.priority_reserve < 0:
        raise ValueError("priority_reserve must be >= 0")
    if spec.priority_slots < 0:
        raise ValueError("priority_slots must be >= 0")
    tiers = TierBook(spec.tiers, spec.policy)
    pool_upstream = {pool.name: pool.upstream for pool in spec.pools}
    for tier in tiers:
        split_pools = tier.spec.split.pools if tier.spec.split else ()
        missing = [p for p in (*tier.spec.pools, *split_pools) if p not in pool_upstream]
        if missing:
            raise ValueError(f"tier {tier.name!r} names unknown pool(s): {', '.join(missing)}")
    return CheckedSpec(keys, tiers, pool_upstream)


def key_state(spec: SchedulerSpec, key: KeySpec, now: float, *, conservative: bool) -> KeyState:
    """A key's state, started under `spec`'s breaker, cooldown, probe, adapt and safety policies."""
    return KeyState(key, safety_s=spec.safety_s, breaker=spec.breaker, cooldown=spec.cooldown, now=now,
                    conservative=conservative, probe=spec.probe, adapt=spec.adapt)


def checked_keys(pool: str, upstream: str, keys: Iterable[KeySpec]) -> Iterable[KeySpec]:
    """`keys` of one pool, each checked (ValueError naming the pool and key)."""
    for key in keys:
        where = f"pool {pool!r}, key {key.id!r}"
        if key.pool != pool or key.upstream != upstream:
            raise ValueError(f"{where}: pool/upstream fields must match the pool ({pool}, {upstream})")
        if key.rps <= 0 or key.burst < 1:
            raise ValueError(f"{where}: rps must be > 0 and burst >= 1")
        if key.concurrency is not None and key.concurrency < 1:
            raise ValueError(f"{where}: concurrency must be >= 1 when set")
        if key.cost_per_minute is not None and key.cost_per_minute <= 0:
            raise ValueError(f"{where}: cost_per_minute must be > 0 when set")
        yield key
