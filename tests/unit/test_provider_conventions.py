"""Provider conventions a provider trial found read wrongly (schemas/signals.py): each case is
one convention, and each fails on the code before it."""

from __future__ import annotations

import pytest

from ratefleet.dispatcher.core.adaptive import header_rate
from ratefleet.schemas.signals import classify, parse_ratelimit, parse_retry_after, provider_code, retry_after_of

NOW = 1_789_138_078.0


@pytest.mark.parametrize("scale", [1, 1000, 1_000_000])
def test_a_reset_given_as_a_unix_time_in_seconds_or_milliseconds_is_seconds_from_now(scale):
    """OpenRouter's X-RateLimit-Reset is in epoch milliseconds ("1789138080000"): read as seconds
    it was 1.8e12 s away, the key cooled down for retry_after_max_s (an hour) and its rate fell to
    the floor on every 200 that carried it."""
    info = parse_ratelimit({"X-RateLimit-Limit": "10", "X-RateLimit-Remaining": "0",
                            "X-RateLimit-Reset": str(int((NOW + 2) * scale))}, NOW)
    assert info.reset_requests_s == pytest.approx(2.0, abs=0.01)
    assert header_rate(info.limit_requests, 4.0, info.reset_requests_s) == pytest.approx(3.0, rel=0.01)


POLICIES = '"burst";q=5;w=1, "daily";q=10000;w=86400'


@pytest.mark.parametrize("ratelimit", ['"burst";r=4;t=1, "daily";r=9990;t=40000',
                                       '"daily";r=9990;t=40000, "burst";r=4;t=1'])
def test_several_ietf_policies_pace_by_the_shortest_window_whatever_their_order(ratelimit):
    """draft-ietf-httpapi-ratelimit-headers lists one item per policy: the last item overwrote the
    others, so a daily quota listed last paced the key at 0.25 req/s (2.5 % of its rate)."""
    info = parse_ratelimit({"RateLimit": ratelimit, "RateLimit-Policy": POLICIES}, NOW)
    assert (info.limit_requests, info.remaining_requests, info.reset_requests_s) == (5, 4, 1)


@pytest.mark.parametrize("ratelimit, reset", [('"burst";r=0;t=1, "daily";r=9990;t=40000', 1),
                                              ('"daily";r=0;t=40000, "burst";r=4;t=1', 40000),
                                              ('"burst";r=0;t=1, "daily";r=0;t=40000', 40000)])
def test_a_spent_policy_stops_calls_until_it_resets_whatever_the_others_say(ratelimit, reset):
    info = parse_ratelimit({"RateLimit": ratelimit, "RateLimit-Policy": POLICIES}, NOW)
    assert (info.remaining_requests, info.reset_requests_s) == (0, reset)


def test_the_single_policy_forms_read_as_before():
    one = parse_ratelimit({"RateLimit": '"default";r=50;t=30', "RateLimit-Policy": '"default";q=100;w=60'}, NOW)
    old = parse_ratelimit({"RateLimit": "limit=100, remaining=50, reset=5"}, NOW)
    assert (one.limit_requests, one.remaining_requests, one.reset_requests_s) == (100, 50, 30)
    assert (old.limit_requests, old.remaining_requests, old.reset_requests_s) == (100, 50, 5)


GEMINI_429 = {"error": {"code": 429, "status": "RESOURCE_EXHAUSTED", "details": [
    {"@type": "type.googleapis.com/google.rpc.QuotaFailure", "violations": []},
    {"@type": "type.googleapis.com/google.rpc.RetryInfo", "retryDelay": "20s"}]}}


