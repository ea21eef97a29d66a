"""Everything the scheduler knows about one API key, and the signals that change it.

A key is usable for a job of cost c at `now` when it is enabled (or its probe is due, see
keyhealth.py) and some worker holds its secret, its breaker admits a call (closed;
half-open with no probe in flight; open past the reset timeout), its cooldown has ended,
it is below its concurrency cap, and its request bucket holds 1 token and its cost bucket
(when configured) c tokens. `ready_at` folds all of that into one time.

The buckets refill at the key's effective rate (adaptive.py), which 429s and the
provider's ratelimit headers pull below the configured one and successes lift back.
A 429 is "fresh" when its call was sent after the last fresh one was seen; the others
are echoes of the same overload (calls already on the wire): they honour their
Retry-After but neither lengthen the backoff nor lower the rate again, as TCP reacts to
one loss per round trip.

Only a key-scoped 429 throttles the key. A request-scoped one (the worker's
`Outcome.scope == "request"`: the key's own headers showed room, or the provider said the
request itself is too large; see ratelimit_scope.py) is counted and nothing more: no
cooldown, no rate drop, no streak. Unless its headers say the key is out of room (`scope`
"key"), a 429 that repeats one this key gave the same job before, with other jobs served
since and since the key's last fresh throttle, is that job's own (its retries back off on
their own nak delay), and it is no evidence against the key either: a few jobs that always
get 429 cannot hold a key down for everyone, however their 429s interleave (before, two
such jobs alternating kept both keys of a pool near 1 % of their rate). The first 429 of a
job still acts on the key, which bounds what a misreading costs.
Headers showing room can mislead (a limit they do not report, such as concurrency): when
429s of different jobs come back to back on a key with no success in between, the key is
refusing everyone, and such a 429 is the key's whatever its headers said. Nor is room in
them worth much once another job got a 429 on the key within ROOM_429_WINDOW_S, successes
between or not: the remaining counts are per minute (OpenAI x-ratelimit-remaining-*, Azure
OpenAI's, anthropic-ratelimit-*-remaining) while the providers enforce over seconds (Azure
per 1 or 10 s, Anthropic a token bucket and a concurrency cap), so the headers show room
while the key is out of it. Before, such 429s never slowed the key: 38-43 % of calls came
back 429 against a provider allowing 2 req/s of the 5 configured.
A key-scoped 429 that nothing confirms (no header or body saying the key is out of room, no
other job's 429 just before it, and the key served a job since its last throttle) cools
the key for at most the cooldown policy's max_s whatever Retry-After it names: one job's
`Retry-After: 3600` does not close a working key for an hour; the next job's 429 confirms it.
"""

from __future__ import annotations

import math
from collections import OrderedDict, deque
from dataclasses import dataclass
from typing import Any

from ratefleet.schemas.outcome import OutcomeKind, RateLimitInfo

from .adaptive import AdaptiveRate, AdaptPolicy, header_rate
from .breaker import KeyBreaker
from .bucket import TokenBucket
from .keyhealth import KeyHealth
from .types import BreakerPolicy, CooldownPolicy, KeySpec, Outcome, ProbePolicy

_MAX_DOUBLINGS = 62
SENT_WINDOW_S = 2.0  # the rate a key was actually sent at is measured over this window
ROOM_429_WINDOW_S = 10.0  # another job's 429 this recent on the key outweighs headers showing room
MIN_SENT_CALLS = 5  # fewer calls in the window measure nothing (1 call in 2 s is not "0.5/s")
JOB_429_MEMORY = 256  # jobs whose last 429 on a key is remembered (to see one job repeat)


@dataclass
class KeyStats:
    """Outcome counters; `errors` counts upstream_error, key_error and bad_request;
    `rate_limited` every 429, `request_scoped_429` those that did not throttle the key."""

    calls: int = 0
    ok: int = 0
    rate_limited: int = 0
    errors: int = 0
    request_scoped_429: int = 0


class RefusedJobs:
    """When each of the last JOB_429_MEMORY jobs to get a 429 on a key got its last one there
    (`KeyState.repeats`). Per key only: counting a job's 429 on another key as a repeat let
    an org-wide limit shared by all keys go unthrottled (a reviewer measured 2-3x the 429s)."""

    def __init__(self, memory: int = JOB_429_MEMORY) -> None:
        self._at: OrderedDict[str, float] = OrderedDict()
        self._memory = memory

    def get(self, job_id: str | None) -> float | None:
        return self._at.get(job_id) if job_id is not None else None

    def note(self, job_id: str | None, now: float) -> None:
        if job_id is None:
            return
        self._at[job_id] = now
        self._at.move_to_end(job_id)
        while len(self._at) > self._memory:
            self._at.popitem(last=False)


