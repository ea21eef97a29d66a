"""Pure parsers for what an upstream answer says about its key.

The worker turns an HTTP answer into an `Outcome` with these; the scheduler never sees
headers. Classification (`classify`), by the provider's error code first, then the status:

    no status (timeout, connection error)  -> upstream_error   (breaker failure, retryable)
    2xx                                    -> ok
    code in KEY_SCOPED_CODES, any status   -> key_error        (key disabled at once, probed later)
    code in OVERLOADED_CODES (e.g. 529)    -> upstream_error   (breaker failure, retryable)
    429                                    -> rate_limited     (cooldown, retryable)
    401, 403 without a key-scoped code     -> denied           (try another key; evidence per key)
    408, 5xx                               -> upstream_error   (breaker failure, retryable)
    any other status (other 4xx incl. 409) -> bad_request      (the job's fault; final)

Provider conventions recognised by `provider_code` (the error code or type in the body):
OpenAI `{"error": {"code": "invalid_api_key", "type": "invalid_request_error"}}`
(platform.openai.com/docs/guides/error-codes: 401 invalid_api_key, 429 insufficient_quota
"You exceeded your current quota", 404 model_not_found); Anthropic `{"type": "error",
"error": {"type": "authentication_error"}}` (docs.anthropic.com/en/api/errors: 401
authentication_error, 402 billing_error, 403 permission_error, 429 rate_limit_error, 529
overloaded_error); Azure OpenAI `{"error": {"code": "401"}}` / `"429"` (a bare status).
A 401/403 whose code only repeats the status (Azure) or names the request (permission_error,
model_not_found) is `denied`, not `key_error`: only the key-scoped codes disable at once.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from datetime import timezone
from email.utils import parsedate_to_datetime

from .types import OutcomeKind, RateLimitInfo

# out of credit or credentials refused: no cooldown cures these, the key goes out of rotation
KEY_SCOPED_CODES = frozenset({"invalid_api_key", "authentication_error", "insufficient_quota", "billing_error"})
OVERLOADED_CODES = frozenset({"overloaded_error"})
_MAX_CODE_CHARS = 64
_DURATION_PART = re.compile(r"(\d+(?:\.\d*)?|\.\d+)(ns|us|µs|ms|h|m|s)")
_UNIT_SECONDS = {"ns": 1e-9, "us": 1e-6, "µs": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0}


def parse_retry_after(value: str | None, now_epoch: float) -> float | None:
    """Retry-After as seconds from now: delta-seconds or an HTTP-date; past dates give 0."""
    if value is None or not value.strip():
        return None
    text = value.strip()
    try:
        seconds = float(text)
    except ValueError:
        try:
            when = parsedate_to_datetime(text)
        except (TypeError, ValueError, IndexError):
            return None
        if when.tzinfo is None:  # "-0000" zone: RFC 5322 says UTC
            when = when.replace(tzinfo=timezone.utc)
        seconds = when.timestamp() - now_epoch
    if not math.isfinite(seconds):
        return None
    return max(0.0, seconds)


def parse_duration(value: str | None) -> float | None:
    """An OpenAI-style reset value in seconds: "1s", "6m0s", "20ms", "1h2m3.5s" or "0.5"."""
    if value is None:
        return None
    text = value.strip()
    if not text:
        return None
    try:
        seconds = float(text)
    except ValueError:
        seconds = _sum_units(text)
        if seconds is None:
            return None
    if not math.isfinite(seconds):
        return None
    return max(0.0, seconds)


def _sum_units(text: str) -> float | None:
    total, pos = 0.0, 0
    for match in _DURATION_PART.finditer(text):
        if match.start() != pos:
            return None
        total += float(match.group(1)) * _UNIT_SECONDS[match.group(2)]
        pos = match.end()
    return total if pos == len(text) and pos > 0 else None


def _number(value: str | None) -> float | None:
    if value is None:
        return None
    try:
        number = float(value.strip())
    except ValueError:
        return None
    return number if math.isfinite(number) else None


def parse_ratelimit(headers: Mapping[str, str]) -> RateLimitInfo | None:
    """The x-ratelimit-* headers (any case), or None when none of them is usable."""
    lower = {name.lower(): value for name, value in headers.items()}
    info = RateLimitInfo(
        remaining_requests=_number(lower.get("x-ratelimit-remaining-requests")),
        remaining_tokens=_number(lower.get("x-ratelimit-remaining-tokens")),
        reset_requests_s=parse_duration(lower.get("x-ratelimit-reset-requests")),
        reset_tokens_s=parse_duration(lower.get("x-ratelimit-reset-tokens")),
    )
    return None if info == RateLimitInfo() else info


def provider_code(body: object) -> str | None:
    """The provider's error code from a parsed JSON body, or None.

    OpenAI/Azure: `error.code` (a string; a number is read as its text), else `error.type`;
    Anthropic: `error.type` (the top-level `type` is just "error"). A key-scoped or
    overloaded code in either field wins. Codes are short ASCII identifiers; anything else
    (long text, other shapes) gives None.
    """
    if not isinstance(body, dict):
        return None
    error = body.get("error")
    if not isinstance(error, dict):
        return None
    found = [_code_text(error.get(field)) for field in ("code", "type")]
    found = [value for value in found if value is not None]
    known = [value for value in found if value in KEY_SCOPED_CODES or value in OVERLOADED_CODES]
    return (known or found or [None])[0]


def _code_text(value: object) -> str | None:
    if isinstance(value, int) and not isinstance(value, bool):
        value = str(value)
    if isinstance(value, str) and 0 < len(value) <= _MAX_CODE_CHARS and value.isascii():
        return value
    return None


def classify(status: int | None, error: str | None, code: str | None = None) -> OutcomeKind:
    """The outcome class of one call from its status and provider `code` (module docstring)."""
    if status is None:
        return "upstream_error"
    if 200 <= status < 300:
        return "ok"
    if code in KEY_SCOPED_CODES:
        return "key_error"
    if code in OVERLOADED_CODES:
        return "upstream_error"
    if status == 429:
        return "rate_limited"
    if status in (401, 403):
        return "denied"
    if status == 408 or status >= 500:
        return "upstream_error"
    return "bad_request"


def is_retryable(kind: OutcomeKind) -> bool:
    """Whether a job with this outcome should be tried again (on any key); a `denied` job
    is tried once more on another key (the scheduler decides whether one is left)."""
    return kind in ("rate_limited", "upstream_error", "denied")
