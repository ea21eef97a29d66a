"""Parsers the worker uses to turn an HTTP answer into an Outcome."""

from __future__ import annotations

import pytest

from ratefleet.dispatcher.core import (
    RateLimitInfo,
    classify,
    is_retryable,
    parse_duration,
    parse_ratelimit,
    parse_retry_after,
    provider_code,
)

NOW = 1_700_000_000.0  # 2023-11-14T22:13:20Z


@pytest.mark.parametrize(
    "value, expected",
    [
        (None, None), ("", None), ("  ", None), ("garbage", None), ("nan", None),
        ("5", 5.0), (" 2.5 ", 2.5), ("-3", 0.0), ("0", 0.0),
        ("Tue, 14 Nov 2023 22:13:50 GMT", 30.0),
        ("Tue, 14 Nov 2023 23:13:50 +0100", 30.0),
        ("Tue, 14 Nov 2023 22:13:50 -0000", 30.0),
        ("Tue, 14 Nov 2023 22:00:00 GMT", 0.0),  # in the past
    ],
)
def test_parse_retry_after(value, expected):
    assert parse_retry_after(value, NOW) == expected


def test_parse_retry_after_ignores_local_time_zone(non_utc):
    assert parse_retry_after("Tue, 14 Nov 2023 22:13:50 GMT", NOW) == 30.0


@pytest.mark.parametrize(
    "value, expected",
    [
        ("1s", 1.0), ("6m0s", 360.0), ("20ms", 0.02), ("1h2m3.5s", 3723.5), ("0.5", 0.5),
        ("250us", 0.00025), ("1m", 60.0), ("7.66s", 7.66),
        (None, None), ("", None), ("soon", None), ("1x", None), ("s", None), ("1s2", None),
    ],
)
def test_parse_duration(value, expected):
    result = parse_duration(value)
    if expected is None:
        assert result is None
    else:
        assert result == pytest.approx(expected)


def test_parse_ratelimit_any_case():
    info = parse_ratelimit({
        "X-RateLimit-Remaining-Requests": "59",
        "x-ratelimit-remaining-tokens": "149984",
        "X-RATELIMIT-RESET-REQUESTS": "1s",
        "x-ratelimit-reset-tokens": "6m0s",
        "content-type": "application/json",
    })
    assert info == RateLimitInfo(59.0, 149984.0, 1.0, 360.0)


def test_parse_ratelimit_absent_or_unusable():
    assert parse_ratelimit({"content-type": "text/plain"}) is None
    assert parse_ratelimit({"x-ratelimit-remaining-requests": "lots"}) is None
    assert parse_ratelimit({"x-ratelimit-remaining-tokens": "0"}) == RateLimitInfo(remaining_tokens=0.0)


@pytest.mark.parametrize(
    "status, error, kind",
    [
        (None, "timeout", "upstream_error"), (None, None, "upstream_error"),
        (200, None, "ok"), (204, None, "ok"), (429, None, "rate_limited"),
        (401, None, "denied"), (403, None, "denied"),  # (was key_error: a bare 401/403 no longer disables)
        (408, None, "upstream_error"), (500, None, "upstream_error"), (503, None, "upstream_error"),
        (400, None, "bad_request"), (404, None, "bad_request"), (409, None, "bad_request"),
        (422, None, "bad_request"),
    ],
)
def test_classify(status, error, kind):
    assert classify(status, error) == kind


@pytest.mark.parametrize(
    "kind, retry",
    # key_error: the key is disabled and the job runs on another key (the worker has always done
    # so, tests/e2e/test_key_errors.py: out-of-credit jobs succeed on k2); this table said False
    # while the worker's own copy of the rule said True
    [("ok", False), ("rate_limited", True), ("key_error", True), ("upstream_error", True),
     ("bad_request", False), ("denied", True), ("none", False)],
)
def test_is_retryable(kind, retry):
    assert is_retryable(kind) is retry


OPENAI_KEY = {"error": {"message": "Incorrect API key provided: sk-...", "type": "invalid_request_error",
                        "param": None, "code": "invalid_api_key"}}
OPENAI_QUOTA = {"error": {"message": "You exceeded your current quota", "type": "insufficient_quota",
                          "param": None, "code": "insufficient_quota"}}
OPENAI_MODEL = {"error": {"message": "The model `gpt-9` does not exist or you do not have access to it.",
                          "type": "invalid_request_error", "param": None, "code": "model_not_found"}}
