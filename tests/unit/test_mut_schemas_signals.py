"""What a provider's answer says about its key (schemas/signals.py), at the edges the
table tests of tests/core/test_signals.py leave open: time zones of Retry-After and RFC 3339
resets, absolute resets without a clock, numbers too large for a float, which header family
wins when several are present, which provider code wins, and the status boundaries of
`classify`. Deterministic, no server."""

from __future__ import annotations

import os
import time

import pytest

from ratefleet.schemas.outcome import OutcomeKind, RateLimitInfo
from ratefleet.schemas.signals import classify, parse_duration, parse_ratelimit, parse_retry_after, provider_code

NOW = 1_700_000_000.0  # 2023-11-14T22:13:20Z
HUGE = "9" * 400  # a decimal number beyond a 64-bit float: inf


@pytest.fixture(params=["Asia/Tokyo", "America/Los_Angeles"])
def non_utc(request):
    """The process in a time zone other than UTC for one test (naive times must not be read as local)."""
    before = os.environ.get("TZ")
    os.environ["TZ"] = request.param
    time.tzset()
    yield request.param
    if before is None:
        os.environ.pop("TZ", None)
    else:
        os.environ["TZ"] = before
    time.tzset()


def test_retry_after_date_in_minus_0000_is_utc_whatever_the_local_zone(non_utc):
    assert parse_retry_after("Tue, 14 Nov 2023 22:13:50 -0000", NOW) == 30.0
    assert parse_retry_after("Tue, 14 Nov 2023 23:13:50 +0100", NOW) == 30.0


def test_retry_after_that_is_not_a_finite_number_is_ignored():
    assert parse_retry_after(HUGE, NOW) is None
    assert parse_retry_after("inf", NOW) is None


@pytest.mark.parametrize("value, seconds", [(".5s", 0.5), ("1.s", 1.0), ("3ns", 3e-9), ("2µs", 2e-6),
                                            ("1h", 3600.0), ("-4", 0.0), (" 1m30s ", 90.0)])
def test_duration_forms(value, seconds):
    assert parse_duration(value) == pytest.approx(seconds)


@pytest.mark.parametrize("value", ["inf", HUGE, "   ", "1s 2s", "s1"])
def test_durations_that_are_not_durations(value):
    assert parse_duration(value) is None


def test_numbers_beyond_a_float_are_not_read_as_limits():
    assert parse_ratelimit({"x-ratelimit-remaining": HUGE}) is None
    assert parse_ratelimit({"RateLimit": f"r={HUGE};t=5"}) == RateLimitInfo(reset_requests_s=5.0)


def test_absolute_resets_need_a_clock():
    # a Unix time or an RFC 3339 timestamp cannot become "seconds from now" without `now_epoch`
    assert parse_ratelimit({"x-ratelimit-remaining": "1", "x-ratelimit-reset": "1700000042"}) == (
        RateLimitInfo(remaining_requests=1.0))
    assert parse_ratelimit({"anthropic-ratelimit-tokens-remaining": "9",
                            "anthropic-ratelimit-tokens-reset": "2023-11-14T22:13:50Z"}) == (
        RateLimitInfo(remaining_tokens=9.0))
    assert parse_ratelimit({"x-ratelimit-reset": "7"}) == RateLimitInfo(reset_requests_s=7.0)  # a delta needs none


def test_absolute_resets_in_the_past_are_zero_seconds_away():
    assert parse_ratelimit({"x-ratelimit-reset": "1699999000"}, NOW) == RateLimitInfo(reset_requests_s=0.0)
    assert parse_ratelimit({"anthropic-ratelimit-requests-reset": "2023-11-14T22:00:00Z"}, NOW) == (
        RateLimitInfo(reset_requests_s=0.0))


@pytest.mark.parametrize("stamp", ["2023-11-14T23:13:50+01:00", "2023-11-14T14:13:50-08:00"])
def test_rfc3339_resets_keep_their_offset(stamp):
    info = parse_ratelimit({"anthropic-ratelimit-requests-reset": stamp}, NOW)
    assert info == RateLimitInfo(reset_requests_s=30.0)


def test_rfc3339_reset_without_offset_is_utc_whatever_the_local_zone(non_utc):
    info = parse_ratelimit({"anthropic-ratelimit-requests-reset": "2023-11-14T22:13:50"}, NOW)
    assert info == RateLimitInfo(reset_requests_s=30.0)


STRUCTURED = {"RateLimit": "limit=100, remaining=50, reset=5"}


@pytest.mark.parametrize("family, expected", [
    ({"x-ratelimit-limit": "10"}, RateLimitInfo(limit_requests=10.0)),
    ({"x-ratelimit-remaining": "3"}, RateLimitInfo(remaining_requests=3.0)),
    ({"x-ratelimit-reset": "2"}, RateLimitInfo(reset_requests_s=2.0)),
    ({"x-ratelimit-limit": "10", "x-ratelimit-remaining": "3"}, RateLimitInfo(3.0, limit_requests=10.0)),
    ({"x-ratelimit-limit-requests": "10", "x-ratelimit-reset-requests": "1s"},
     RateLimitInfo(reset_requests_s=1.0, limit_requests=10.0)),
])
def test_a_header_family_wins_over_the_structured_ratelimit_header(family, expected):
    assert parse_ratelimit({**STRUCTURED, **family}) == expected


