"""HTTP request -> Job and Result -> HTTP answer, the gateway's pure translation."""

from __future__ import annotations

import base64
import json
from datetime import UTC, datetime, timedelta

import pytest

from ratefleet.gateway.callers import Caller
from ratefleet.gateway.errors import GatewayRefusal, over_limit, queue_full, unauthorized
from ratefleet.gateway.translate import answer_of, build_job, parse_body, used_tokens
from ratefleet.schemas import Result

NOW = datetime(2026, 11, 29, 12, 0, tzinfo=UTC)
ALICE = Caller(name="alice", tier="vip", upstreams=None, models=frozenset({"m"}), timeout_s=30, rps=None, burst=None,
               tokens_per_minute=None)
ROUTED = Caller(name="bob", tier="guest", upstreams=("openai", "anthropic"), models=None, timeout_s=5, rps=None,
                burst=None, tokens_per_minute=None)


def job(caller=ALICE, *, method="POST", path="/v1/chat/completions", query=(), headers=None, json_body=None,
        text_body=None):
    return build_job(caller, method=method, path=path, query=query, headers=headers or {}, json_body=json_body,
                     text_body=text_body, now=NOW)


def test_a_request_becomes_a_job_with_the_callers_deadline_and_only_provider_headers():
    made = job(query=[("a", "1"), ("b", "2"), ("a", "3")], json_body={"model": "m", "messages": []},
               headers={"authorization": "Bearer rk-alice", "openai-beta": "assistants=v2", "x-stainless-os": "Linux",
                        "content-type": "application/json", "cookie": "c=1", "openai-organization": "org-1"})
    assert made.request.path == "/v1/chat/completions" and made.request.method == "POST"
    assert made.request.query == {"a": ["1", "3"], "b": "2"}
    assert made.request.headers == {"openai-beta": "assistants=v2", "openai-organization": "org-1"}
    assert made.request.json_body == {"model": "m", "messages": []}
    assert made.deadline == NOW + timedelta(seconds=30)
    assert made.metadata == {"caller": "alice"} and made.upstream is None and made.id
    assert "rk-alice" not in made.model_dump_json()


def test_a_text_body_keeps_its_content_type_and_a_get_has_no_body():
    made = job(ROUTED, headers={"content-type": "text/plain; charset=utf-8"}, text_body="héllo")
    assert made.request.body == "héllo" and made.request.headers == {"content-type": "text/plain; charset=utf-8"}
    assert job(method="GET", path="/v1/models").request.json_body is None


def test_upstream_choice_follows_the_callers_list():
    assert job(ROUTED).upstream == "openai"
    assert job(ROUTED, headers={"x-ratefleet-upstream": "anthropic"}).upstream == "anthropic"
    with pytest.raises(GatewayRefusal) as denied:
        job(ROUTED, headers={"x-ratefleet-upstream": "gemini"})
    assert (denied.value.status, denied.value.code) == (403, "upstream_not_allowed")


@pytest.mark.parametrize(("kwargs", "status", "code"), [
    ({"json_body": {"model": "gpt-4o"}}, 403, "model_not_allowed"),
    ({"path": "/v1/../admin"}, 400, "forbidden_target"),
    ({"path": "/v1/%2e%2e/x"}, 400, "forbidden_target"),
    ({"json_body": {"model": "m", "x": float("nan")}}, 400, "invalid_job"),
    # a model that is not a string: a clear 400 (it was a 500: the allow-list check hashed it)
    ({"json_body": {"model": ["gpt-4o"], "messages": []}}, 400, "invalid_model"),
    ({"json_body": {"model": {"a": 1}}}, 400, "invalid_model"),
    ({"json_body": {"model": 7}}, 400, "invalid_model"),
    # no model named: the upstream's default would slip past the allow-list (it was forwarded)
    ({"json_body": {"messages": [{"role": "user", "content": "hi"}]}}, 400, "model_required"),
    ({"json_body": [{"model": "m"}]}, 400, "model_required"),
    # an empty model names none (a new user's finding: it was a 403 "may not use model ''")
    ({"json_body": {"model": "", "messages": []}}, 400, "model_required"),
    # a body the gateway cannot read a model from must not pass an allow-list (it was forwarded)
    ({"headers": {"content-type": "text/plain"}, "text_body": '{"model":"gpt-4o","messages":[]}'}, 415,
     "unsupported_media_type"),
])
def test_requests_that_cannot_become_a_valid_job_are_refused(kwargs, status, code):
    with pytest.raises(GatewayRefusal) as refused:
        job(**kwargs)
    assert (refused.value.status, refused.value.code) == (status, code)
    assert set(json.loads(refused.value.body())["error"]) == {"message", "type", "param", "code"}


