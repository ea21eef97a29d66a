"""Whose 429 it is (schemas/ratelimit_scope.py): the exact verdict, with the limit, the
requested amount and the unit a never-fitting request reports, at the edges of each rule
of the module's table. Deterministic, no server."""

from __future__ import annotations

import pytest

from ratefleet.schemas.outcome import RateLimitInfo
from ratefleet.schemas.ratelimit_scope import RateLimitScope, rate_limit_scope


def body(message: object) -> dict:
    return {"error": {"message": message, "type": "tokens", "code": "rate_limit_exceeded"}}


def verdict_of(info, raw_body, cost):
    v = rate_limit_scope(info, raw_body, cost)
    return None if v is None else (v.scope, v.never_fits, v.limit, v.requested, v.unit)


TPM = "tokens per min (TPM)"


@pytest.mark.parametrize("info, raw_body, cost, expected", [
    # the body's numbers: requested above the limit, thousands separators and decimals
    (None, body("Rate limit reached for m on tokens per min (TPM): Limit 30,000, Requested 50,000."), None,
     ("request", True, 30000.0, 50000.0, TPM)),
    (None, body("Rate limit reached on requests per day (RPD): limit: 1.5, requested: 2.25"), None,
     ("request", True, 1.5, 2.25, "requests per day (RPD)")),
    (None, body("x on tokens: Limit 10, Used 9, Requested 11"), None, ("request", True, 10.0, 11.0, "tokens")),
    # requested equal to the limit fits the limit: the key is only full for now
    (None, body("Rate limit reached on tokens per min (TPM): Limit 100, Used 60, Requested 100."), None,
     ("key", False, None, None, "tokens")),
    (None, body("Limit 100, Requested 100"), None, None),
    # "request too large" without numbers, or with unreadable ones
    (None, body("Request too large for m."), None, ("request", True, None, None, "tokens")),
    (None, body("Request too large for m on tokens per min (TPM): Limit 30000, Requested 30000."), None,
     ("request", True, 30000.0, 30000.0, TPM)),  # the stated numbers are kept for the Result's message
    (None, body("Request too large for m on tokens per min (TPM): Limit ,, Requested 7"), None,
     ("request", True, None, 7.0, TPM)),
    # the body's request verdict wins over the headers' cost rule (its own numbers and unit)
    (RateLimitInfo(remaining_requests=0, limit_tokens=30000), body(
        "Request too large for m on tokens per min (TPM): Limit 30000, Requested 50000."), 50000.0,
     ("request", True, 30000.0, 50000.0, TPM)),
    # the job's cost above the key's whole token limit
    (RateLimitInfo(remaining_requests=4, limit_tokens=30000), None, 30001.0,
     ("request", True, 30000.0, 30001.0, "tokens (x-ratelimit-limit-tokens)")),
    (RateLimitInfo(remaining_requests=0, limit_tokens=30000), None, 30000.0, ("key", False, None, None, "tokens")),
    (RateLimitInfo(remaining_requests=0, limit_tokens=1), None, 2.0,
     ("request", True, 1.0, 2.0, "tokens (x-ratelimit-limit-tokens)")),
    (RateLimitInfo(remaining_requests=0, limit_tokens=0), None, 5.0, ("key", False, None, None, "tokens")),
    (RateLimitInfo(remaining_requests=0, limit_tokens=30000), None, None, ("key", False, None, None, "tokens")),
    (RateLimitInfo(remaining_requests=0), None, 50000.0, ("key", False, None, None, "tokens")),
    # the cost rule outranks a body saying the key is full
    (RateLimitInfo(limit_tokens=100), body("Rate limit reached."), 101.0,
     ("request", True, 100.0, 101.0, "tokens (x-ratelimit-limit-tokens)")),
    (RateLimitInfo(remaining_requests=5), body("Rate limit reached."), 1.0, ("key", False, None, None, "tokens")),
    # the headers: nothing left, fewer tokens than the cost, or room
    (RateLimitInfo(remaining_requests=1), None, None, ("request", False, None, None, "tokens")),
    (RateLimitInfo(remaining_requests=0.5), None, None, ("request", False, None, None, "tokens")),
    (RateLimitInfo(remaining_requests=-1), None, None, ("key", False, None, None, "tokens")),
    (RateLimitInfo(remaining_tokens=0), None, None, ("key", False, None, None, "tokens")),
    (RateLimitInfo(remaining_requests=3, remaining_tokens=1), None, None, ("request", False, None, None, "tokens")),
    (RateLimitInfo(remaining_requests=3, remaining_tokens=100), None, 100.0, ("request", False, None, None, "tokens")),
    (RateLimitInfo(remaining_requests=3, remaining_tokens=99), None, 100.0, ("key", False, None, None, "tokens")),
    (RateLimitInfo(remaining_tokens=99), None, 100.0, ("key", False, None, None, "tokens")),
    (RateLimitInfo(remaining_tokens=100), None, 100.0, None),  # tokens enough, requests unknown
    (RateLimitInfo(limit_requests=10, limit_tokens=100), None, 1.0, None),  # no remaining at all
    (RateLimitInfo(), None, None, None),
    # bodies that are not an error message
    (None, {"error": "Request too large"}, None, None), (None, {"message": "Request too large"}, None, None),
    (None, ["Request too large"], None, None), (None, body(["Request too large"]), None, None),
    (None, body(""), None, None), (None, body("Server busy, try again"), None, None),
])
def test_the_verdict_on_a_429(info, raw_body, cost, expected):
    assert verdict_of(info, raw_body, cost) == expected


def test_only_the_first_4096_characters_of_a_message_are_read():
    assert verdict_of(None, body("x" * 4080 + " Request too large"), None) is None
    assert verdict_of(None, body("x" * 4070 + " Request too large"), None)[0] == "request"


@pytest.mark.parametrize("info, raw_body, cost, words", [
    (None, body("Limit 10, Requested 11"), None, "this request alone exceeds the limit"),
    (None, body("Request too large for m."), None, "the request is too large"),
    (None, body("Rate limit reached."), None, "the key's limit is reached for now"),
    (RateLimitInfo(limit_tokens=10), None, 11.0, "the job's cost is above the key's whole token limit"),
    (RateLimitInfo(remaining_requests=0), None, None, "nothing remaining"),
    (RateLimitInfo(remaining_requests=2, remaining_tokens=40.5), None, 100.0,
     "40.5 tokens left, fewer than the job's 100"),
    (RateLimitInfo(remaining_requests=2.5, remaining_tokens=4000), None, 1.0, "2.5 requests and 4000 tokens remaining"),
    (RateLimitInfo(remaining_requests=7), None, 1.0, "showed 7 requests remaining"),
])
def test_the_reason_names_the_evidence(info, raw_body, cost, words):
    """The reason ends up in the Result's message of a job that ends `rate_limited` or
    `request_too_large` (workers/service.py, executor.py)."""
    assert words in rate_limit_scope(info, raw_body, cost).reason


@pytest.mark.parametrize("limit, requested, text", [
    (30000, 50000, "requests 50000 tokens, more than the limit of 30000"),
    (30000.0, 50000.5, "requests 50000.5 tokens, more than the limit of 30000"),
    (None, 7.0, "requests 7 tokens, more than the limit of ?"),
    (1e20, None, "requests ? tokens, more than the limit of 100000000000000000000"),
])
def test_describe_too_large(limit, requested, text):
    assert RateLimitScope("request", "r", limit=limit, requested=requested).describe_too_large() == text
