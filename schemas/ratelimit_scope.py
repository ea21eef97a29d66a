"""Whose 429 it is: the key's (it has no room now) or this one request's.

A 429 usually means the key is out of room, and the key should cool down and slow down. But
some 429s are about one request only, and no amount of waiting on the key cures them:
OpenAI answers a request bigger than the whole per-minute limit with

    429 {"error": {"message": "Request too large for gpt-4o in organization org-… on tokens
         per min (TPM): Limit 30000, Requested 50000. The input or output tokens must be
         reduced in order to run successfully. …", "type": "tokens", "param": null,
         "code": "rate_limit_exceeded"}}

while the key's own headers still show room (x-ratelimit-remaining-requests > 0). Treating
such a 429 as the key's fault lets one job cool every key down and halve its rate, over and
over, for the whole fleet. `rate_limit_scope` reads the evidence in order:

    body states Limit L, Requested R with R > L        request, never fits  (L, R kept)
    body says "Request too large"                      request
    the job's cost > x-ratelimit-limit-tokens          request, never fits
    body says the limit is reached or exceeded (R <= L)  key (out of room for now)
    remaining requests or tokens <= 0                  key
    remaining tokens < the job's cost                  key  (not enough room for this one)
    remaining requests > 0, tokens > 0 or absent       request (the key had room)
    nothing of the above                               None (unknown: the key's, unless the
                                                       scheduler sees the same job 429 again
                                                       while others succeed; see key.py)

Message formats: OpenAI "Request too large for …" and "Rate limit reached for … Limit N,
Used U, Requested R" (platform.openai.com/docs/guides/rate-limits, error-codes; the shape
users report in e.g. github.com/Aider-AI/aider/issues/1880). Anthropic's too-large request
is a 413 `request_too_large` (docs.anthropic.com/en/api/errors), a bad_request already; its
429 `rate_limit_error` says "would exceed" or "exceeded your rate limit". Azure OpenAI:
"have exceeded call rate limit" / "token rate limit"; Google (Gemini, Vertex):
`RESOURCE_EXHAUSTED`, "Resource has been exhausted" / "Quota exceeded for metric".

Room in the headers is weak evidence: the remaining counts are per minute while providers
enforce over seconds, so the scheduler overrules a "request" verdict when other jobs got
429s on the key moments before (dispatcher/core/key.py).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Literal

from ratefleet.schemas.outcome import RateLimitInfo

Scope = Literal["key", "request"]

_TOO_LARGE = re.compile(r"\brequest too large\b", re.IGNORECASE)
# the key is out of room for now: OpenAI "Rate limit reached for … on tokens per min (TPM):
# Limit 30000, Used 29937, Requested 385", Anthropic "This request would exceed the rate limit …"
# and "Number of concurrent connections has exceeded your rate limit", Azure OpenAI "Requests to
# the ChatCompletions_Create Operation … have exceeded call rate limit of your current … pricing
# tier" / "exceeded token rate limit", Google "Resource has been exhausted (e.g. check quota)."
# and "Quota exceeded for metric: … per minute" (a billing quota is an insufficient_quota key
# error, classified before a 429 gets here)
_REACHED = re.compile(
    r"\brate limit reached\b|\bwould exceed\b|\bexceeded (?:the |your )?(?:call |token |request )?rate limit"
    r"|\bresource (?:has been )?exhausted\b|\bquota exceeded\b", re.IGNORECASE)
_LIMIT_REQUESTED = re.compile(
    r"\blimit:?\s+([\d,]+(?:\.\d+)?)\s*,\s*(?:used:?\s+[\d,]+(?:\.\d+)?\s*,\s*)?requested:?\s+([\d,]+(?:\.\d+)?)",
    re.IGNORECASE)
_UNIT = re.compile(r"\bon\s+([^:.]{1,48}?):\s*limit\b", re.IGNORECASE)
_MAX_MESSAGE_CHARS = 4096


@dataclass(frozen=True)
class RateLimitScope:
    """The verdict on one 429: `scope` ("key" or "request"), `reason` (one human sentence
    naming the evidence), and when the request can never fit, the `limit` and the
    `requested` amount in `unit` (e.g. "tokens per min (TPM)") as far as stated."""

    scope: Scope
    reason: str
    limit: float | None = None
    requested: float | None = None
    unit: str = "tokens"
    never_fits: bool = False  # the request is larger than the whole limit: no retry can succeed

    def describe_too_large(self) -> str:
        """E.g. "requests 50000 tokens per min (TPM), more than the limit of 30000"; the
        numbers are "?" when the provider did not state them."""
        return f"requests {_fmt(self.requested)} {self.unit}, more than the limit of {_fmt(self.limit)}"


def rate_limit_scope(info: RateLimitInfo | None, body: object, cost: float | None = None) -> RateLimitScope | None:
    """Classify a 429 from its parsed rate-limit headers (`signals.parse_ratelimit`), its
    parsed JSON `body` (any value) and the job's `cost` (cost units, e.g. tokens; None when
    unknown). Returns None when nothing says whose it is. Order: module docstring."""
    verdict = _from_body(_message(body))
    if verdict is not None and verdict.scope == "request":
        return verdict
    if info is not None and cost is not None and info.limit_tokens is not None and cost > info.limit_tokens > 0:
        return RateLimitScope("request", "the job's cost is above the key's whole token limit",
                              limit=info.limit_tokens, requested=cost, unit="tokens (x-ratelimit-limit-tokens)",
                              never_fits=True)
    return verdict or _from_headers(info, cost)


def _from_body(message: str | None) -> RateLimitScope | None:
    if not message:
        return None
    numbers = _LIMIT_REQUESTED.search(message)
    limit = requested = None
    if numbers is not None:
        limit, requested = _number(numbers.group(1)), _number(numbers.group(2))
    unit_match = _UNIT.search(message)
    unit = unit_match.group(1).strip() if unit_match else "tokens"
    if limit is not None and requested is not None and requested > limit:
        return RateLimitScope("request", "the provider says this request alone exceeds the limit",
                              limit=limit, requested=requested, unit=unit, never_fits=True)
    if _TOO_LARGE.search(message):
        return RateLimitScope("request", "the provider says the request is too large", limit=limit,
                              requested=requested, unit=unit, never_fits=True)
    if _REACHED.search(message):
        return RateLimitScope("key", "the provider says the key's limit is reached for now")
    return None


def _from_headers(info: RateLimitInfo | None, cost: float | None) -> RateLimitScope | None:
    if info is None or info.remaining_requests is None and info.remaining_tokens is None:
        return None
    requests, tokens = info.remaining_requests, info.remaining_tokens
    if (requests is not None and requests <= 0) or (tokens is not None and tokens <= 0):
        return RateLimitScope("key", "the key's rate-limit headers show nothing remaining")
    if tokens is not None and cost is not None and tokens < cost:
        return RateLimitScope("key", f"the key had {_fmt(tokens)} tokens left, fewer than the job's {_fmt(cost)}")
    if requests is not None:
        left = f"{_fmt(requests)} requests" + ("" if tokens is None else f" and {_fmt(tokens)} tokens")
        return RateLimitScope("request", f"the key's own headers showed {left} remaining")
    return None


def _message(body: object) -> str | None:
    """`error.message` of an OpenAI/Azure/Anthropic-style error body, else None."""
    error = body.get("error") if isinstance(body, dict) else None
    message = error.get("message") if isinstance(error, dict) else None
    return message[:_MAX_MESSAGE_CHARS] if isinstance(message, str) else None


def _number(text: str) -> float | None:
    try:
        return float(text.replace(",", ""))
    except ValueError:
        return None


def _fmt(value: float | None) -> str:
    if value is None:
        return "?"
    value = float(value)
    return str(int(value)) if value.is_integer() else f"{value:g}"