def test_parse_body():
    assert parse_body(b"", None) == (None, None)
    assert parse_body(b'{"a": 1}', None) == ({"a": 1}, None)
    assert parse_body(b'{"a": 1}', "application/vnd.x+json") == ({"a": 1}, None)
    assert parse_body(b"hi", "text/plain") == (None, "hi")
    for kind in ("multipart/form-data; boundary=x", "Multipart/Mixed; boundary=y"):  # text parts too (a trial's were paid)
        with pytest.raises(GatewayRefusal) as upload:
            parse_body(b'--x\r\nContent-Disposition: form-data; name="file"\r\n\r\nhello text\r\n--x--\r\n', kind)
        assert (upload.value.status, upload.value.code) == (415, "unsupported_media_type")
    with pytest.raises(GatewayRefusal) as broken:
        parse_body(b"{", "application/json")
    assert broken.value.status == 400
    with pytest.raises(GatewayRefusal) as binary:
        parse_body(b"\xff\xfe", "application/octet-stream")
    assert binary.value.status == 415


def result(**fields) -> Result:
    return Result.model_validate({"job_id": "j1", "status": "succeeded", "timings": {"queued_ms": 3.25}, **fields})


def test_the_upstreams_answer_passes_through_with_the_job_headers():
    ok = result(response={"status": 200, "headers": {"content-type": "application/json", "x-ratelimit-limit-requests": "5",
                                                      "x-request-id": "req-1"},
                          "json": {"usage": {"total_tokens": 42}, "text": "é"}})
    status, headers, body = answer_of(ok)
    assert status == 200 and json.loads(body) == {"usage": {"total_tokens": 42}, "text": "é"}
    assert headers == {"x-ratefleet-job-id": "j1", "x-ratefleet-queued-ms": "3.2", "content-type": "application/json",
                       "x-request-id": "req-1"}  # the fleet key's x-ratelimit-* stay behind
    assert used_tokens(ok) == 42
    provider_error = result(status="failed", response={"status": 429, "headers": {"retry-after": "7"},
                                                       "body": "slow down"})
    assert answer_of(provider_error)[0] == 429 and answer_of(provider_error)[2] == b"slow down"
    assert answer_of(provider_error)[1]["retry-after"] == "7" and used_tokens(provider_error) is None
    audio = result(response={"status": 200, "headers": {"content-type": "audio/mpeg"},
                             "body_b64": base64.b64encode(b"\x00\xffID3").decode()})
    assert answer_of(audio)[2] == b"\x00\xffID3"


@pytest.mark.parametrize(("status", "code", "http"), [
    ("invalid", "forbidden_target", 400), ("expired", "deadline_exceeded", 504),
    ("failed", "no_key_available", 503), ("failed", "attempts_exhausted", 502),
])
def test_results_without_an_answer_become_openai_errors(status, code, http):
    answer = answer_of(result(status=status, error={"code": code, "message": "why"}))
    assert answer[0] == http and answer[1]["x-ratefleet-job-id"] == "j1"
    assert json.loads(answer[2])["error"]["code"] == code


def test_the_gateways_own_errors_have_openai_shape_and_whole_second_retry_after():
    assert unauthorized().status == 401 and unauthorized().headers() == {}
    assert over_limit("tokens", 0.2).headers() == {"retry-after": "1"}
    assert over_limit("requests", 2.01).headers() == {"retry-after": "3"}
    assert json.loads(queue_full().body()) == {"error": {"message": "The ratefleet job queue is full; retry later.",
                                                         "type": "server_error", "param": None, "code": "queue_full"}}


