"""Pure parsers for what an upstream answer says about its key.

The worker turns an HTTP answer into an `Outcome` with these; the scheduler never sees
headers. Classification (`classify`), by the provider's error code first, then the status:

    no status (timeout, connection error)  -> upstream_error   (breaker failure, retryable)
    2xx                                    -> ok
    code in KEY_SCOPED_CODES, any status   -> key_error        (key disabled at once, probed later)
    code in OVERLOADED_CODES (e.g. 529)    -> upstream_error   (breaker failure, retryable)
    429                                    -> rate_limited     (cooldown, retryable)
    402 (Payment Required), any code       -> key_error        (out of credit: OpenRouter, Anthropic)
    401, 403 without a key-scoped code     -> denied           (try another key; evidence per key)
    404 naming a model or deployment the   -> denied           (try another key: this one may lack it
      key cannot reach (MODEL_UNAVAILABLE_CODES)                  while another has it; no strike)
    408, 5xx                               -> upstream_error   (breaker failure, retryable)
    any other status (other 4xx incl. 409) -> bad_request      (the job's fault; final)

Provider conventions recognised by `provider_code` (the error code or type in the body):
OpenAI `{"error": {"code": "invalid_api_key", "type": "invalid_request_error"}}`
(platform.openai.com/docs/guides/error-codes: 401 invalid_api_key, 429 insufficient_quota
"You exceeded your current quota", 404 model_not_found); Anthropic `{"type": "error",
"error": {"type": "authentication_error"}}` (docs.anthropic.com/en/api/errors: 401
authentication_error, 402 billing_error, 403 permission_error, 429 rate_limit_error, 529
overloaded_error); Azure OpenAI `{"error": {"code": "401"}}` / `"429"` (a bare status).
Answers that are about the key but do not look like it:
* Gemini and other Google APIs answer a bad key with 400 `{"error": {"code": 400, "status":
  "INVALID_ARGUMENT", "details": [{"@type": "type.googleapis.com/google.rpc.ErrorInfo",
  "reason": "API_KEY_INVALID"}]}}`; the ErrorInfo `reason` (google/api/error_reason.proto)
  is read, and GOOGLE_KEY_REASONS are key-scoped.
* OpenRouter answers 402 `{"error": {"code": 402, "message": "Insufficient credits ..."}}`
  when the account or the key's credit limit is spent (openrouter.ai/docs/api_reference/limits,
  "Handling 402 errors"); the bare 402 reads as `payment_required`, and any 402 is
  key-scoped. (A single request too large for the remaining credit also gets a 402: the
  key then waits for its probe, which a normal job passes.)
* Anthropic answers an exhausted prepaid balance with 400 `invalid_request_error` and the
  message "Your credit balance is too low to access the Anthropic API" (no distinct type;
  anthropics/anthropic-sdk-typescript#618); a message that begins so, in a body with no
  other code, reads as `credit_balance_too_low`, key-scoped (not the phrase anywhere: a
  provider's message may quote the caller's input).
A 401/403 whose code only repeats the status (Azure) or names the request (permission_error,
model_not_found) is `denied`, not `key_error`: only the key-scoped codes disable at once.

A 404 about the model is `denied` too, not `bad_request`: which models a key reaches is a
property of the key (an OpenAI project key restricted to some models, an Azure resource
without the deployment), so one key of a pool may answer 404 where the others answer 200.
The job then tries another key, and a 404 on a second key (every key lacks the model, or it
does not exist) ends it `request_denied` after two calls. Recognised (MODEL_UNAVAILABLE_CODES,
only with status 404; a 404 with any other code, e.g. a wrong path's, stays `bad_request`):
* OpenAI `{"error": {"code": "model_not_found", "message": "The model `gpt-4o` does not exist
  or you do not have access to it."}}` (platform.openai.com/docs/guides/error-codes: 404
  model_not_found). Its 403 "Project `proj_...` does not have access to model `gpt-4o`"
  (code model_not_found) is a 403 and so already `denied`.
* Azure OpenAI `{"error": {"code": "DeploymentNotFound", "message": "The API deployment for
  this resource does not exist. ..."}}` (learn.microsoft.com/azure/ai-services/openai,
  "DeploymentNotFound", 404).
* Anthropic `{"type": "error", "error": {"type": "not_found_error", "message": "model:
  claude-x"}}` (docs.anthropic.com/en/api/errors: 404 not_found_error): a not_found_error
  whose message begins with "model:" reads as `model_not_found` (any other not_found_error,
  such as a wrong path's "Not Found", keeps its type).
* Google `{"error": {"code": 404, "status": "NOT_FOUND", "message": "models/gemini-x is not
  found for API version v1beta, ..."}}` (Gemini; ai.google.dev/gemini-api/docs/troubleshooting:
  404 NOT_FOUND; google.rpc.Code NOT_FOUND) and Vertex AI's "Publisher Model `projects/.../
  models/x` was not found or your project does not have access to it": a NOT_FOUND whose
  message begins with "models/" or "Publisher Model" reads as `model_not_found`.
Only the beginning of a message is read (providers quote the caller's input further on), and
a request can at most make itself be tried on a second key: a model's 404 is no strike
against the key, whatever happens next (denials.py).
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from datetime import UTC, datetime
from email.utils import parsedate_to_datetime
from typing import Any

from ratefleet.schemas.outcome import OutcomeKind, RateLimitInfo

# out of credit or credentials refused: no cooldown cures these, the key goes out of rotation
# Google ErrorInfo reasons about the key or its project, not the request (google.api.ErrorReason);
# the referrer/IP/app restrictions are left out: they depend on where a call comes from
GOOGLE_KEY_REASONS = frozenset({"API_KEY_INVALID", "API_KEY_SERVICE_BLOCKED", "SERVICE_DISABLED", "BILLING_DISABLED",
                                "CONSUMER_SUSPENDED", "CONSUMER_INVALID"})
# OpenAI's account-level refusals besides insufficient_quota: 400 billing_hard_limit_reached ("Billing
# hard limit has been reached"), 429 billing_not_active ("Your account is not active, please check your
# billing details"), 401 account_deactivated; Groq's 400 organization_restricted ("Organization has been
# restricted"): every call on that key fails the same way until someone pays
KEY_SCOPED_CODES = frozenset({"invalid_api_key", "authentication_error", "insufficient_quota", "billing_error",
                              "payment_required", "credit_balance_too_low", "billing_hard_limit_reached",
                              "billing_not_active", "account_deactivated", "organization_restricted",
                              "credits_exhausted", *GOOGLE_KEY_REASONS})
# xAI's 429 for a team out of credits or at its spending limit, an `error` that is a string:
# "Your team <uuid> has either used all available credits or reached its monthly spending limit. ..."
_XAI_CREDITS = re.compile(r"your team [\w-]{1,64} has either used all available credits or reached its monthly "
                          r"spending limit")
# a wait named only in the error's message (checked after every header and RetryInfo): Azure OpenAI's
# "Please retry after 6 seconds.", OpenAI's and Groq's "Please try again in 6m0s." / "in 2.002s" / "in 250ms",
# Gemini's "Please retry in 46.28s.", and the like ("try again after 20 seconds", "wait 30 seconds",
# "retry after 1 minute")
_MESSAGE_WAIT = re.compile(
    r"(?:retry|try again|wait)(?: after| in| for)? (\d+(?:\.\d+)?) ?(milliseconds?|seconds?|secs?|minutes?|mins?"
    r"|hours?)\b"
    r"|(?:retry|try again|wait)(?: after| in| for)? ((?:\d+(?:\.\d*)?(?:ms|us|µs|h|m|s))+)\b")
_WORD_SECONDS = {"millisecond": 1e-3, "second": 1.0, "sec": 1.0, "minute": 60.0, "min": 60.0, "hour": 3600.0}
_CREDIT_TOO_LOW = "your credit balance is too low"  # how Anthropic's 400 message for an exhausted balance begins
_GENERIC_TYPES = frozenset({"invalid_request_error"})  # Anthropic's type on that 400: says nothing about the key
OVERLOADED_CODES = frozenset({"overloaded_error"})
# a 404 saying the model (deployment) is out of this key's reach: `denied` (module docstring)
MODEL_NOT_FOUND = "model_not_found"
MODEL_UNAVAILABLE_CODES = frozenset({MODEL_NOT_FOUND, "DeploymentNotFound"})
_MODEL_MESSAGE_STARTS = {  # (field, value) of the error -> how its message begins when it names the model
    ("type", "not_found_error"): ("model:",),  # Anthropic
    ("status", "NOT_FOUND"): ("models/", "publisher model"),  # Google: Gemini, Vertex AI
}
_MAX_CODE_CHARS = 64
_DURATION_PART = re.compile(r"(\d+(?:\.\d*)?|\.\d+)(ns|us|µs|ms|d|h|m|s)")
_UNIT_SECONDS = {"ns": 1e-9, "us": 1e-6, "µs": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}


def retry_after_of(headers: Mapping[str, str], body: object, now_epoch: float) -> float | None:
    """The wait (seconds from now) an answer names, wherever its provider puts it, or None:
    `retry-after-ms` (milliseconds: Azure OpenAI; the openai SDK reads it before Retry-After),
    then `Retry-After` (RFC 9110 section 10.2.3, `parse_retry_after`), then the `retryDelay` of a
    `type.googleapis.com/google.rpc.RetryInfo` entry in a Google error's `details` (Gemini's 429:
    `"retryDelay": "20s"`, a google.protobuf.Duration in its JSON form), then a wait the error's
    message names (Azure's "Please retry after 6 seconds", OpenAI's "Please try again in 6m0s").
    `headers`: lower-case names."""
    millis = _leading_number(headers.get("retry-after-ms"))  # (sent twice: "3000, 3000")
    if millis is not None and millis >= 0:
        return millis / 1000
    seconds = parse_retry_after(headers.get("retry-after"), now_epoch)
    if seconds is None:
        seconds = _google_retry_delay(body)
    return seconds if seconds is not None else _message_wait(body)


def _message_wait(body: object) -> float | None:
    """A wait named in the error message of a body without any other (`_MESSAGE_WAIT`), in the
    first 1,000 characters. A provider trial: Azure's 429 saying only "Please retry after 6
    seconds" drew 14 x 429 where the same wait as a Retry-After header drew 2."""
    body = _first_of_array(body)
    error = body.get("error") if isinstance(body, dict) else None
    message = error.get("message") if isinstance(error, dict) else error
    if not isinstance(message, str):
        return None
    match = _MESSAGE_WAIT.search(message[:1000].lower())
    if match is None:
        return None
    if match.group(1) is not None:
        return float(match.group(1)) * _WORD_SECONDS[match.group(2).rstrip("s") or "s"]
    return parse_duration(match.group(3))