@pytest.mark.parametrize("headers, body, wait", [
    ({"retry-after-ms": "3000"}, None, 3.0),  # Azure OpenAI, read first by the openai SDK
    ({"retry-after-ms": "1500", "retry-after": "9"}, None, 1.5),
    ({"retry-after": "120, 120"}, None, 120.0),  # sent twice, joined by the HTTP client
    ({}, GEMINI_429, 20.0),  # Gemini: google.rpc.RetryInfo in the body
    ({"retry-after": "7"}, GEMINI_429, 7.0),
    ({}, {"error": {"details": [{"@type": "type.googleapis.com/google.rpc.RetryInfo", "retryDelay": "1.5s"}]}}, 1.5),
    ({}, {"error": {"message": "no wait named"}}, None),
    ({}, [GEMINI_429], 20.0),  # streamGenerateContent answers its error as an array of one (a reviewer's finding)
    ({"retry-after": "4.0, 4.0"}, None, 4.0),  # a repeated header with decimals (a re-run of the trial)
    ({"retry-after-ms": "3000, 3000"}, None, 3.0),
])
def test_the_wait_an_answer_names_is_read_wherever_its_provider_puts_it(headers, body, wait):
    """Before only `Retry-After` was read: Azure's retry-after-ms and Gemini's retryDelay were not,
    and the key tried again after 1, 0, 2 s (4 x 429 a key instead of 1; Gemini's first success at 31 s
    instead of 20)."""
    assert retry_after_of(headers, body, NOW) == wait


def test_an_http_date_retry_after_still_reads_whole():
    assert parse_retry_after("Thu, 01 Jan 2026 00:00:10 GMT", 1767225600.0) == 10.0


@pytest.mark.parametrize("status, body, code", [
    (400, {"error": {"message": "Billing hard limit has been reached", "type": "invalid_request_error",
                     "code": "billing_hard_limit_reached"}}, "billing_hard_limit_reached"),
    (429, {"error": {"message": "Your account is not active, please check your billing details on our website.",
                     "type": "billing_not_active", "code": "billing_not_active"}}, "billing_not_active"),
    (401, {"error": {"message": "This account has been deactivated.", "code": "account_deactivated"}},
     "account_deactivated"),
    (400, {"error": {"message": "Organization has been restricted. Please reach out to support to resolve this issue.",
                     "type": "invalid_request_error", "code": "organization_restricted"}}, "organization_restricted"),
])
def test_openais_account_refusals_take_the_key_out(status, body, code):
    """Before: a 400 billing_hard_limit_reached failed each job for good (`bad_request`) while the
    key stayed in rotation and the pool's other keys idled; 429 billing_not_active cooled the key
    down and tried it again and again as a rate limit."""
    assert provider_code(body) == code
    assert classify(status, None, code) == "key_error"


def test_an_error_answered_as_an_array_of_one_reads_like_the_object():
    body = [{"error": {"code": 400, "status": "INVALID_ARGUMENT", "details": [
        {"@type": "type.googleapis.com/google.rpc.ErrorInfo", "reason": "API_KEY_INVALID"}]}}]
    assert provider_code(body) == "API_KEY_INVALID"


CEREBRAS = {"x-ratelimit-limit-requests-day": "14400", "x-ratelimit-remaining-requests-day": "14390",
            "x-ratelimit-reset-requests-day": "33011.38", "x-ratelimit-limit-tokens-minute": "60000",
            "x-ratelimit-remaining-tokens-minute": "59000", "x-ratelimit-reset-tokens-minute": "11.38"}


def test_cerebras_day_and_minute_headers_are_read():
    """Cerebras names its windows in the header (x-ratelimit-*-requests-day, -tokens-minute):
    none were read, so a spent day went on being called about once a minute (14 x 429 in 90 s)."""
    info = parse_ratelimit(CEREBRAS, NOW)
    assert (info.limit_requests, info.remaining_requests, info.reset_requests_s) == (14400, 14390, 33011.38)
    assert (info.limit_tokens, info.remaining_tokens, info.reset_tokens_s) == (60000, 59000, 11.38)
    spent = parse_ratelimit({**CEREBRAS, "x-ratelimit-remaining-requests-day": "0"}, NOW)
    assert (spent.remaining_requests, spent.reset_requests_s) == (0, 33011.38)


def test_mistral_per_minute_and_per_month_headers_are_read():
    mistral = {"x-ratelimit-limit-req-minute": "60", "x-ratelimit-remaining-req-minute": "59",
               "x-ratelimit-limit-tokens-minute": "500000", "x-ratelimit-remaining-tokens-minute": "499000",
               "x-ratelimit-limit-tokens-month": "1000000000", "x-ratelimit-remaining-tokens-month": "999000000"}
    info = parse_ratelimit(mistral, NOW)
    assert (info.limit_requests, info.remaining_requests) == (60, 59)
    assert (info.limit_tokens, info.remaining_tokens) == (500000, 499000)  # the shorter window
    spent = parse_ratelimit({**mistral, "x-ratelimit-remaining-tokens-month": "0"}, NOW)
    assert spent.remaining_tokens == 0  # the month is spent, whatever the minute says