OPENAI_RATE = {"error": {"message": "Rate limit reached", "type": "requests", "code": "rate_limit_exceeded"}}


def anthropic(kind: str) -> dict:
    return {"type": "error", "error": {"type": kind, "message": "..."}}


@pytest.mark.parametrize(
    "body, code",
    [
        (OPENAI_KEY, "invalid_api_key"), (OPENAI_QUOTA, "insufficient_quota"), (OPENAI_MODEL, "model_not_found"),
        (OPENAI_RATE, "rate_limit_exceeded"),
        ({"error": {"type": "insufficient_quota", "code": None}}, "insufficient_quota"),
        ({"error": {"type": "insufficient_quota", "code": "quota"}}, "insufficient_quota"),  # key-scoped wins
        (anthropic("authentication_error"), "authentication_error"), (anthropic("overloaded_error"), "overloaded_error"),
        (anthropic("permission_error"), "permission_error"), (anthropic("rate_limit_error"), "rate_limit_error"),
        ({"error": {"code": "401", "message": "Access denied due to invalid subscription key."}}, "401"),  # Azure
        ({"error": {"code": 429}}, "429"),
        (None, None), ([], None), ("text", None), ({"error": "bad"}, None), ({"error": {"code": "x" * 200}}, None),
        ({"error": {"code": True}}, None), ({"error": {"code": "café"}}, None), ({"message": "hi"}, None),
    ],
)
def test_provider_code(body, code):
    assert provider_code(body) == code


@pytest.mark.parametrize(
    "status, body, kind",
    [
        (401, OPENAI_KEY, "key_error"),            # explicit: the key is bad, disable at once
        (429, OPENAI_QUOTA, "key_error"),          # out of credit: no cooldown cures it
        (429, OPENAI_RATE, "rate_limited"),
        (404, OPENAI_MODEL, "denied"),             # this key may lack the model: another key tries it
        (403, OPENAI_MODEL, "denied"),             # never disables on its own
        (401, anthropic("authentication_error"), "key_error"),
        (402, anthropic("billing_error"), "key_error"),
        (403, anthropic("permission_error"), "denied"),
        (429, anthropic("rate_limit_error"), "rate_limited"),
        (529, anthropic("overloaded_error"), "upstream_error"),
        (400, anthropic("overloaded_error"), "upstream_error"),
        (401, {"error": {"code": "401", "message": "Access denied"}}, "denied"),  # Azure: only the status
        (429, {"error": {"code": "429", "message": "Rate limit is exceeded."}}, "rate_limited"),
        (200, OPENAI_KEY, "ok"),
        (None, OPENAI_KEY, "upstream_error"),
    ],
)
def test_classify_with_provider_codes(status, body, kind):
    assert classify(status, None, provider_code(body)) == kind


# answers about the key that arrive as a 400 or a 402 (schemas/signals.py docstring)
GEMINI_BAD_KEY = {"error": {"code": 400, "message": "API key not valid. Please pass a valid API key.",
                            "status": "INVALID_ARGUMENT",
                            "details": [{"@type": "type.googleapis.com/google.rpc.ErrorInfo", "reason": "API_KEY_INVALID",
                                         "domain": "googleapis.com",
                                         "metadata": {"service": "generativelanguage.googleapis.com"}},
                                        {"@type": "type.googleapis.com/google.rpc.LocalizedMessage", "locale": "en-US",
                                         "message": "API key not valid. Please pass a valid API key."}]}}
GEMINI_BAD_ARG = {"error": {"code": 400, "message": "Invalid value at 'contents'", "status": "INVALID_ARGUMENT",
                            "details": [{"@type": "type.googleapis.com/google.rpc.BadRequest",
                                         "fieldViolations": [{"field": "contents"}]}]}}
OPENROUTER_CREDITS = {"error": {"code": 402, "message": "Insufficient credits. Add more using https://openrouter.ai/credits"}}
ANTHROPIC_CREDIT = {"type": "error", "error": {"type": "invalid_request_error", "message": (
    "Your credit balance is too low to access the Anthropic API. Please go to Plans & Billing to upgrade or purchase "
    "credits.")}}
ANTHROPIC_BAD_REQUEST = {"type": "error", "error": {"type": "invalid_request_error", "message": "max_tokens: Field required"}}