def _google_retry_delay(body: object) -> float | None:
    body = _first_of_array(body)
    error = body.get("error") if isinstance(body, dict) else None
    details = error.get("details") if isinstance(error, dict) else None
    if not isinstance(details, list):
        return None
    for detail in details[:16]:
        if isinstance(detail, dict) and str(detail.get("@type", "")).endswith("google.rpc.RetryInfo"):
            delay = detail.get("retryDelay")
            return parse_duration(delay) if isinstance(delay, str) and delay.endswith("s") else None
    return None


def parse_retry_after(value: str | None, now_epoch: float) -> float | None:
    """Retry-After as seconds from now: delta-seconds or an HTTP-date; past dates give 0. A
    header sent twice arrives joined ("120, 120", RFC 9110 section 5.3): its first delta-seconds
    is read (an HTTP-date holds a comma of its own and is read whole)."""
    if value is None or not value.strip():
        return None
    text = value.strip()
    if "," in text and _number(text.split(",", 1)[0]) is not None:  # "120, 120", "4.0, 4.0"
        text = text.split(",", 1)[0].strip()
    try:
        seconds = float(text)
    except ValueError:
        try:
            when = parsedate_to_datetime(text)
        except (TypeError, ValueError, IndexError):
            return None
        if when.tzinfo is None:  # "-0000" zone: RFC 5322 says UTC
            when = when.replace(tzinfo=UTC)
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
    seconds: float | None
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