@dataclass(frozen=True)
class Marks:
    """Bucket marks of one reservation, needed to give its tokens back safely."""

    requests: int
    cost: int | None


class KeyState:
    """Limits, buckets, breaker, cooldown and counters of one key."""

    def __init__(
        self,
        spec: KeySpec,
        *,
        safety_s: float,
        breaker: BreakerPolicy,
        cooldown: CooldownPolicy,
        now: float,
        conservative: bool,
        probe: ProbePolicy = ProbePolicy(),
        adapt: AdaptPolicy = AdaptPolicy(),
    ) -> None:
        self.spec = spec
        self.cooldown = cooldown
        self._safety_s = safety_s
        self._capacity = max(1.0, spec.burst - safety_s * spec.rps)
        self.answered = False  # no answer yet: the burst is held to adapt.first_burst
        self._first_burst = adapt.first_burst if adapt.enabled else None
        first = self._capacity if self._first_burst is None else min(self._capacity, self._first_burst)
        self.requests = TokenBucket(spec.rps, first, 0.0 if conservative else first, now)
        self.request_rate = AdaptiveRate(spec.rps, adapt, now)
        self.cost: TokenBucket | None = None
        self.cost_rate: AdaptiveRate | None = None
        if spec.cost_per_minute is not None:
            cpm = spec.cost_per_minute
            self.cost = TokenBucket(cpm / 60.0, cpm, 0.0 if conservative else cpm, now)
            self.cost_rate = AdaptiveRate(cpm / 60.0, adapt, now)
        self.limit_hint: float | None = None  # the request limit the provider last reported
        self.usage_reported = False  # an answer reported its actual cost (usage_path): the cost bucket tracks it
        self.throttled_at = -math.inf  # when the last fresh 429 was seen
        self.refusing = False  # its last fresh answer was a key-scoped 429 (status: `throttled`)
        self.ok_at = -math.inf  # when the last success was seen
        self._job_429s = RefusedJobs()  # job id -> its last 429 here
        self._last_429: tuple[str | None, float] = (None, -math.inf)  # (job id, when) of the last 429
        self._sent: deque[float] = deque()  # dispatch times of the last SENT_WINDOW_S (`reserve` prunes)
        self.breaker = KeyBreaker(breaker, name=spec.id)
        self.cooldown_until = -math.inf
        self.streak_429 = 0
        self.in_flight = 0
        self.health = KeyHealth(probe)
        self.stats = KeyStats()

    @property
    def disabled_reason(self) -> str | None:
        """Why the key takes no jobs (disabled, or no worker holds its secret), else None."""
        if self.health.reason is not None:
            return self.health.reason
        if self.health.secret_missing is not None:
            return f"no worker has its secret ({self.health.secret_missing})"
        return None

    @property
    def cost_capacity(self) -> float:
        return self.cost.capacity if self.cost is not None else math.inf

    def ready_at(self, now: float, cost: float, reserve: float = 0.0) -> float | None:
        """Earliest time >= now this key can take a job of `cost`, leaving `reserve`
        request tokens (only when the capacity can hold them) for a higher tier.

        None when only a completion can free it (concurrency cap, probe in flight) or
        nothing can (operator-disabled, no secret, cost above the cost capacity). A key
        disabled on provider evidence is ready at its probe time.
        """
        health_gate = self.health.gate(now)
        if health_gate is None or cost > self.cost_capacity:
            return None
        cap = self.spec.concurrency
        if cap is not None and self.in_flight >= cap:
            return None
        gate = self.breaker.gate(now)
        if gate is None:
            return None
        needed = 1.0 + reserve if self.requests.capacity >= 1.0 + reserve else 1.0
        at = max(now, gate, health_gate, self.cooldown_until, self.requests.ready_at(now, needed))
        if self.cost is not None:
            # as a request bucket's burst leaves its last safety_s * rps: the provider's bucket sees a call
            # up to safety_s sooner than ours when its transit is shorter than the call before it (the
            # first call of a connection is slower), so the last safety_s of the cost rate stays unspent,
            # except by a job that needs the whole capacity
            needed_cost = min(cost + self._safety_s * self.cost.rate, self.cost.capacity)
            at = max(at, self.cost.ready_at(now, needed_cost))
        return at

    def reserve(self, now: float, cost: float) -> Marks:
        """Spend one request token and `cost` cost tokens, and count the call in flight."""
        self.in_flight += 1
        self._sent.append(now)
        while self._sent[0] <= now - SENT_WINDOW_S:  # only the window is measured, at any rate
            self._sent.popleft()
        cost_mark = self.cost.take(now, cost) if self.cost is not None else None
        return Marks(self.requests.take(now, 1.0), cost_mark)

    def give_back(self, now: float, cost: float, marks: Marks) -> None:
        """Undo `reserve` for a call that was never made."""
        self.in_flight -= 1
        self.requests.refund(now, 1.0, marks.requests)
        if self.cost is not None and marks.cost is not None:
            self.cost.refund(now, cost, marks.cost)

    def correct_cost(self, now: float, reserved: float, actual: float | None, mark: int | None) -> None:
        """Charge the difference between the actual and the reserved cost (tokens).

        One call's overrun is capped at one bucket (`cost_per_minute` tokens): a provider
        refuses a request larger than its tokens-per-minute limit before it runs (OpenAI's
        "Request too large" 429), so a usage figure past that is not a cost the provider's
        bucket charged. Uncapped, one answer reporting 10,000,000 tokens on a 600/min key left
        it idle for 11 days, shown `ok`. The cap is per call, not on the level: calls in flight
        together that each overran their estimates all stay charged (capping the level let 60
        such calls spend 1.9 x the limit, a reviewer's simulation)."""
        if self.cost is None or actual is None or mark is None:
            return
        if actual > reserved:
            self.cost.take(now, min(actual - reserved, self.cost.capacity))
        elif actual < reserved:
            self.cost.refund(now, reserved - actual, mark)

    def observe(self, outcome: Outcome, now: float, sent_at: float | None = None, job_id: str | None = None) -> bool:
        """Apply a call's key signals: counters, 429 backoff and rate drop (key-scoped 429s
        only), disable on key-scoped evidence, ratelimit resync, rate climb. `sent_at`: when
        the call was dispatched (None when unknown: then a 429 counts as fresh); `job_id`:
        the job it was for (None when unknown). Returns whether the key was disabled by it."""
        if outcome.kind == OutcomeKind.NONE:
            return False
        self.answered = True
        if outcome.actual_cost is not None:
            self.usage_reported = True
        self._count(outcome)
        disabled = False
        fresh = sent_at is None or sent_at >= self.throttled_at
        if fresh and outcome.status is not None and outcome.kind != OutcomeKind.RATE_LIMITED:
            self.refusing = False  # answered past the provider's limiter (a 2xx, a 400, a 5xx)
        if outcome.kind == OutcomeKind.OK:
            if fresh:
                self.streak_429 = 0
            self.ok_at = now
            self.request_rate.on_success(now)
            if self.cost_rate is not None:
                self.cost_rate.on_success(now)
        elif outcome.kind == OutcomeKind.RATE_LIMITED:
            repeat = outcome.scope != "key" and self.repeats(job_id)
            if repeat or self.request_scoped(outcome, job_id, now):
                self.stats.request_scoped_429 += 1
            else:
                self._throttled(outcome, now, fresh, confirmed=self._confirmed(outcome, job_id))
            self._note_job_429(job_id, now, repeat)
        elif outcome.kind == OutcomeKind.KEY_ERROR:
            disabled = self.health.disable("provider", key_error_reason(outcome), now)
        if outcome.ratelimit is not None:
            self._resync(outcome.ratelimit, now)
        self._apply_rates(now)
        return disabled

    def _throttled(self, outcome: Outcome, now: float, fresh: bool, confirmed: bool) -> None:
        """A key-scoped 429: back off and slow down (fresh), or honour its wait (an echo).
        An unconfirmed one (see `_confirmed`) waits at most the cooldown policy's max_s,
        whatever Retry-After it names: one job's 429 does not close the key for an hour."""
        retry_after = outcome.retry_after_s
        if retry_after is not None and not confirmed:
            retry_after = min(retry_after, self.cooldown.max_s)
        if not fresh:  # an echo of the 429 already acted on
            self._cool(now, retry_after or 0.0)
            return
        self.streak_429 += 1
        self.throttled_at = now
        self.refusing = True
        info = outcome.ratelimit
        tokens_out = (info is not None and info.remaining_tokens is not None and info.remaining_tokens <= 0
                      and not (info.remaining_requests is not None and info.remaining_requests <= 0))
        if tokens_out and self.cost_rate is not None:
            self.cost_rate.on_throttle(now, None)
        else:
            self.request_rate.on_throttle(now, self.sent_rate(now))
        self._cool(now, self._backoff(retry_after))

    def _restart_at_cooldown_end(self) -> None:
        """At a key-scoped 429's cooldown end the request bucket holds one token, not what it
        refilled to while the key stood still: the first call tests whether the provider's limiter
        has room again, the next follows at the key's (lowered) rate, as TCP restarts from one
        segment after a retransmission timeout (RFC 5681 section 3.1). With the burst refilled,
        each cooldown ended in `burst` calls within a millisecond, all refused again (a provider
        trial). A cut the bucket applies when time passes the cooldown's end
        (TokenBucket.cap_at), so rate changes and refunds before it act as they happened: a
        debt in tokens outlasted the cooldown once the rate fell (a reviewer, 1,452 s for 30 s),
        and a cut at the first call after it cost an idle key its refilled burst (a second review)."""
        self.requests.cap_at(self.cooldown_until, 1.0)

    def request_scoped(self, outcome: Outcome, job_id: str | None, now: float) -> bool:
        """Whether a 429 that is not a repeat (`repeats`) is about its request rather than
        this key (module docstring); `now` in seconds."""
        if self._others_refused(job_id):
            return False  # another job's 429 just before, no success since: everyone is refused
        last_job, last_at = self._last_429
        if last_job != job_id and now - last_at <= ROOM_429_WINDOW_S:
            return False  # two jobs refused within seconds: the headers' per-minute room is not real
        return outcome.scope == "request"

    def repeats(self, job_id: str | None) -> bool:
        """Whether a 429 for `job_id` now repeats one this key gave the same job before, with
        other jobs served on it since, and since its last fresh throttle: the key works, and
        this job is refused on its own (its retries back off on their own delay)."""
        last = self._job_429s.get(job_id)
        return last is not None and self.ok_at > last and self.ok_at > self.throttled_at

    def _confirmed(self, outcome: Outcome, job_id: str | None) -> bool:
        """Whether more than this one 429 says the key is out of room: its headers or body
        (`scope == "key"`), another job's 429 just before with no success since, or no
        success on the key since its last fresh throttle (or ever): nothing shows it works."""
        return outcome.scope == "key" or self._others_refused(job_id) or self.ok_at <= self.throttled_at

    def _others_refused(self, job_id: str | None) -> bool:
        """Whether another job's 429 (not a repeat) came last, with no success since."""
        last_job, last_at = self._last_429
        return last_at > self.ok_at and last_job != job_id

    def _note_job_429(self, job_id: str | None, now: float, repeat: bool = False) -> None:
        if not repeat:  # a job's own repeat is no sign that the key refuses everyone
            self._last_429 = (job_id, now)
        self._job_429s.note(job_id, now)

    def sent_rate(self, now: float) -> float | None:
        """Calls per second dispatched on this key over the last SENT_WINDOW_S, or None
        when the window holds fewer than MIN_SENT_CALLS calls (too few to be a rate: a
        quiet key's lone call would read as a rate far below what the key can do)."""
        since = now - SENT_WINDOW_S
        count = sum(1 for at in self._sent if at > since)
        return count / SENT_WINDOW_S if count >= MIN_SENT_CALLS else None

    def _apply_rates(self, now: float) -> None:
        """Move the buckets to the effective rates; the request burst shrinks with the rate
        (never below 1) and never exceeds the limit the provider reports."""
        rate = self.request_rate.rate
        capacity = max(1.0, self._capacity * rate / self.spec.rps)
        if self.limit_hint is not None:
            capacity = min(capacity, max(1.0, self.limit_hint - self._safety_s * rate))
        if not self.answered and self._first_burst is not None:
            capacity = min(capacity, self._first_burst)
        if rate != self.requests.rate or capacity != self.requests.capacity:
            self.requests.set_rate(now, rate, capacity)
        if self.cost is not None and self.cost_rate is not None and self.cost_rate.rate != self.cost.rate:
            self.cost.set_rate(now, self.cost_rate.rate)

    def _count(self, outcome: Outcome) -> None:
        self.stats.calls += 1
        if outcome.kind == OutcomeKind.OK:
            self.stats.ok += 1
        elif outcome.kind == OutcomeKind.RATE_LIMITED:
            self.stats.rate_limited += 1
        else:
            self.stats.errors += 1

    def _backoff(self, retry_after_s: float | None) -> float:
        """base * 2**(streak-1) capped at max_s, with Retry-After as a floor under it."""
        doublings = min(self.streak_429 - 1, _MAX_DOUBLINGS)
        backoff = min(self.cooldown.max_s, self.cooldown.base_s * 2.0**doublings)
        return max(backoff, retry_after_s or 0.0)

    def _cool(self, now: float, seconds: float) -> None:
        """Cool the key for `seconds` (never shortening a cooldown under way), at most the
        policy's retry_after_max_s: every wait a provider names comes through here. While the
        key's last fresh answer is a key-scoped 429 (`refusing`), the cooldown ends with one call
        (`_restart_at_cooldown_end`), at its end however later waits lengthen it."""
        self.cooldown_until = max(self.cooldown_until, now + min(seconds, self.cooldown.retry_after_max_s))
        if self.refusing and self.cooldown_until > now:
            self._restart_at_cooldown_end()

    def _resync(self, info: RateLimitInfo, now: float) -> None:
        """Follow the provider's rate-limit headers: cap the effective rates, lower the buckets
        to what remains. An empty budget cools the key until its reset, except the tokens of a
        key with a cost bucket whose answers report their usage: the reset is the time until
        the budget is *full* again (OpenAI's x-ratelimit-reset-tokens, 60 s for an emptied
        tokens-per-minute limit), while it refills all along, and the bucket, lowered to what
        remains and charged each call's real usage, already waits just until a job's cost is
        back (0.6 s for 60 tokens at 6,000/min). Cooled until the reset, a key spending its
        tokens exactly stood idle a minute each time it reached 0 (measured: 73 % of the limit
        used, 0 x 429). Without reported usage the bucket holds only the jobs' estimates, which
        may be low: then the reset is waited out (a simulation with jobs estimated at 10 tokens
        that used 50: 56 x 429 in 300 jobs waiting for the refill, 12 cooling)."""
        if info.limit_requests is not None and info.limit_requests >= 1:
            self.limit_hint = info.limit_requests
        self.request_rate.on_hint(now, header_rate(info.limit_requests, info.remaining_requests,
                                                   info.reset_requests_s))
        if self.cost_rate is not None:
            self.cost_rate.on_hint(now, header_rate(info.limit_tokens, info.remaining_tokens, info.reset_tokens_s))
        if info.remaining_requests is not None:
            self.requests.limit(now, info.remaining_requests)
            if info.remaining_requests <= 0 and info.reset_requests_s is not None:
                self._cool(now, info.reset_requests_s)
        if info.remaining_tokens is not None:
            if self.cost is not None:
                self.cost.limit(now, info.remaining_tokens)
            if (info.remaining_tokens <= 0 and info.reset_tokens_s is not None
                    and (self.cost is None or not self.usage_reported)):
                self._cool(now, info.reset_tokens_s)

    def snapshot(self, now: float) -> dict[str, Any]:
        """The key's part of `Scheduler.snapshot` (JSON-able)."""
        return {
            "pool": self.spec.pool,
            "upstream": self.spec.upstream,
            "rps": self.spec.rps,
            "effective_rps": round(self.request_rate.rate, 3),
            "burst": round(self.requests.capacity, 2),
            "cost_per_minute": self.spec.cost_per_minute,
            "effective_cost_per_minute": None if self.cost_rate is None else round(self.cost_rate.rate * 60, 1),
            "tokens": round(self.requests.advance(now), 2),
            "cost_tokens": None if self.cost is None else round(self.cost.advance(now), 2),
            "in_flight": self.in_flight,
            "concurrency": self.spec.concurrency,
            "breaker": self.breaker.view(now).value,
            "cooldown_s": round(max(0.0, self.cooldown_until - now), 3),
            # its last fresh answer was a key-scoped 429, within the cooldown cap (max_s): between two
            # cooldowns it is not cooling, but a call now would most likely be refused again
            "throttled": self.refusing and now - self.throttled_at <= self.cooldown.max_s,
            **self.health.view(now),
            "disabled": self.disabled_reason is not None,
            "disabled_reason": self.disabled_reason,
            "calls": self.stats.calls,
            "ok": self.stats.ok,
            "rate_limited": self.stats.rate_limited,
            "errors": self.stats.errors,
        }


def key_error_reason(outcome: Outcome) -> str:
    """Why a key-scoped answer took the key out, e.g. "insufficient_quota (HTTP 429)"."""
    if outcome.code:
        status = f"HTTP {outcome.status}" if outcome.status is not None else "no status"
        return f"{outcome.code} ({status})"
    if outcome.status == 402:
        return "payment_required (HTTP 402)"
    return f"401/403: upstream answered {outcome.status}"