@pytest.mark.parametrize(("path", "named"), [
    ("/v1beta/models/gemini-1.5-pro:generateContent", "gemini-1.5-pro"),  # Google Gemini API
    ("/v1beta/models/gemini-1.5-pro:streamGenerateContent", "gemini-1.5-pro"),
    ("/v1beta/tunedModels/my-tuned:generateContent", "my-tuned"),
    ("/v1/projects/p/locations/us-central1/publishers/google/models/gemini-ultra:generateContent", "gemini-ultra"),
    ("/openai/deployments/gpt4-prod/chat/completions", "gpt4-prod"),  # Azure OpenAI
    ("/model/anthropic.claude-3-opus-20240229-v1%3A0/converse", "anthropic.claude-3-opus-20240229-v1"),  # Bedrock
    ("/v1beta/models/gemini%2Dultra:generateContent", "gemini-ultra"),  # escaped: the upstream decodes it
    ("/v1/models/gpt-4o", "gpt-4o"),  # OpenAI retrieve
])
def test_a_model_named_in_the_path_is_held_to_the_allow_list(path, named):
    """A model in the URL (Gemini, Vertex, Azure, Bedrock) passed any allow-list: only the
    body's `model` was checked, and Gemini's bodies name none."""
    with pytest.raises(GatewayRefusal) as refused:
        job(path=path, json_body={"contents": [{"parts": [{"text": "hi"}]}]})
    assert (refused.value.status, refused.value.code) == (403, "model_not_allowed")
    assert named in refused.value.message
    with pytest.raises(GatewayRefusal):  # also without a body
        job(method="GET", path=path)


def test_a_path_that_names_an_allowed_model_needs_no_model_in_the_body():
    gemini = Caller(name="g", tier="vip", upstreams=None, models=frozenset({"gemini-1.5-pro", "org/name", "dep"}),
                    timeout_s=30, rps=None, burst=None, tokens_per_minute=None)
    body = {"contents": [{"parts": [{"text": "hi"}]}]}
    assert job(gemini, path="/v1beta/models/gemini-1.5-pro:generateContent", json_body=body).request.json_body == body
    assert job(gemini, path="/models/org/name", json_body={"inputs": "x"})  # Hugging Face: org/name
    assert job(gemini, path="/openai/deployments/dep/chat/completions", json_body={"messages": []})
    assert job(gemini, method="GET", path="/v1/models").request.json_body is None  # a list names no model
    with pytest.raises(GatewayRefusal) as both:  # path and body both name one: both must be allowed
        job(gemini, path="/openai/deployments/dep/chat/completions", json_body={"model": "gpt-4o"})
    assert both.value.code == "model_not_allowed"
    with pytest.raises(GatewayRefusal) as unnamed:  # neither names one: still required
        job(gemini, path="/v1/chat/completions", json_body={"messages": []})
    assert unnamed.value.code == "model_required"


def test_a_path_model_id_with_a_colon_is_matched_whole_too():
    """The `:method` cut is Google's; a Bedrock id (`anthropic.claude-v2:1`) or an OpenAI
    fine-tune (`ft:gpt-4o-mini:org::abc`) has a colon of its own and was checked cut (a reviewer)."""
    ids = Caller(name="b", tier="vip", upstreams=None, models=frozenset({"anthropic.claude-v2:1", "ft:gpt-4o-mini:org::abc"}),
                 timeout_s=30, rps=None, burst=None, tokens_per_minute=None)
    assert job(ids, path="/model/anthropic.claude-v2:1/invoke", json_body={"prompt": "x"})
    assert job(ids, method="GET", path="/v1/models/ft:gpt-4o-mini:org::abc")
    with pytest.raises(GatewayRefusal):
        job(ids, path="/model/anthropic.claude-v2:2/invoke", json_body={"prompt": "x"})