_RESET_IS_EPOCH = 1e9  # an x-ratelimit-reset above this is a Unix time (GitHub, Twitter), not a delta
# a Unix time above this is in milliseconds (OpenRouter's X-RateLimit-Reset: "1789138080000"), or finer:
# 1e11 seconds is the year 5138, 1e11 milliseconds 1973
_EPOCH_IS_FINER = 1e11
_LEADING_NUMBER = re.compile(r"\s*(\d+(?:\.\d*)?)")
_STRUCTURED_PARAM = re.compile(r"(?:^|[;,\s])(r|t|q|limit|remaining|reset)=(\d+(?:\.\d*)?)")


def _leading_number(value: str | None) -> float | None:
    """The first number of a value such as "100" or "100, 100;w=60" (IETF draft list form)."""
    if value is None:
        return None
    match = _LEADING_NUMBER.match(value)
    return _number(match.group(1)) if match else None


def _reset(value: str | None, now_epoch: float | None) -> float | None:
    """A reset as seconds from now: a duration ("1s", "6m0s", "0.5"), a Unix time in seconds
    (GitHub) or milliseconds (OpenRouter), or an RFC 3339 timestamp (Anthropic); absolute forms
    need `now_epoch`."""
    if value is None or not value.strip():
        return None
    seconds = parse_duration(value)
    if seconds is not None:
        if seconds < _RESET_IS_EPOCH:
            return seconds
        while seconds >= _EPOCH_IS_FINER:  # milliseconds (microseconds, ...) since the epoch
            seconds /= 1000
        return None if now_epoch is None else max(0.0, seconds - now_epoch)
    try:
        when = datetime.fromisoformat(value.strip())
    except ValueError:
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return None if now_epoch is None else max(0.0, when.timestamp() - now_epoch)


