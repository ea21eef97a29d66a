"""The gateway's own refusals, as OpenAI-style error bodies.

Body shape (OpenAI API reference, "Error codes"; what the OpenAI SDKs parse into their
`APIStatusError` subclasses): `{"error": {"message", "type", "param", "code"}}`. Errors the
upstream itself answered are passed through unchanged, never rewritten into this shape.
"""

from __future__ import annotations

import json
import math

from ratefleet.client_request import job_fate
from ratefleet.schemas.errors import RatefleetError

SHOULD_RETRY = "x-should-retry"  # the OpenAI and Anthropic SDKs obey it over their own retry rules ("true"/"false")


class GatewayRefusal(RatefleetError):
    """A request the gateway answers itself: HTTP `status`, OpenAI error `type` and `code`,
    a message for the caller (never a key), `retry_after_s` for 429/503, and `sdk_retry`:
    False when an SDK's automatic retry would pay again or repeat what the fleet already
    retried (sent as `x-should-retry: false`; None: the SDK's own rule, by status)."""

    def __init__(self, status: int, message: str, *, type: str, code: str | None,  # noqa: A002 - OpenAI's name
                 param: str | None = None, retry_after_s: float | None = None,
                 sdk_retry: bool | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type
        self.code = code
        self.param = param
        self.retry_after_s = retry_after_s
        self.sdk_retry = sdk_retry
        self.job_id: str | None = None  # the job the fleet has for this request (x-ratefleet-job-id)

    def body(self) -> bytes:
        return json.dumps({"error": {"message": self.message, "type": self.type, "param": self.param,
                                     "code": self.code}}).encode()

    def headers(self) -> dict[str, str]:
        """`Retry-After` in whole seconds, rounded up (RFC 9110 section 10.2.3: delay-seconds),
        and `x-should-retry` when `sdk_retry` is set (the OpenAI Python/Node SDKs, generated
        by Stainless, read it in `_should_retry` before their status rule)."""
        out = {}
        if self.retry_after_s is not None:
            out["retry-after"] = str(max(1, math.ceil(self.retry_after_s)))
        if self.sdk_retry is not None:
            out[SHOULD_RETRY] = "true" if self.sdk_retry else "false"
        return out


def unauthorized() -> GatewayRefusal:
    return GatewayRefusal(401, "Incorrect or missing ratefleet key: send 'Authorization: Bearer <your ratefleet key>' "
                          "(the OpenAI SDK's api_key).", type="invalid_request_error", code="invalid_api_key")


def over_limit(limit: str, retry_after_s: float) -> GatewayRefusal:
    what = "requests per second" if limit == "requests" else "tokens per minute"
    return GatewayRefusal(429, f"Rate limit reached for this caller ({what}); retry after {retry_after_s:.2f} s.",
                          type=limit, code="rate_limit_exceeded", retry_after_s=retry_after_s)


def queue_full(retry_after_s: float = 1.0) -> GatewayRefusal:
    return GatewayRefusal(503, "The ratefleet job queue is full; retry later.", type="server_error",
                          code="queue_full", retry_after_s=retry_after_s)


def nats_down(retry_after_s: float = 2.0) -> GatewayRefusal:
    """503 while the gateway's NATS connection is down (it reconnects by itself): nothing was
    queued, so retrying is safe; `/readyz` says the same."""
    return GatewayRefusal(503, "The ratefleet gateway has lost its NATS connection and is reconnecting; nothing was "
                          "queued. Retry shortly.", type="server_error", code="service_unavailable",
                          retry_after_s=retry_after_s)


def nats_trouble(job_id: str, exc: Exception, retry_after_s: float = 2.0) -> GatewayRefusal:
    """503 `service_unavailable` with Retry-After when NATS went away or stopped answering after
    the job was handed to it (a gateway trial, nats-server paused: a 502 `gateway_error` without
    Retry-After, with NATS-client advice). Whether the job was stored is not known, so the SDK
    is told not to retry by itself (`x-should-retry: false`): if it was, it runs (and is paid)
    unless its deadline (the caller's timeout) passes first; `ratefleet result ID` on the fleet
    says which."""
    refusal = GatewayRefusal(503, f"NATS, the fleet's queue, did not answer for job {job_id} "
                             f"({type(exc).__name__}); the job may or may not have been stored. If it was, it runs "
                             "(and is paid) unless its deadline, this caller's timeout, passes first: the fleet's "
                             f"operators see which with `ratefleet result {job_id}`. Retry after the Retry-After "
                             "interval; a retry is a new job.", type="server_error", code="service_unavailable",
                             retry_after_s=retry_after_s, sdk_retry=False)
    refusal.job_id = job_id
    return refusal


def timed_out(job_id: str, timeout_s: float, reason: str | None = None, why: str | None = None) -> GatewayRefusal:
    """504 for a job without an answer at the caller's timeout. The job may be in its call (and
    paid for when it ends): an SDK's automatic retry would be a second job and a second call,
    so the answer says not to (`x-should-retry: false`). `reason` / `why`: what the fleet said
    after the timeout (RequestTimeout's, or `Client.why_unrun`: no worker, every key out of use,
    ...); a gateway trial got the same bare 504 for each of those, the provider's refusal of
    every key and the cause shown only in the dispatcher's log. Which keys and why stays with the
    fleet's operators (`ratefleet status`): a key's reason can name a secret's variable or file."""
    if reason == "no_key_ready":  # (a gateway job's deadline is the caller's timeout, translate.py: it has passed)
        why = job_fate("no key of the fleet can take it now (each is disabled, cooling down after 429s, or has an "
                       "open breaker; the fleet's operators see which in `ratefleet status`)", "once a key can take it",
                       expired=True)
    cause = why or "it may still run (and be paid)"
    refusal = GatewayRefusal(504, f"No answer within this caller's timeout ({timeout_s:g} s) for job {job_id}: "
                             f"{cause}. Sending the request again makes a new job; its Result is stored under that "
                             f"id when it ends (`ratefleet result {job_id}` on the fleet).",
                             type="timeout", code="job_timeout", sdk_retry=False)
    refusal.job_id = job_id
    return refusal


def bad_request(message: str, *, code: str = "invalid_request", param: str | None = None) -> GatewayRefusal:
    return GatewayRefusal(400, message, type="invalid_request_error", code=code, param=param)
