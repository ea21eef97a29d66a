"""Telling a refused key from a refused request, for 401/403 answers that do not say which.

A job denied (401/403 without a key-scoped code) on one key is tried on another key. What
happens next is the evidence:

* denied again on a second key: the request is at fault (a model the keys may not use, a
  bad header). The job fails; its denials count against no key.
* it succeeds on another key: each earlier denial was about the key. A key is disabled
  after 403s on FORBIDDEN_JOBS different jobs that succeeded elsewhere.
* 401 means "who are you": a key is disabled after 401s on AUTH_JOBS different jobs
  (pending ones count, so a revoked key goes out fast), unless those jobs turn out to be
  request-scoped. A success on the key clears its 401 record (it authenticated fine).

Memory is bounded: job records and strikes older than MEMORY_S are dropped, and at most
MAX_JOBS jobs are remembered (oldest first out). The book lives in the leader only; a new
leader starts empty (a job then gets one more key to try, a key a few more strikes).
"""

from __future__ import annotations

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


class DenialBook:
    """Denials per job and strikes per key; methods return (key id, reason) to disable."""

    def __init__(self) -> None:
        self._jobs: OrderedDict[str, _JobDenials] = OrderedDict()
        self._auth: dict[str, dict[str, float]] = {}  # key -> job -> when (401s)
        self._forbidden: dict[str, dict[str, float]] = {}  # key -> job -> when (403s confirmed)

    def denied_keys(self, job_id: str) -> frozenset[str]:
        """Keys that already refused this job (it should try another one)."""
        entry = self._jobs.get(job_id)
        return frozenset(entry.keys) if entry else frozenset()

    def on_denied(self, job_id: str, key_id: str, status: int | None, final: bool,
                  now: float) -> list[tuple[str, str]]:
        """A 401/403 for `job_id` on `key_id`; `final`: the job ends with it (no other key)."""
        self._prune(now)
        entry = self._jobs.get(job_id)
        if final and entry is not None and set(entry.keys) - {key_id}:
            self._request_scoped(job_id)  # refused on two keys: the request's fault
            return []
        if entry is None:
            entry = self._jobs[job_id] = _JobDenials(now)
            while len(self._jobs) > MAX_JOBS:
                self._jobs.popitem(last=False)
        entry.keys[key_id] = status or 0
        if final:
            self._jobs.pop(job_id, None)
        if status != 401:
            return []
        strikes = self._auth.setdefault(key_id, {})
        strikes[job_id] = now
        if len(strikes) >= AUTH_JOBS:
            return [(key_id, f"401 on {len(strikes)} different jobs")]
        return []

    def on_ok(self, job_id: str, key_id: str, now: float) -> list[tuple[str, str]]:
        """`job_id` succeeded on `key_id`: the keys that refused it earlier were at fault."""
        self._prune(now)
        self._auth.pop(key_id, None)
        entry = self._jobs.pop(job_id, None)
        if entry is None:
            return []
        out = []
        for other, status in entry.keys.items():
            if other == key_id or status == 401:  # 401s already count in _auth
                continue
            confirmed = self._forbidden.setdefault(other, {})
            confirmed[job_id] = now
            if len(confirmed) >= FORBIDDEN_JOBS:
                out.append((other, f"{status} on {len(confirmed)} different jobs that succeeded on other keys"))
        return out

    def forget_key(self, key_id: str) -> None:
        """The key was enabled again: its strikes start over."""
        self._auth.pop(key_id, None)
        self._forbidden.pop(key_id, None)

    def _request_scoped(self, job_id: str) -> None:
        self._jobs.pop(job_id, None)
        for strikes in self._auth.values():
            strikes.pop(job_id, None)

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