_Triple = tuple[float | None, float | None, float | None]  # limit, remaining, seconds to reset


def _triple(lower: Mapping[str, str], names: tuple[str, str, str], now_epoch: float | None) -> _Triple:
    limit, remaining, reset = (lower.get(name) for name in names)
    return _leading_number(limit), _leading_number(remaining), _reset(reset, now_epoch)


# (limit, remaining, reset) header names for requests, then for tokens (the cost unit), in
# order of preference, shorter windows first: of the families present, a spent one (nothing
# remaining) wins, the one resetting last when several are; else the first one.
_REQUEST_FAMILIES = (
    ("x-ratelimit-limit-requests", "x-ratelimit-remaining-requests", "x-ratelimit-reset-requests"),  # OpenAI
    ("anthropic-ratelimit-requests-limit", "anthropic-ratelimit-requests-remaining",
     "anthropic-ratelimit-requests-reset"),
    # Mistral (per minute; no reset header), Cerebras (per day; reset in seconds, inference-docs.cerebras.ai
    # "Rate limits": x-ratelimit-*-requests-day, x-ratelimit-*-tokens-minute)
    ("x-ratelimit-limit-req-minute", "x-ratelimit-remaining-req-minute", "x-ratelimit-reset-req-minute"),
    ("x-ratelimit-limit-requests-minute", "x-ratelimit-remaining-requests-minute", "x-ratelimit-reset-requests-minute"),
    ("x-ratelimit-limit-requests-hour", "x-ratelimit-remaining-requests-hour", "x-ratelimit-reset-requests-hour"),
    ("x-ratelimit-limit-requests-day", "x-ratelimit-remaining-requests-day", "x-ratelimit-reset-requests-day"),
    ("x-ratelimit-limit", "x-ratelimit-remaining", "x-ratelimit-reset"),  # GitHub and many others
    ("ratelimit-limit", "ratelimit-remaining", "ratelimit-reset"),  # IETF draft (-00 to -06)
)
_TOKEN_FAMILIES = (
    ("x-ratelimit-limit-tokens", "x-ratelimit-remaining-tokens", "x-ratelimit-reset-tokens"),
    ("anthropic-ratelimit-tokens-limit", "anthropic-ratelimit-tokens-remaining", "anthropic-ratelimit-tokens-reset"),
    ("anthropic-ratelimit-input-tokens-limit", "anthropic-ratelimit-input-tokens-remaining",
     "anthropic-ratelimit-input-tokens-reset"),
    ("x-ratelimit-limit-tokens-minute", "x-ratelimit-remaining-tokens-minute", "x-ratelimit-reset-tokens-minute"),
    ("x-ratelimit-limit-tokens-hour", "x-ratelimit-remaining-tokens-hour", "x-ratelimit-reset-tokens-hour"),
    ("x-ratelimit-limit-tokens-day", "x-ratelimit-remaining-tokens-day", "x-ratelimit-reset-tokens-day"),
    ("x-ratelimit-limit-tokens-month", "x-ratelimit-remaining-tokens-month", "x-ratelimit-reset-tokens-month"),
)


def _first_family(lower: Mapping[str, str], families: tuple[tuple[str, str, str], ...],
                  now_epoch: float | None) -> _Triple:
    """The binding (limit, remaining, reset) of the families present (see the tuples above).
    Before the spent rule, Cerebras' spent day (remaining-requests-day 0) went unread and the
    key was called about once a minute all day long (a provider trial: 14 x 429 in 90 s)."""
    present = [_triple(lower, names, now_epoch) for names in families if any(name in lower for name in names)]
    spent = [triple for triple in present if triple[1] is not None and triple[1] <= 0]
    if spent:
        return max(spent, key=lambda triple: -1.0 if triple[2] is None else triple[2])
    return present[0] if present else (None, None, None)


