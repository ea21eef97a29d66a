"""The outcome vocabulary shared by the worker, the internal wire messages and the
scheduling core: what one upstream call came to (`OutcomeKind`) and the rate-limit headers
it carried (`RateLimitInfo`)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

# "lost": the call's fate is unknown (its worker died, or the job was returned unrun); it
# frees the slot and probe but counts as nothing and never feeds the breaker.
# "key_error": key-scoped evidence (e.g. `invalid_api_key`, `insufficient_quota`): the key is
# disabled at once. "denied": a 401/403 that does not say whether the key or the request is
# at fault; the job tries another key and evidence is collected per key (see denials.py).
OutcomeKind = Literal["ok", "rate_limited", "key_error", "denied", "upstream_error", "bad_request", "lost"]


@dataclass(frozen=True)
class RateLimitInfo:
    """Rate-limit headers reported by the upstream (see signals.parse_ratelimit): the
    limit, what remains of it, and the seconds until it is full again, for requests and
    for tokens (the cost unit)."""

    remaining_requests: float | None = None
    remaining_tokens: float | None = None
    reset_requests_s: float | None = None
    reset_tokens_s: float | None = None
    limit_requests: float | None = None
    limit_tokens: float | None = None

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> RateLimitInfo:
        """From a report's dict; unknown fields (a newer worker) are ignored."""
        return cls(**{name: data.get(name) for name in cls.__dataclass_fields__})
