"""The scheduler: which queued job runs on which key, and when.

Pure: every time-dependent call takes `now` (monotonic seconds; an earlier `now` than one
already seen counts as the latest one). `next` returns a decision value the shell carries
out; `complete`/`cancel` report back. Only the leader dispatcher owns a Scheduler, so it is
the single writer of key state (design invariant 2), and the shell calls `next` only while
a worker slot is free, so a spent token is used at once (invariant 3).

Within a tier jobs are FIFO, but `next` looks at up to LOOKAHEAD jobs so a job whose
upstream has no usable key does not block a job of another upstream behind it. A job does
not overtake an earlier job of its own upstream on the key that job waits for (that would
starve large jobs: the small ones would spend every refill), but may run on the route's other
keys: a job costing 80,000 of a 100,000 tokens/min key waits ~50 s for that key's refill, and
held the whole tier, every other key idle, for that long (measured: 2,000 jobs of very uneven
size took 212 s on two such keys, 50 % of it with no call at all). A job that no key can take
without a completion first (concurrency caps) still holds its whole route; a job that waits
for a key other than those that refused it (denials.py) holds nothing.

Key health (disable, probe, operator decisions, missing secrets) is in keyhealth.py; the
operator-facing methods are in keyadmin.py.
"""

from __future__ import annotations

import itertools
import math
from collections import OrderedDict
from typing import Any

from ratefleet.schemas.outcome import OutcomeKind
from ratefleet.schemas.result import ErrorCode

from .choice import Chain, KeyRanking, Reach, charged_cost, never_runnable, over_budget, pick_key, reach
from .denials import DenialBook
from .key import KeyState, Marks
from .keyadmin import KeyAdmin
from .keyhealth import probe_verdict
from .reconfigure import Reconfigure, check_spec, key_state
from .split import SplitSpec, Variant, variant_of
from .tiers import TierQueue
from .types import (
    Decision,
    Dispatch,
    Idle,
    Outcome,
    PendingJob,
    Reject,
    Reservation,
    SchedulerSpec,
    WaitUntil,
)

LOOKAHEAD = 16
VARIANT_MEMO = 65536  # job ids whose A/B side is remembered (then forgotten all at once)
FAILED_MEMORY = 10_000  # jobs whose failed keys are remembered (their retries avoid those keys)
SLOT_RESERVE_SHARE = 8  # the slot reserve is at most one slot in this many (a fleet of 4 slots keeps all 4)
LACK_MEMORY_S = 600.0  # seconds a key stays known to lack a model (its next jobs of that model go elsewhere)
LACK_MEMORY = 10_000  # (key, model) pairs remembered at most
_UNKNOWN = object()