@pytest.mark.parametrize(
    "status, body, code, kind",
    [
        (400, GEMINI_BAD_KEY, "API_KEY_INVALID", "key_error"),
        (400, GEMINI_BAD_ARG, "400", "bad_request"),  # the request's fault stays the request's
        (402, OPENROUTER_CREDITS, "payment_required", "key_error"),
        (402, {"error": {"message": "no code at all"}}, None, "key_error"),  # any 402: out of credit
        (400, ANTHROPIC_CREDIT, "credit_balance_too_low", "key_error"),
        (400, ANTHROPIC_BAD_REQUEST, "invalid_request_error", "bad_request"),
        # OpenAI's 404 quotes the caller's model: a request named "credit balance is too low" must
        # not disable every key of the pool (it did: the phrase was looked for anywhere); it is a
        # denial (tried on one more key, blames no key unless it succeeds there), never key_error
        (404, {"error": {"message": "The model `credit balance is too low` does not exist or you do not have "
                                    "access to it.", "type": "invalid_request_error", "param": None,
                         "code": "model_not_found"}}, "model_not_found", "denied"),
        (403, {"error": {"code": 403, "status": "PERMISSION_DENIED", "details": [
            {"@type": "type.googleapis.com/google.rpc.ErrorInfo", "reason": "SERVICE_DISABLED"}]}},
         "SERVICE_DISABLED", "key_error"),
    ],
)
def test_key_scoped_answers_that_do_not_look_like_it(status, body, code, kind):
    assert provider_code(body) == code
    assert classify(status, None, provider_code(body)) == kind


# 404s saying the model (deployment) is out of this key's reach, per provider (schemas/signals.py):
# a key may lack a model its pool's other keys have, so each is a denial (tried on another key)
AZURE_DEPLOYMENT = {"error": {"code": "DeploymentNotFound", "message": (
    "The API deployment for this resource does not exist. If you created the deployment within the last 5 minutes, "
    "please wait a moment and try again.")}}
ANTHROPIC_MODEL = {"type": "error", "error": {"type": "not_found_error", "message": "model: claude-3-5-sonnet-20241022 "}}
GEMINI_MODEL = {"error": {"code": 404, "status": "NOT_FOUND", "message": (
    "models/gemini-1.0-pro is not found for API version v1beta, or is not supported for generateContent. "
    "Call ListModels to see the list of available models and their supported methods.")}}
VERTEX_MODEL = {"error": {"code": 404, "status": "NOT_FOUND", "message": (
    "Publisher Model `projects/p/locations/us-central1/publishers/google/models/gemini-x` was not found or your "
    "project does not have access to it.")}}
OPENAI_PROJECT_MODEL = {"error": {"message": "Project `proj_abc` does not have access to model `gpt-4o`",
                                  "type": "invalid_request_error", "param": None, "code": "model_not_found"}}


def test_a_404_naming_the_model_is_a_denial_and_other_404s_stay_bad_requests():
    cases = [
        (404, OPENAI_MODEL, "model_not_found", "denied"),
        (404, AZURE_DEPLOYMENT, "DeploymentNotFound", "denied"),
        (404, ANTHROPIC_MODEL, "model_not_found", "denied"),
        (404, GEMINI_MODEL, "model_not_found", "denied"),
        (404, VERTEX_MODEL, "model_not_found", "denied"),
        (403, OPENAI_PROJECT_MODEL, "model_not_found", "denied"),  # a 403: denied already
        # a wrong path, or a 404 that does not name a model: the request's fault, as before
        (404, {"error": {"message": "Invalid URL (POST /v1/chat/complete)", "type": "invalid_request_error",
                         "code": "unknown_url"}}, "unknown_url", "bad_request"),
        (404, {"type": "error", "error": {"type": "not_found_error", "message": "Not Found"}}, "not_found_error",
         "bad_request"),
        (404, {"type": "error", "error": {"type": "not_found_error", "message": "file: model: x"}}, "not_found_error",
         "bad_request"),
        (404, {"error": {"code": 404, "status": "NOT_FOUND", "message": "Requested entity was not found."}}, "404",
         "bad_request"),
        (404, {"error": {"code": 404, "status": "INVALID", "message": "models/x is not found"}}, "404", "bad_request"),
        (404, None, None, "bad_request"),
        # a model's code on another status keeps that status's meaning
        (400, {"error": {"code": "DeploymentNotFound"}}, "DeploymentNotFound", "bad_request"),
        (500, ANTHROPIC_MODEL, "model_not_found", "upstream_error"),
    ]
    got = [(status, provider_code(body), str(classify(status, None, provider_code(body))))
           for status, body, _, _ in cases]
    assert got == [(status, code, kind) for status, _, code, kind in cases]
