"""Pure parsers for what an upstream answer says about its key.

The worker turns an HTTP answer into an `Outcome` with these; the scheduler never sees
headers. Classification:

    no status (timeout, connection error)  -> upstream_error   (breaker failure, retryable)
    2xx                                    -> ok
    429                                    -> rate_limited     (cooldown, retryable)
    401, 403                               -> key_error        (key disabled)
    408, 5xx                               -> upstream_error   (breaker failure, retryable)
    any other status (other 4xx incl. 409) -> bad_request      (the job's fault; final)
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from datetime import timezone
from email.utils import parsedate_to_datetime

from .types import OutcomeKind, RateLimitInfo

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


def classify(status: int | None, error: str | None) -> OutcomeKind:
    """The outcome class of one call (see the table in the module docstring)."""
    if status is None:
        return "upstream_error"
    if 200 <= status < 300:
        return "ok"
    if status == 429:
        return "rate_limited"
    if status in (401, 403):
        return "key_error"
    if status == 408 or status >= 500:
        return "upstream_error"
    return "bad_request"


def is_retryable(kind: OutcomeKind) -> bool:
    """Whether a job with this outcome should be tried again (on any key)."""
    return kind in ("rate_limited", "upstream_error")