class Scheduler(KeyAdmin, Reconfigure):
    """Dispatches queued jobs onto keys without exceeding any key's limits.

    Buckets start full; with `conservative=True` (a standby taking over from a leader whose
    spending it cannot know) the request and cost buckets start empty.
    """

    def __init__(self, spec: SchedulerSpec, now: float, *, conservative: bool = False) -> None:
        self._now = now
        self._spec = spec
        checked = check_spec(spec)
        self._keys = {key_id: key_state(spec, key, now, conservative=conservative)
                      for key_id, key in checked.keys.items()}
        self._retired: dict[str, KeyState] = {}  # removed by a config change, calls still in flight
        self._pool_upstream = checked.pool_upstream
        self._tiers = checked.tiers
        self._chains: dict[tuple[str, str, Variant | None], Chain] = {}
        # a job's A/B side, computed once (a SHA-256) rather than on every look-ahead pass
        self._variants: dict[tuple[str, SplitSpec], Variant | None] = {}
        self._active: dict[int, tuple[Reservation, Marks | None]] = {}
        self._ids = itertools.count(1)
        self._reserve = spec.priority_reserve
        self._slot_reserve = spec.priority_slots
        self._denials = DenialBook()
        # job id -> the keys its calls failed on (5xx, timeout, connection), the last FAILED_MEMORY jobs
        self._failed_on: OrderedDict[str, frozenset[str]] = OrderedDict()
        # model -> key id -> until when (monotonic) the key is known to lack it (a denial said so)
        self._lacking: dict[str, dict[str, float]] = {}
        self._changed: set[str] = set()  # keys whose health changed since key_changes()

    # -- queue ---------------------------------------------------------------------------

    def add(self, job: PendingJob, now: float) -> None:
        """Append `job` to its tier's queue; ValueError for an unknown tier or a negative cost."""
        self._tick(now)
        if job.cost < 0:
            raise ValueError(f"job {job.job_id!r}: cost must be >= 0, got {job.cost}")
        self._tiers.push(self._tiers.get(job.tier), job)

    def discard_pending(self) -> list[PendingJob]:
        """Drop every queued job (leadership lost) and return them, highest tier first."""
        return self._tiers.drain()

    def remove_pending(self, handles: set[int]) -> list[PendingJob]:
        """Drop the queued jobs whose `handle` is in `handles` (e.g. of a cancelled batch) and
        return them; nothing was reserved for them."""
        return self._tiers.remove(handles)

    def pending(self, tier: str) -> int:
        return len(self._tiers.get(tier).jobs)

    def in_flight(self, tier: str) -> int:
        return self._tiers.get(tier).in_flight

    # -- decisions -----------------------------------------------------------------------

    def next(self, now: float, skip_keys: frozenset[str] = frozenset(), *, free_slots: int | None = None,
             total_slots: int = 0) -> Decision:
        """The next thing for the shell to do; call it only while a worker slot is free.

        `skip_keys`: keys no worker with a free slot can call right now (the shell knows
        which workers hold which secrets); they are passed over like a busy key.
        `free_slots` / `total_slots`: the workers' free and total slots (None: not known, no
        slot reserve); at or below the reserve (`priority_slots`) only the top tier is served.

        Dispatch: run it (tokens, concurrency and any half-open probe are already taken).
        Reject: publish the job's failure and call `next` again. WaitUntil: call again at
        `at` or on any add/complete/cancel. Idle: call again on add/complete/cancel. Costs
        O(tiers x LOOKAHEAD + tiers x keys in the chain), never a scan of whole queues.
        """
        now = self._tick(now)
        waits: list[float] = []
        top = next(iter(self._tiers), None)
        reserve = self._reserve if top is not None and not top.jobs else 0.0
        top_only = free_slots is not None and free_slots <= self.reserved_slots(total_slots)
        for tier in self._tiers.in_order():
            if top_only and tier is not top:
                continue  # the last free slots wait for a top-tier job
            decision = self._scan(tier, now, waits, 0.0 if tier is top else reserve, skip_keys)
            if decision is not None:
                return decision
        return WaitUntil(min(waits)) if waits else Idle()

    def reserved_slots(self, total_slots: int) -> int:
        """Worker slots lower tiers leave free for the top tier: `priority_slots`, at most one
        in SLOT_RESERVE_SHARE of `total_slots` (none below that many slots)."""
        return min(self._slot_reserve, total_slots // SLOT_RESERVE_SHARE)

    def _scan(self, tier: TierQueue, now: float, waits: list[float], reserve: float,
              skip_keys: frozenset[str]) -> Dispatch | Reject | None:
        held: dict[tuple[str, Variant | None], frozenset[str] | None] = {}  # route -> keys waited for (None: all)
        reaches: dict[tuple[str, Variant | None], Reach] = {}
        # route -> the least cost no key outside the holds could take now (asked without refused keys): a
        # later job of the route costing as much has fewer keys to try and cannot run either
        missed: dict[tuple[str, Variant | None], float] = {}
        ranks: dict[tuple[tuple[str, Variant | None], float], KeyRanking] = {}  # the keys by when they take a cost
        for index, job in enumerate(itertools.islice(tier.jobs, LOOKAHEAD)):
            variant, chain = self._route(tier, job)
            route = (job.upstream, variant)
            if route not in reaches:
                reaches[route] = reach(chain, now)
            reason = never_runnable(chain, reaches[route], job, now)
            if reason is not None:
                del tier.jobs[index]
                return Reject(job, ErrorCode.NO_KEY_AVAILABLE, reason)
            too_costly = over_budget(chain, reaches[route], job)
            if too_costly is not None:
                del tier.jobs[index]
                return Reject(job, *too_costly)
            waited = held.get(route, frozenset())
            if waited is None:
                continue
            avoid = self._avoid(chain, job, now)
            cost = charged_cost(job, reaches[route])
            picked = None
            if cost < missed.get(route, math.inf):  # (else its keys' times are in `waits` already, no later)
                failed = self._failed_on.get(job.job_id)
                if failed:  # a retry after an upstream error: another key if one can take it now
                    picked = pick_key(chain, cost, now, [], reserve, skip_keys | waited | avoid | failed)
                if picked is None:
                    picked = pick_key(chain, cost, now, waits, reserve, skip_keys | waited | avoid)
                if picked is not None:
                    del tier.jobs[index]
                    return self._dispatch(tier, job, picked, now, chain, variant, cost)
                if not avoid:
                    missed[route] = min(cost, missed.get(route, math.inf))
            if not avoid:  # a job waiting for another key than those that refused it blocks no one
                ranking = ranks.get((route, cost))
                if ranking is None:
                    ranking = ranks[(route, cost)] = KeyRanking(chain, cost, now, reserve)
                target = ranking.soonest(skip_keys | waited)
                held[route] = None if target is None else waited | {target}
        return None

    def _route(self, tier: TierQueue, job: PendingJob) -> tuple[Variant | None, Chain]:
        """The job's A/B side and its chain: the split chain for a "split" job when that chain
        has a pool of the job's upstream, else the tier's own (variant "control")."""
        split = tier.spec.split
        variant = None if split is None else self._variant_of(job.job_id, split)
        if variant == "split":
            chain = self._chain(tier, job.upstream, variant)
            if chain.pools:
                return variant, chain
            variant = "control"
        return variant, self._chain(tier, job.upstream, variant)

    def _variant_of(self, job_id: str, split: SplitSpec) -> Variant | None:
        """`variant_of`, remembered for the last VARIANT_MEMO jobs seen on split tiers."""
        variant = self._variants.get((job_id, split), _UNKNOWN)
        if variant is _UNKNOWN:
            if len(self._variants) >= VARIANT_MEMO:
                self._variants.clear()
            variant = self._variants[(job_id, split)] = variant_of(job_id, split)
        return variant  # type: ignore[return-value]

    def _avoid(self, chain: Chain, job: PendingJob, now: float) -> frozenset[str]:
        """Keys that refused `job` (401/403, a model's 404) or are known to lack its model (for
        LACK_MEMORY_S after a denial said so), while the chain has another key for it."""
        denied = self._denials.denied_keys(job.job_id)
        lacking = self._lacking.get(job.model) if job.model is not None and self._lacking else None
        if lacking:
            avoided = denied | {key_id for key_id, until in lacking.items() if until > now}
            if any(k.spec.id not in avoided and k.health.could_serve(now) for k in chain.keys()):
                return avoided
            # every other key is known to lack the model: still never the keys that refused this job
            # (a reviewer: with both keys of a pool lacking it, the job went back to a key that refused it)
        if denied and any(k.spec.id not in denied and k.health.could_serve(now) for k in chain.keys()):
            return denied
        return frozenset()

    def _note_lack(self, job: PendingJob, key_id: str, outcome: Outcome, now: float) -> None:
        """A denial saying `key_id` lacks the job's model: that model's next jobs go to other keys
        for LACK_MEMORY_S (each paid a call on it before: a third of a batch on a pool where one
        key of three lacks the model); a success there clears it. LACK_MEMORY pairs at most
        (past that, the expired go, then all: it is a preference, and refills on the next denial)."""
        if job.model is None:
            return
        if outcome.kind == OutcomeKind.OK:
            self._forget_lack(job, key_id)
            return
        if outcome.lacks_model:
            self._remember_lack(job, key_id, now)

    def _forget_lack(self, job: PendingJob, key_id: str) -> None:
        """`key_id` may serve `job.model` again (its refusal was the request's)."""
        lacking = self._lacking.get(job.model) if job.model is not None else None
        if lacking is not None and lacking.pop(key_id, None) is not None and not lacking:
            del self._lacking[job.model]  # type: ignore[arg-type]

    def _remember_lack(self, job: PendingJob, key_id: str, now: float) -> None:
        """Send `job.model`'s next jobs to keys other than `key_id` for LACK_MEMORY_S."""
        if job.model is None:
            return
        if sum(map(len, self._lacking.values())) >= LACK_MEMORY:
            self._lacking = {model: live for model, keys in self._lacking.items()
                             if (live := {k: until for k, until in keys.items() if until > now})}
            if sum(map(len, self._lacking.values())) >= LACK_MEMORY:
                self._lacking.clear()
        self._lacking.setdefault(job.model, {})[key_id] = now + LACK_MEMORY_S

    def _note_failure(self, job_id: str, key_id: str, outcome: Outcome) -> None:
        """Remember the keys a job's calls failed on (upstream errors), forget them once it
        succeeds. Its retry then goes to another key that can take it now (else to any): idle
        keys tie, and the retries went back to a dead key (a reviewer's trial)."""
        if outcome.kind == OutcomeKind.OK:
            self._failed_on.pop(job_id, None)
        elif outcome.kind == OutcomeKind.UPSTREAM_ERROR:
            self._failed_on[job_id] = self._failed_on.pop(job_id, frozenset()) | {key_id}
            while len(self._failed_on) > FAILED_MEMORY:
                self._failed_on.popitem(last=False)

    def _dispatch(self, tier: TierQueue, job: PendingJob, picked: tuple[str, KeyState], now: float,
                  chain: Chain, variant: Variant | None, cost: float) -> Dispatch:
        pool, key = picked
        reservation_id = next(self._ids)
        probe = key.breaker.take_probe(reservation_id)
        key_probe = key.health.take_probe(reservation_id)
        marks = key.reserve(now, cost)
        denied = self._denials.denied_keys(job.job_id)
        others = any(k is not key and k.spec.id not in denied and k.health.could_serve(now) for k in chain.keys())
        reservation = Reservation(
            id=reservation_id, job=job, key_id=key.spec.id, pool=pool, cost=cost,
            generation=key.breaker.generation, at=now, probe=probe, key_probe=key_probe,
            denial_final=bool(denied - {key.spec.id}) or not others,
        )
        self._active[reservation_id] = (reservation, marks)
        self._tiers.charge(tier)
        return Dispatch(job, key.spec.id, pool, reservation, variant)

    def _chain(self, tier: TierQueue, upstream: str, variant: Variant | None = None) -> Chain:
        chain = self._chains.get((tier.name, upstream, variant))
        if chain is None:
            split = tier.spec.split
            names = split.pools if variant == "split" and split is not None else tier.spec.pools
            pools = tuple(
                (name, tuple(k for k in self._keys.values() if k.spec.pool == name))
                for name in names
                if self._pool_upstream[name] == upstream
            )
            chain = Chain(tier.name, upstream, names, pools)
            self._chains[(tier.name, upstream, variant)] = chain
        return chain

    # -- reports -------------------------------------------------------------------------

    def cancel(self, reservation: Reservation, now: float) -> None:
        """The call was not made: give back tokens, slot and probe; requeue the job at the head.

        Cancelling a reservation that is not active (already completed or cancelled) does nothing.
        """
        now = self._tick(now)
        entry = self._active.pop(reservation.id, None)
        if entry is None:
            return
        key = self._key(reservation.key_id)
        assert key is not None  # a reserved key stays known (retired) until its calls end
        key.breaker.release_probe(reservation.id)
        key.health.release_probe(reservation.id)
        if reservation.adopted or entry[1] is None:
            key.in_flight -= 1
            self.retire_if_idle(reservation.key_id)
            return
        key.give_back(now, reservation.cost, entry[1])
        self.retire_if_idle(reservation.key_id)
        tier = self._tiers.find(reservation.job.tier)
        if tier is not None:  # else (its tier removed) the job comes back from JetStream
            self._tiers.uncharge(tier)
            self._tiers.push(tier, reservation.job, front=True)

    def complete(self, reservation: Reservation, outcome: Outcome, now: float) -> None:
        """Report the outcome of a reserved call.

        Frees the slot and the probes, feeds the breaker (same generation only), applies the
        key signals (key-scoped evidence disables, 401/403 evidence per denials.py, a key
        probe's verdict) and corrects the cost bucket by the actual cost. A reservation that
        is not active (completed twice, or after cancel) is treated like `complete_unknown`.
        """
        now = self._tick(now)
        entry = self._active.pop(reservation.id, None)
        key = self._key(reservation.key_id)
        if entry is None or key is None:
            self.complete_unknown(reservation.key_id, outcome, now)
            return
        key.in_flight -= 1
        tier = None if reservation.adopted else self._tiers.find(reservation.job.tier)
        if tier is not None:
            tier.in_flight -= 1
        marks = entry[1]
        if marks is not None:
            key.correct_cost(now, reservation.cost, outcome.actual_cost, marks.cost)
        # an adopted call was sent at or before its adoption (`at`), so a 429 of it after a fresh
        # one is an echo like our own calls'; its placeholder job id is its own, like a job's
        if key.observe(outcome, now, reservation.at, reservation.job.job_id):
            self._changed.add(key.spec.id)
        self._weigh_denials(reservation, outcome, now)
        self._note_lack(reservation.job, reservation.key_id, outcome, now)
        self._note_failure(reservation.job.job_id, reservation.key_id, outcome)
        if reservation.key_probe and outcome.kind == OutcomeKind.DENIED:
            key.health.postpone_probe(reservation.id, now)  # no verdict (denials.py judges the job)
        elif reservation.key_probe and key.health.settle_probe(reservation.id, probe_verdict(outcome), now):
            self._changed.add(key.spec.id)
            if not key.health.disabled:
                self._denials.forget_key(key.spec.id)
        key.breaker.settle(reservation.id, reservation.generation, outcome.kind, now, reservation.job.job_id)
        self.retire_if_idle(reservation.key_id)


    def _weigh_denials(self, reservation: Reservation, outcome: Outcome, now: float) -> None:
        job_id = reservation.job.job_id
        if outcome.kind == OutcomeKind.DENIED:
            verdicts = self._denials.on_denied(job_id, reservation.key_id, outcome.status,
                                               reservation.denial_final, now,
                                               lacks_model=outcome.lacks_model)
            if outcome.status == 403 and not reservation.denial_final:
                self._remember_lack(reservation.job, reservation.key_id, now)  # lifted if the request was at fault
            for key_id in verdicts.request_refused:
                self._forget_lack(reservation.job, key_id)
        elif outcome.kind == OutcomeKind.OK:
            verdicts = self._denials.on_ok(job_id, reservation.key_id, now)
        else:
            return
        for key_id in verdicts.refused_model:
            self._remember_lack(reservation.job, key_id, now)
        for key_id, reason in verdicts.disable:
            if key_id in self._keys and self._keys[key_id].health.disable("provider", reason, now):
                self._changed.add(key_id)
        for key_id in verdicts.enable:  # its 401 evidence was withdrawn: the jobs were at fault
            if key_id not in self._keys:
                continue
            health = self._keys[key_id].health
            if health.by == "provider" and health.probe is None and health.enable():
                self._denials.forget_key(key_id)
                self._changed.add(key_id)

    def complete_unknown(self, key_id: str, outcome: Outcome, now: float) -> None:
        """Outcome of a call this scheduler did not reserve: key signals only.

        Applies 429 cooldown, disable and ratelimit resync; no concurrency change and no
        breaker feed (its generation is unknown). Unknown key ids are ignored.
        """
        now = self._tick(now)
        key = self._keys.get(key_id)
        if key is not None and key.observe(outcome, now):
            self._changed.add(key_id)

    def adopt_in_flight(self, key_id: str, count: int, now: float) -> list[Reservation]:
        """Count `count` calls a previous leader started on `key_id` against its concurrency.

        Returns placeholder reservations (adopted=True, cost 0, tier "") to `complete` or
        `cancel` later; their outcomes feed the breaker like any other.
        """
        now = self._tick(now)
        key = self._keys.get(key_id)
        if key is None:
            raise ValueError(f"unknown key {key_id!r}")
        if count < 0:
            raise ValueError("count must be >= 0")
        placeholders = []
        for _ in range(count):
            reservation_id = next(self._ids)
            job = PendingJob(f"adopted-{key_id}-{reservation_id}", "", key.spec.upstream, 0.0)
            reservation = Reservation(
                id=reservation_id, job=job, key_id=key_id, pool=key.spec.pool, cost=0.0,
                generation=key.breaker.generation, at=now, probe=False, adopted=True,
            )
            self._active[reservation_id] = (reservation, None)
            key.in_flight += 1
            placeholders.append(reservation)
        return placeholders

    # -- status --------------------------------------------------------------------------

    def snapshot(self, now: float) -> dict[str, Any]:
        """Tiers and keys as JSON-able dicts (key fields: `KeyState.snapshot`)."""
        now = self._tick(now)
        tiers = {
            t.name: {"pending": len(t.jobs), "in_flight": t.in_flight, "dispatched": t.dispatched}
            for t in self._tiers
        }
        return {"tiers": tiers, "keys": {kid: k.snapshot(now) for kid, k in self._keys.items()}}

    def _tick(self, now: float) -> float:
        self._now = max(self._now, now)
        return self._now