def test_structured_header_is_read_only_when_no_family_says_anything():
    assert parse_ratelimit(STRUCTURED) == RateLimitInfo(50.0, limit_requests=100.0, reset_requests_s=5.0)
    assert parse_ratelimit({"RateLimit": "r=4;t=2"}) == RateLimitInfo(4.0, reset_requests_s=2.0)
    assert parse_ratelimit({"RateLimit-Policy": "q=100;w=60"}) is None  # a policy alone says nothing now


@pytest.mark.parametrize("error, code", [
    ({"code": "rate_limit_exceeded", "type": "overloaded_error"}, "overloaded_error"),  # overloaded wins
    ({"code": "429", "type": "insufficient_quota"}, "insufficient_quota"),  # key-scoped wins
    ({"type": "invalid_request_error", "message": "Your credit balance is too low to access the API"},
     "credit_balance_too_low"),  # Anthropic's message wins over the generic type
    ({"message": "  your credit balance is too low"}, "credit_balance_too_low"),  # (no code at all)
    ({"type": "overloaded_error", "message": "Your credit balance is too low to access the API"},
     "overloaded_error"),  # a specific code is the provider's word: the message does not override it
    # the phrase quoted from the caller's input, not the provider's own message: no key is blamed
    ({"code": "model_not_found", "type": "invalid_request_error",
      "message": "The model `credit balance is too low` does not exist or you do not have access to it."},
     "model_not_found"),
    ({"type": "invalid_request_error", "message": "messages.0.content: `Your credit balance is too low` is not ..."},
     "invalid_request_error"),
    ({"type": "invalid_request_error", "message": "x" * 40 + "Your credit balance is too low"},
     "invalid_request_error"),
    ({"code": 402}, "payment_required"), ({"code": "402"}, "payment_required"), ({"code": 404}, "404"),
    ({"code": 7}, "7"), ({"code": "x"}, "x"), ({"code": "", "type": "server_error"}, "server_error"),
    ({"code": "c" * 64}, "c" * 64), ({"code": "c" * 65}, None), ({"code": False, "type": "t"}, "t"),
    ({"message": "oops"}, None), ({"code": None, "type": None}, None),
    ({"details": [{"reason": "QUOTA_EXCEEDED"}, {"reason": "API_KEY_INVALID"}], "code": 400}, "API_KEY_INVALID"),
    ({"details": [{"reason": "RATE_LIMIT_EXCEEDED"}], "code": 429}, "429"),  # not about the key: the status code
    ({"details": "API_KEY_INVALID", "code": 400}, "400"),
])
def test_which_provider_code_wins(error, code):
    assert provider_code({"error": error}) == code


@pytest.mark.parametrize("status, kind", [
    (199, OutcomeKind.BAD_REQUEST), (200, OutcomeKind.OK), (201, OutcomeKind.OK), (299, OutcomeKind.OK),
    (300, OutcomeKind.BAD_REQUEST), (304, OutcomeKind.BAD_REQUEST), (402, OutcomeKind.KEY_ERROR),
    (401, OutcomeKind.DENIED), (403, OutcomeKind.DENIED), (404, OutcomeKind.BAD_REQUEST),
    (407, OutcomeKind.BAD_REQUEST), (408, OutcomeKind.UPSTREAM_ERROR), (409, OutcomeKind.BAD_REQUEST),
    (429, OutcomeKind.RATE_LIMITED), (430, OutcomeKind.BAD_REQUEST), (499, OutcomeKind.BAD_REQUEST),
    (500, OutcomeKind.UPSTREAM_ERROR), (501, OutcomeKind.UPSTREAM_ERROR), (599, OutcomeKind.UPSTREAM_ERROR),
])
def test_classify_status_boundaries(status, kind):
    assert classify(status, None) == kind


@pytest.mark.parametrize("status, code, kind", [
    (200, "invalid_api_key", OutcomeKind.OK),  # a 2xx is a success whatever its body says
    (400, "invalid_api_key", OutcomeKind.KEY_ERROR), (429, "insufficient_quota", OutcomeKind.KEY_ERROR),
    (400, "overloaded_error", OutcomeKind.UPSTREAM_ERROR), (429, "overloaded_error", OutcomeKind.UPSTREAM_ERROR),
    (402, "model_not_found", OutcomeKind.KEY_ERROR), (403, "permission_error", OutcomeKind.DENIED),
    (500, "server_error", OutcomeKind.UPSTREAM_ERROR), (None, "invalid_api_key", OutcomeKind.UPSTREAM_ERROR),
])
def test_classify_by_code_then_status(status, code, kind):
    assert classify(status, None, code) == kind
