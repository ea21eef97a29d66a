"""Telling a refused key from a refused request, for 401/403 answers that do not say which.

A job denied (401/403 without a key-scoped code, or a 404 naming a model or deployment the
key cannot reach: OpenAI `model_not_found`, Azure `DeploymentNotFound`, see
schemas/signals.py) on one key is tried on another key. What happens next is the evidence:

* denied again on a second key: the request is at fault (a model the keys may not use or
  that does not exist, a wrong OpenAI-Organization header). The job fails; its denials
  count against no key.
* it succeeds on another key: each earlier denial was about the key (a "confirmed"
  strike). A key is disabled after 403s on FORBIDDEN_JOBS different confirmed jobs with no
  success of its own since the first (a key that serves other jobs is refusing requests, not
  broken: a model or resource that key may not use, Anthropic's 403 permission_error). A
  denial saying the key lacks the model (a 404, or OpenAI's 403 `model_not_found` for a
  project key restricted to some models) is no strike: the key serves its other models,
  and the scheduler sends that model's next jobs to other keys for a while (scheduler.py).
  So does a 403 that does not say why, from the denial on (the scheduler): its model's next
  jobs go to other keys, so a key refusing one model (Anthropic's 403 permission_error for
  claude-opus) costs about one call per LACK_MEMORY_S for that model, not one per job, and is
  not struck again meanwhile. Waiting for the confirmation was too late under a queue (the
  refused job's retry queues behind fresh jobs: a re-run saw 30 x 403 and the key disabled
  before the first confirmation). When another key refuses the job too, the request was at
  fault and the routing is lifted (`Verdicts.request_refused`).
* 401 means "who are you": a key is disabled after 401s on AUTH_JOBS different jobs of
  which at least one is confirmed (succeeded on another key, or no other key could take
  it). Jobs still waiting for their second key count too, so a revoked key goes out after
  one round trip; but 401s that are all still unjudged never disable a key, so a burst of
  concurrent request-scoped 401s cannot take healthy keys out before their jobs are
  judged. When such a job is then refused on a second key its strike is withdrawn, and a
  key this book disabled whose strikes fall below AUTH_JOBS is enabled again.
  A success on the key clears its 401 record (it authenticated fine).

Memory is bounded: job records and strikes older than MEMORY_S are dropped, and at most
MAX_JOBS jobs are remembered (oldest first out). The book lives in the leader only; a new
leader starts empty (a job then gets one more key to try, a key a few more strikes).
"""

from __future__ import annotations

import math
from collections import OrderedDict
from dataclasses import dataclass, field

AUTH_JOBS = 2
FORBIDDEN_JOBS = 3
MEMORY_S = 3600.0
MAX_JOBS = 10_000


@dataclass
class _JobDenials:
    at: float
    keys: dict[str, int] = field(default_factory=dict)  # key id -> status it answered
    when: dict[str, float] = field(default_factory=dict)  # key id -> when it refused the job
    lacking: set[str] = field(default_factory=set)  # keys whose denial said they lack the model (no strike)


@dataclass
class Verdicts:
    """What the book concluded from one answer: keys to disable (key id, reason) and keys
    it disabled earlier whose evidence was withdrawn (to enable again)."""

    disable: list[tuple[str, str]] = field(default_factory=list)
    enable: list[str] = field(default_factory=list)
    # (not compared: a verdict is its disables and enables) keys whose 403 of this job is confirmed
    # (it succeeded on another key), and keys whose 403 was the request's (another key refused it
    # too): the scheduler sends the job's model elsewhere for a while from the 403 on, and lifts
    # that when the request was at fault
    refused_model: list[str] = field(default_factory=list, compare=False)
    request_refused: list[str] = field(default_factory=list, compare=False)


