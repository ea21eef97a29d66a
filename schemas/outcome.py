"""The outcome vocabulary shared by the worker, the internal wire messages and the
scheduling core: what one upstream call came to (`OutcomeKind`), whether a job with that
outcome is tried again (`is_retryable`), and the rate-limit headers it carried
(`RateLimitInfo`). This module is the only place these are defined; the executor
(workers/executor.py), the worker's retry decision (workers/service.py), the wire message
(internal.OutcomeReport) and the core (dispatcher/core) all use it.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum


class OutcomeKind(StrEnum):
    """What one upstream call came to. The values are the JSON strings of
    `OutcomeReport.kind` on `<prefix>.internal.outcome` (classification: signals.classify).

    OK              2xx
    RATE_LIMITED    429: the key cools down (not a breaker failure); the job is retried
    KEY_ERROR       key-scoped evidence (`invalid_api_key`, `insufficient_quota`, 402...): the
                    key is disabled at once; the job is retried on another key
    DENIED          a 401/403 that does not say whether the key or the request is at fault,
                    or a 404 naming a model/deployment the key cannot reach (signals.py):
                    the job tries another key, evidence is collected per key (denials.py)
    UPSTREAM_ERROR  5xx, 408, timeout, connection error: a breaker failure; retried
    BAD_REQUEST     another 4xx (or an answer that ends the job as it is): not retried
    NONE            no outcome to count: no call was made (expired, invalid, secret missing,
                    a call abandoned at shutdown) or its fate is unknown (its worker died, the
                    job was returned unrun). It frees the slot and the probe but counts as
                    nothing and never feeds the breaker.
    """

    OK = "ok"
    RATE_LIMITED = "rate_limited"
    KEY_ERROR = "key_error"
    DENIED = "denied"
    UPSTREAM_ERROR = "upstream_error"
    BAD_REQUEST = "bad_request"
    NONE = "none"

    @classmethod
    def _missing_(cls, value: object) -> OutcomeKind | None:
        # "lost": the scheduling core's former name for NONE (never on the wire); accepted so
        # that `Outcome("lost")` keeps meaning what it meant
        return cls.NONE if value == "lost" else None


_RETRYABLE = frozenset({OutcomeKind.RATE_LIMITED, OutcomeKind.UPSTREAM_ERROR, OutcomeKind.KEY_ERROR,
                        OutcomeKind.DENIED})


def is_retryable(kind: OutcomeKind | str, *, denial_final: bool = False) -> bool:
    """Whether a job whose call came to `kind` goes back to the queue (while it has attempts
    left; a 429 has its own budget, `max_rate_limited`) rather than ending with this answer.

    Retried: rate_limited (after a short delay), upstream_error (backing off), key_error
    (at once, on another key: the key is disabled) and denied (at once, on another key),
    except a denial that is final for the job (`Assignment.denial_final`: refused on another
    key already, or no other key could take it), which ends the job `request_denied`.
    Not retried: ok, bad_request, none.
    """
    if kind == OutcomeKind.DENIED:
        return not denial_final
    return kind in _RETRYABLE


@dataclass(frozen=True)
class RateLimitInfo:
    """Rate-limit headers reported by the upstream (see signals.parse_ratelimit): the
    limit, what remains of it, and the seconds until it is full again, for requests and
    for tokens (the cost unit). `None`: the header was absent.

    The same value crosses the wire as `OutcomeReport.ratelimit` (pydantic validates and
    dumps this dataclass as a JSON object with these six fields; fields a newer worker adds
    are ignored) and reaches the core as `Outcome.ratelimit`.
    """

    remaining_requests: float | None = None
    remaining_tokens: float | None = None
    reset_requests_s: float | None = None
    reset_tokens_s: float | None = None
    limit_requests: float | None = None
    limit_tokens: float | None = None