def _structured(lower: Mapping[str, str]) -> _Triple:
    """`RateLimit: "default";r=50;t=30` with `RateLimit-Policy: "default";q=100;w=60`
    (draft-ietf-httpapi-ratelimit-headers-07 and later), or the older
    `RateLimit: limit=100, remaining=50, reset=5`.

    The newer form is a list, one item per policy (`"burst";r=0;t=1, "daily";r=9990;t=40000`),
    each matched to its `RateLimit-Policy` item by name. The triple is the binding one, whatever
    the order: of the policies with nothing remaining, the one that resets last (no call fits
    before it); else the one with the shortest window (`w`, else `t`), which paces calls; a
    longer policy (a daily quota) only stops calls once it is spent. Before, the last item
    overwrote the others: a daily quota listed last paced a key at 2.5 % of its rate."""
    items = [item for item in lower.get("ratelimit", "").split(",") if item.strip()]
    if not any(";" in item for item in items):  # the older form: one policy, its fields as list items
        params = {name: _number(value) for name, value in _STRUCTURED_PARAM.findall(lower.get("ratelimit", ""))}
        return params.get("limit"), params.get("remaining"), params.get("reset")
    policies = {_item_name(item): _item_params(item) for item in lower.get("ratelimit-policy", "").split(",")}
    found = []
    for item in items:
        params = _item_params(item)
        policy = policies.get(_item_name(item)) or (next(iter(policies.values())) if len(policies) == 1 else {})
        if params.get("r") is not None or params.get("t") is not None:
            window = policy.get("w", params.get("t"))
            found.append((policy.get("q"), params.get("r"), params.get("t"), math.inf if window is None else window))
    if not found:
        return None, None, None
    spent = [p for p in found if p[1] is not None and p[1] <= 0]
    if spent:
        limit, remaining, reset, _ = max(spent, key=lambda p: -1.0 if p[2] is None else p[2])
    else:
        limit, remaining, reset, _ = min(found, key=lambda p: p[3])
    return limit, remaining, reset


def _item_name(item: str) -> str:
    return item.split(";", 1)[0].strip().strip('"')


def _item_params(item: str) -> dict[str, float | None]:
    return {name: _number(value) for name, value in _STRUCTURED_PARAM.findall(item)}


def parse_ratelimit(headers: Mapping[str, str], now_epoch: float | None = None) -> RateLimitInfo | None:
    """Rate-limit headers (any case) as limit / remaining / seconds-to-reset, for requests
    and tokens; None when none of them is usable. `now_epoch` (Unix seconds) turns
    absolute resets into seconds from now.

    Read, first family present wins: OpenAI `x-ratelimit-{limit,remaining,reset}-{requests,
    tokens}` (resets as durations, "6m0s"; platform.openai.com/docs/guides/rate-limits);
    Anthropic `anthropic-ratelimit-{requests,tokens,input-tokens}-{limit,remaining,reset}`
    (RFC 3339 resets; docs.anthropic.com/en/api/rate-limits); `x-ratelimit-{limit,
    remaining,reset}` (reset in seconds or a Unix time); the IETF draft's
    `ratelimit-{limit,remaining,reset}` and structured `RateLimit`/`RateLimit-Policy`
    (draft-ietf-httpapi-ratelimit-headers).
    """
    lower = {name.lower(): value for name, value in headers.items()}
    limit, remaining, reset = _first_family(lower, _REQUEST_FAMILIES, now_epoch)
    if limit is None and remaining is None and reset is None and "ratelimit" in lower:
        limit, remaining, reset = _structured(lower)
    limit_t, remaining_t, reset_t = _first_family(lower, _TOKEN_FAMILIES, now_epoch)
    info = RateLimitInfo(
        remaining_requests=remaining, remaining_tokens=remaining_t,
        reset_requests_s=reset, reset_tokens_s=reset_t,
        limit_requests=limit, limit_tokens=limit_t,
    )
    return None if info == RateLimitInfo() else info