def test_a_final_answer_the_fleet_did_not_retry_leaves_the_sdk_its_own_rule():
    """`x-should-retry: false` is for what the fleet retried or paid for; a final 409 passed on
    (upstream_error: not retried by the fleet) is the SDK's to retry (a reviewer)."""
    conflict = result(status="failed", response={"status": 409, "headers": {}, "body": "busy"},
                      error={"code": "upstream_error", "message": "refused with HTTP 409; not retried"})
    assert "x-should-retry" not in answer_of(conflict)[1]
    exhausted = result(status="failed", response={"status": 500, "headers": {}, "body": "oops"},
                       error={"code": "attempts_exhausted", "message": "gave up after 3 attempts"})
    assert answer_of(exhausted)[1]["x-should-retry"] == "false"


def test_a_request_too_large_for_every_key_tells_the_sdk_not_to_retry():
    """A prompt over every key's tokens/min drew the provider's 429 "Request too large" (or was
    refused before a call): the OpenAI SDK retried that 429 twice on its own, each retry a new
    job charged a key's whole minute budget, so the caller waited ~108 s for the same answer
    and the keys' budgets were drained for everyone else."""
    too_large = result(status="failed", response={"status": 429, "headers": {}, "body": "Request too large"},
                       error={"code": "request_too_large", "message": "the provider says this request alone "
                                                                      "exceeds the limit"})
    status, headers, _ = answer_of(too_large)
    assert status == 429 and headers["x-should-retry"] == "false"
    refused = answer_of(result(status="failed", error={"code": "request_too_large", "message": "cost over every key"}))
    assert refused[1]["x-should-retry"] == "false"


@pytest.mark.parametrize(("method", "path"), [
    ("GET", "/v1/chat/completions"), ("GET", "/v1/chat/completions/chatcmpl-1"),  # stored completions
    ("DELETE", "/v1/chat/completions/chatcmpl-1"), ("GET", "/v1/responses/resp_1"), ("DELETE", "/v1/responses/resp_1"),
    ("GET", "/v1/batches/"), ("POST", "/v1/files/abc"), ("GET", "/v1/files"), ("GET", "/V1/Files/file-1/content"),
    ("GET", "/v1/vector_stores"), ("POST", "/v1/assistants"), ("GET", "/v1/threads/t1/messages"),
    ("POST", "/v1/fine_tuning/jobs"), ("GET", "/v1/organization/users"), ("POST", "/v1/messages/batches"),
    ("POST", "/v1/uploads"), ("GET", "/v1/evals"),
    # a review: percent-encoded once more (the worker's aiohttp sends /v1/%66iles as /v1/files), Azure
    # OpenAI's and Gemini's stores, OpenAI videos, a fine-tuned model deleted
    ("GET", "/v1/%2566iles"), ("GET", "/v1/%66iles"), ("GET", "/v1/chat/completion%2573"), ("GET", "/openai/files"),
    ("GET", "/openai/v1/files"), ("GET", "/openai/batches"), ("POST", "/openai/assistants"), ("GET", "/v1beta/files"),
    ("GET", "/v1beta/cachedContents"), ("GET", "/v1/videos"), ("DELETE", "/v1/models/ft:gpt-4o:org:custom"),
    # a re-run: segment parameters, which some servers drop
    ("GET", "/v1/files;x"), ("GET", "/v1/chat/completions;v=1"), ("GET", "/v1;a/batches")])
def test_what_the_provider_account_stores_is_not_passed_on_by_default(method, path):
    """A gateway trial: every caller shares the fleet's keys, and `GET /v1/chat/completions`
    (the organization's stored completions), `/v1/batches/` and `/v1/files/abc` went to the
    provider with them, past the gateway's own per-caller Files and Batch API."""
    caller = Caller(name="bob", tier="guest", upstreams=None, models=None, timeout_s=5, rps=None, burst=None,
                    tokens_per_minute=None)
    with pytest.raises(GatewayRefusal) as refused:
        job(caller, method=method, path=path, json_body={"model": "m"} if method == "POST" else None)
    assert (refused.value.status, refused.value.code) == (403, "path_not_allowed")
    assert "callers.bob.paths" in refused.value.message