def test_of_two_families_a_spent_one_binds_and_the_one_resetting_last_of_two_spent():
    both = {"x-ratelimit-limit-requests": "60", "x-ratelimit-remaining-requests": "0",
            "x-ratelimit-reset-requests": "1s", "x-ratelimit-limit-requests-day": "1000",
            "x-ratelimit-remaining-requests-day": "0", "x-ratelimit-reset-requests-day": "5000"}
    assert parse_ratelimit(both, NOW).reset_requests_s == 5000
    minute = {**both, "x-ratelimit-remaining-requests-day": "10"}
    assert (parse_ratelimit(minute, NOW).remaining_requests, parse_ratelimit(minute, NOW).reset_requests_s) == (0, 1)


XAI_CREDITS = {"code": "Some resource has been exhausted", "error": (
    "Your team 16f2151a-40f4-4a80-8ad0-cae00c27e8dd has either used all available credits or reached its monthly "
    "spending limit. To continue making API requests, please purchase more credits or raise your spending limit.")}


def test_xais_team_out_of_credits_is_key_scoped():
    """xAI answers a team out of credits with 429 and an `error` that is a string (continuedev/continue#10373):
    read as a rate limit, the key stayed in, its rate cut, and was called about once a minute for good."""
    assert provider_code(XAI_CREDITS) == "credits_exhausted"
    assert classify(429, None, provider_code(XAI_CREDITS)) == "key_error"
    quoted = {"error": "Invalid request: 'Your team x has either used all available credits or reached its monthly "
                       "spending limit'"}
    assert provider_code(quoted) is None  # only the string's beginning: a request cannot word it
    assert provider_code({"error": "Rate limit exceeded"}) is None


@pytest.mark.parametrize("message, wait", [
    ("Requests to the ChatCompletions_Create Operation under Azure OpenAI API version 2024-02-01 have exceeded token "
     "rate limit of your current OpenAI S0 pricing tier. Please retry after 6 seconds. Please go here: "
     "https://aka.ms/oai/quotaincrease if you would like to further increase the default rate limit.", 6.0),
    ("Rate limit reached for gpt-4o in organization org-abc on tokens per min (TPM): Limit 30000, Used 29000, "
     "Requested 2000. Please try again in 2.002s. Visit https://platform.openai.com/account/rate-limits", 2.002),
    ("Rate limit reached for model `llama-3.3-70b-versatile` in organization `org_01` on requests per day (RPD): "
     "Limit 1000, Used 1000, Requested 1. Please try again in 1m26.4s.", 86.4),
    ("Rate limit reached ... Please try again in 250ms.", 0.25),
    ("Rate limit reached for requests per minute. Please try again in 6m0s.", 360.0),
    ("Rate limit exceeded.", None),
    # a re-run: other wordings of the same kind
    ("Resource has been exhausted. Please retry in 46.28s.", 46.28),  # Gemini's, beside its RetryInfo
    ("Too many requests, retry in 5s", 5.0),
    ("Please try again after 20 seconds.", 20.0),
    ("Please wait 30 seconds before retrying.", 30.0),
    ("Rate limited: retry after 1 minute", 60.0),
    ("Quota exceeded. Try again in 2 hours.", 7200.0),
    ("Please wait a moment and try again.", None),
])
def test_a_wait_named_only_in_the_error_message_is_honoured(message, wait):
    """A provider trial: Azure's 429 naming its wait only in the message drew 14 x 429 where the
    same wait in a Retry-After header drew 2."""
    body = {"error": {"code": "429", "message": message}}
    assert retry_after_of({}, body, NOW) == (pytest.approx(wait) if wait is not None else None)
    assert retry_after_of({"retry-after": "3"}, body, NOW) == 3.0  # a header comes first


def test_a_reset_of_a_day_is_read():
    assert parse_ratelimit({"x-ratelimit-limit-requests": "1000", "x-ratelimit-remaining-requests": "0",
                            "x-ratelimit-reset-requests": "1d"}, NOW).reset_requests_s == 86400.0