class DenialBook:
    """Denials per job and strikes per key (monotonic seconds)."""

    def __init__(self) -> None:
        self._jobs: OrderedDict[str, _JobDenials] = OrderedDict()
        self._auth: dict[str, dict[str, float]] = {}  # key -> job -> when (401s, confirmed or pending)
        self._confirmed: dict[str, set[str]] = {}  # key -> jobs whose 401 is confirmed
        self._forbidden: dict[str, dict[str, float]] = {}  # key -> job -> when (403s confirmed)
        self._served: dict[str, float] = {}  # key -> its last success (monotonic s)
        self._disabled: set[str] = set()  # keys this book disabled on 401 evidence

    def denied_keys(self, job_id: str) -> frozenset[str]:
        """Keys that already refused this job (it should try another one)."""
        entry = self._jobs.get(job_id)
        return frozenset(entry.keys) if entry else frozenset()

    def on_denied(self, job_id: str, key_id: str, status: int | None, final: bool, now: float,
                  lacks_model: bool = False) -> Verdicts:
        """A 401/403 (or a model's 404) for `job_id` on `key_id`; `final`: the job ends with it (another key
        refused it too, or no other key could take it); `lacks_model`: the answer said the key
        cannot reach the job's model (schemas/signals.py MODEL_UNAVAILABLE_CODES: OpenAI's 403 or
        404 `model_not_found`, Azure's `DeploymentNotFound`, ...), which is no strike."""
        self._prune(now)
        entry = self._jobs.get(job_id)
        if final and entry is not None and set(entry.keys) - {key_id}:
            return self._request_scoped(job_id)  # refused on two keys: the request's fault
        if final:
            self._jobs.pop(job_id, None)
            if status != 401:
                return Verdicts()
            self._confirmed.setdefault(key_id, set()).add(job_id)  # no other key could judge it
        else:
            if entry is None:
                entry = self._jobs[job_id] = _JobDenials(now)
                while len(self._jobs) > MAX_JOBS:
                    self._jobs.popitem(last=False)
            entry.keys[key_id] = status or 0
            entry.when[key_id] = now
            if lacks_model:
                entry.lacking.add(key_id)
            if status != 401:
                return Verdicts()
        self._auth.setdefault(key_id, {})[job_id] = now
        return self._judge_auth(key_id)

    def on_ok(self, job_id: str, key_id: str, now: float) -> Verdicts:
        """`job_id` succeeded on `key_id`: the keys that refused it earlier were at fault."""
        self._prune(now)
        self._auth.pop(key_id, None)
        self._confirmed.pop(key_id, None)
        # the key serves other jobs: its 403s were about those requests (a model or a resource it may
        # not use: Anthropic's permission_error for one model), not the key. A provider trial: a key
        # refusing only claude-opus was disabled for every model after 3 such jobs
        self._forbidden.pop(key_id, None)
        self._served[key_id] = now
        entry = self._jobs.pop(job_id, None)
        out = Verdicts()
        if entry is None:
            return out
        for other, status in entry.keys.items():
            if other == key_id:
                continue
            if status == 401:
                self._auth.setdefault(other, {})[job_id] = now
                self._confirmed.setdefault(other, set()).add(job_id)
                out.disable += self._judge_auth(other).disable
                continue
            if other in entry.lacking:
                # a model (deployment) this key lacks: the job went on elsewhere, and the key
                # still serves its other models; a strike would let any caller disable healthy
                # keys with three requests for a model only some keys have (a reviewer's finding;
                # OpenAI answers a project key restricted to some models with a 403 saying so)
                continue
            out.refused_model.append(other)
            if self._served.get(other, -math.inf) > entry.when.get(other, now):
                continue  # it served another job after refusing this one: the refusal was this request's
            confirmed = self._forbidden.setdefault(other, {})
            confirmed[job_id] = now
            if len(confirmed) >= FORBIDDEN_JOBS:
                out.disable.append((other, f"{status} on {len(confirmed)} different jobs that succeeded on other keys"))
        return out

    def forget_key(self, key_id: str) -> None:
        """The key was enabled again: its strikes start over."""
        self._auth.pop(key_id, None)
        self._confirmed.pop(key_id, None)
        self._forbidden.pop(key_id, None)
        self._served.pop(key_id, None)
        self._disabled.discard(key_id)

    def _judge_auth(self, key_id: str) -> Verdicts:
        strikes = self._auth.get(key_id, {})
        confirmed = self._confirmed.get(key_id, set()) & strikes.keys()
        if len(strikes) >= AUTH_JOBS and confirmed:
            self._disabled.add(key_id)
            return Verdicts(disable=[(key_id, f"401 on {AUTH_JOBS} different jobs at least ({len(strikes)} so far, "
                                              f"{len(confirmed)} of them not refused by any other key)")])
        return Verdicts()

    def _request_scoped(self, job_id: str) -> Verdicts:
        entry = self._jobs.pop(job_id, None)
        out = Verdicts()
        if entry is not None:
            out.request_refused = [key_id for key_id, status in entry.keys.items()
                                   if status != 401 and key_id not in entry.lacking]
        for key_id, strikes in self._auth.items():
            if strikes.pop(job_id, None) is not None and key_id in self._disabled and (
                    not self._judge_auth(key_id).disable):
                self._disabled.discard(key_id)
                out.enable.append(key_id)
        return out

    def _prune(self, now: float) -> None:
        horizon = now - MEMORY_S
        while self._jobs:
            oldest = next(iter(self._jobs.values()))
            if oldest.at >= horizon:
                break
            self._jobs.popitem(last=False)
        for book in (self._auth, self._forbidden):
            for strikes in book.values():
                for job_id in [j for j, at in strikes.items() if at < horizon]:
                    del strikes[job_id]
        for key_id, jobs in self._confirmed.items():
            jobs.intersection_update(self._auth.get(key_id, {}))  # in place (`&=` with a keys view rebinds)