@pytest.mark.parametrize(("method", "path"), [
    ("POST", "/v1/chat/completions"), ("POST", "/v1/responses"), ("POST", "/v1/embeddings"), ("GET", "/v1/models"),
    ("POST", "/v1/messages"), ("POST", "/v1/completions"), ("POST", "/v1/filesystem"),
    ("POST", "/openai/deployments/gpt-4o/chat/completions"), ("GET", "/v1/models/gpt-4o"),
    ("POST", "/v1/responses/input_tokens")])
def test_requests_that_store_nothing_pass_by_default(method, path):
    caller = Caller(name="bob", tier="guest", upstreams=None, models=None, timeout_s=5, rps=None, burst=None,
                    tokens_per_minute=None)
    assert job(caller, method=method, path=path, json_body={"model": "m"} if method == "POST" else None).request.path == path


def test_a_callers_paths_are_the_only_ones_it_may_use_and_may_open_a_stored_one():
    caller = Caller(name="svc", tier="guest", upstreams=None, models=None, timeout_s=5, rps=None, burst=None,
                    tokens_per_minute=None, paths=("/openai/deployments/*/chat/completions", "/v1/responses/*"))
    assert job(caller, path="/openai/deployments/gpt-4o/chat/completions", json_body={"model": "m"})
    assert job(caller, method="GET", path="/v1/responses/resp_1")  # allowed by the operator
    with pytest.raises(GatewayRefusal) as refused:
        job(caller, path="/v1/chat/completions", json_body={"model": "m"})
    assert refused.value.code == "path_not_allowed" and "callers.svc.paths lists what it may" in refused.value.message


def test_callers_paths_come_from_the_config_and_a_pattern_must_be_a_path():
    from ratefleet.schemas import ConfigError
    from ratefleet.schemas.config import parse_config

    base = {"upstreams": {"u": {"base_url": "http://127.0.0.1:1"}},
            "pools": {"p": {"keys": [{"id": "k1", "secret": "env:K", "rps": 1}]}}}
    config = parse_config({**base, "callers": {"svc": {"key": "env:C", "tier": "vip", "paths": ["/v1/embeddings"]}}})
    assert Caller.from_config("svc", config.callers["svc"]).paths == ("/v1/embeddings",)
    assert Caller.from_config("svc", parse_config({**base, "callers": {"svc": {"key": "env:C", "tier": "vip"}}})
                              .callers["svc"]).paths is None
    with pytest.raises(ConfigError, match=r"callers\.svc\.paths.*'v1/embeddings' is no path"):
        parse_config({**base, "callers": {"svc": {"key": "env:C", "tier": "vip", "paths": ["v1/embeddings"]}}})


@pytest.mark.parametrize("path", ["/v1//files", "/v1/chat//completions", "/v1/%2F/files"])
def test_a_path_with_an_empty_segment_is_refused(path):
    """A re-run of the gateway trial: `/v1//files` went to the provider (nginx merges slashes)."""
    caller = Caller(name="bob", tier="guest", upstreams=None, models=None, timeout_s=5, rps=None, burst=None,
                    tokens_per_minute=None)
    with pytest.raises(GatewayRefusal) as refused:
        job(caller, method="GET", path=path)
    assert (refused.value.status, refused.value.code) == (400, "invalid_path")


def test_an_answer_header_outside_latin_1_goes_out_as_the_bytes_the_upstream_sent():
    from starlette.responses import Response

    from ratefleet.gateway.translate import passed_headers
    from ratefleet.workers.direct import received_headers

    # an upstream's UTF-8 request id, decoded by the worker as httpx does
    decoded = received_headers([(b"X-Request-Id", "req_€".encode()), (b"Content-Type", b"text/event-stream"),
                                (b"Set-Cookie", b"a=b")])
    passed = passed_headers(decoded)
    assert set(passed) == {"x-request-id", "content-type"}
    raw = dict(Response(b"", headers=passed).raw_headers)  # Starlette writes values as latin-1: it raised before
    assert raw[b"x-request-id"] == "req_€".encode()
    assert passed_headers({"X-Request-Id": "req_é"}) == {"x-request-id": "req_é"}  # latin-1 values stay as they are