def provider_code(body: object) -> str | None:
    """The provider's error code from a parsed JSON body, or None.

    OpenAI/Azure: `error.code` (a string; a number is read as its text, 402 as
    "payment_required"), else `error.type`; Anthropic: `error.type` (the top-level `type` is
    just "error"); Google: `error.details[].reason` of an ErrorInfo. A key-scoped or
    overloaded code wins. Anthropic's "Your credit balance is too low ..." message gives
    "credit_balance_too_low" (module docstring), but only as the message's beginning and only
    when the body has no code but the generic `invalid_request_error`: providers echo the
    caller's input inside messages (OpenAI's 404 "The model `<model>` does not exist"), and a
    request must not be able to word its own error so that it disables every key it reaches.
    Anthropic's not_found_error and Google's NOT_FOUND give "model_not_found" when their
    message begins by naming the model (module docstring). xAI's `error` string for a team
    out of credits or at its spending limit gives "credits_exhausted" (key-scoped), also only
    as the string's beginning.
    Codes are short ASCII identifiers; anything else (long text, other shapes) gives None.
    """
    body = _first_of_array(body)
    if not isinstance(body, dict):
        return None
    error = body.get("error")
    if isinstance(error, str):  # xAI: the message itself; only its beginning is read (see above)
        return "credits_exhausted" if _XAI_CREDITS.match(error[:200].lstrip().lower()) else None
    if not isinstance(error, dict):
        return None
    found = [_code_text(error.get(field)) for field in ("code", "type")]
    found = ["payment_required" if value == "402" else value for value in found if value is not None]
    found = [*_google_reasons(error), *found]
    if set(found) <= _GENERIC_TYPES and _says_credit_too_low(error.get("message")):
        found.insert(0, "credit_balance_too_low")
    elif _names_missing_model(error):
        found.insert(0, MODEL_NOT_FOUND)
    known = [value for value in found if value in KEY_SCOPED_CODES or value in OVERLOADED_CODES]
    return (known or found or [None])[0]


def _first_of_array(body: object) -> object:
    """A body that is a JSON array of one error object (Gemini's `streamGenerateContent` answers
    errors so: `[{"error": {...}}]`) as that object; any other body as it is."""
    if isinstance(body, list) and body and isinstance(body[0], dict) and "error" in body[0]:
        return body[0]
    return body


def _says_credit_too_low(message: object) -> bool:
    """Whether an error message begins with Anthropic's "Your credit balance is too low"."""
    return isinstance(message, str) and message[:64].lstrip().lower().startswith(_CREDIT_TOO_LOW)


def _names_missing_model(error: dict[str, Any]) -> bool:
    """Whether an error is Anthropic's not_found_error or Google's NOT_FOUND about the model:
    its message begins with "model:" (Anthropic) or "models/" / "Publisher Model" (Google)."""
    message = error.get("message")
    if not isinstance(message, str):
        return False
    head = message[:64].lstrip().lower()
    return any(error.get(field) == value and head.startswith(starts)
               for (field, value), starts in _MODEL_MESSAGE_STARTS.items())


def _google_reasons(error: dict[str, Any]) -> list[str]:
    """Key-scoped `reason`s of the ErrorInfo entries in a Google error's `details`."""
    details = error.get("details")
    if not isinstance(details, list):
        return []
    reasons = [_code_text(d.get("reason")) for d in details[:16] if isinstance(d, dict)]
    return [r for r in reasons if r in GOOGLE_KEY_REASONS]


def _code_text(value: object) -> str | None:
    if isinstance(value, int) and not isinstance(value, bool):
        value = str(value)
    if isinstance(value, str) and 0 < len(value) <= _MAX_CODE_CHARS and value.isascii():
        return value
    return None


def classify(status: int | None, error: str | None, code: str | None = None) -> OutcomeKind:
    """The outcome class of one call from its status and provider `code` (module docstring)."""
    if status is None:
        return OutcomeKind.UPSTREAM_ERROR
    if 200 <= status < 300:
        return OutcomeKind.OK
    if code in KEY_SCOPED_CODES:
        return OutcomeKind.KEY_ERROR
    if code in OVERLOADED_CODES:
        return OutcomeKind.UPSTREAM_ERROR
    if status == 402:  # Payment Required: the account behind the key is out of credit
        return OutcomeKind.KEY_ERROR
    if status == 429:
        return OutcomeKind.RATE_LIMITED
    if status in (401, 403) or (status == 404 and code in MODEL_UNAVAILABLE_CODES):
        return OutcomeKind.DENIED
    if status == 408 or status >= 500:
        return OutcomeKind.UPSTREAM_ERROR
    return OutcomeKind.BAD_REQUEST
