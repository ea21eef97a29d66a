"""Job validation: the rules that keep a key from ever leaving its upstream."""

from __future__ import annotations

import json

import pytest

from ratefleet.schemas import ErrorCode, Job, JobRejected, Result, parse_job


def job(path: str = "/v1/chat/completions", **request) -> bytes:
    return json.dumps({"request": {"path": path, **request}}).encode()


@pytest.mark.parametrize("path", [
    "http://evil.example/x", "https://evil.example/v1", "//evil.example/x", "/v1/../../etc/passwd",
    "/v1/%2e%2e/x", "/v1/%252e%252e/x", "/%2F%2Fevil.example/x", "v1/chat", "/v1/./x", "/v1\\..\\x",
    "/v1/x\r\nHost: evil", "/@evil.example/x", "javascript:alert(1)",
])
def test_paths_that_could_leave_the_upstream_are_forbidden(path):
    with pytest.raises(JobRejected) as caught:
        parse_job(job(path))
    assert caught.value.code == ErrorCode.FORBIDDEN_TARGET, caught.value.message
    assert "request.path" in caught.value.message


@pytest.mark.parametrize("path", ["/v1/chat/completions", "/v1/models?limit=2", "/a/b-c_d.e/f%20g", "/"])
def test_plain_paths_are_accepted(path):
    assert parse_job(job(path)).request.path == path


@pytest.mark.parametrize("header", ["Authorization", "authorization", "Host", "Proxy-Authorization", "X-Api-Key", "Cookie"])
def test_auth_and_host_headers_are_forbidden(header):
    with pytest.raises(JobRejected) as caught:
        parse_job(job(headers={header: "x"}))
    assert caught.value.code == ErrorCode.FORBIDDEN_TARGET and header in caught.value.message


@pytest.mark.parametrize("raw, fragment", [
    (b"\xff\xfe not json", "not valid JSON"),
    (b"[1, 2]", "JSON object"),
    (b"{}", "request: Field required"),
    (b'{"request": {"path": "/x"}, "id": "has space"}', "id:"),
    (b'{"request": {"path": "/x"}, "batch": "a.b"}', "batch:"),
    (b'{"request": {"path": "/x"}, "cost": -1}', "cost:"),
    (b'{"request": {"path": "/x"}, "surprise": 1}', "surprise:"),
    (b'{"request": {"path": "/x", "method": "BREW"}}', "request.method:"),
    (b'{"request": {"path": "/x"}, "deadline": "2026-01-01T00:00:00"}', "deadline:"),
    # a new user's finding: both were taken and `body` was dropped without a word at the call
    (b'{"request": {"path": "/x", "json": {"a": 1}, "body": "text"}}',
     "request: give the body as `json` (a JSON value) or as `body` (text), not both"),
])
def test_invalid_jobs_name_the_field(raw, fragment):
    with pytest.raises(JobRejected) as caught:
        parse_job(raw)
    assert caught.value.code == ErrorCode.INVALID_JOB
    assert fragment in caught.value.message


def test_an_invalid_job_keeps_its_id_and_batch_so_its_result_can_be_found():
    with pytest.raises(JobRejected) as caught:
        parse_job(b'{"id": "j-1", "batch": "b1", "request": {"path": "http://x/"}}')
    assert (caught.value.job_id, caught.value.batch) == ("j-1", "b1")


def test_oversize_job_is_refused_before_parsing():
    with pytest.raises(JobRejected) as caught:
        parse_job(job(json={"blob": "x" * 5000}), max_bytes=4096)
    assert "limit is 4096" in caught.value.message


def test_job_round_trips_with_the_json_alias():
    parsed = parse_job(job(json={"model": "m"}, query={"a": 1}))
    again = Job.model_validate_json(parsed.to_json())
    assert again == parsed and json.loads(parsed.to_json())["request"]["json"] == {"model": "m"}
    assert parsed.with_id().id and parsed.with_id().id != parsed.with_id().id  # fresh ids when absent


def test_result_round_trip_and_shape():
    result = Result(job_id="j", status="succeeded", response={"status": 200, "json": {"ok": 1}})
    data = json.loads(result.to_json())
    assert data["response"]["json"] == {"ok": 1} and data["error"] is None
    assert Result.from_json(result.to_json()) == result


@pytest.mark.parametrize("body", [
    {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}]},
    {"model": "text-embedding-3-small", "input": ["a"]},
])
def test_a_bare_provider_body_is_told_how_to_wrap_it(body):
    """A user pasted a chat-completions body as a job line (or `ratefleet request`): the error said
    only 'request: Field required; model: Extra inputs are not permitted', not what a job is."""
    with pytest.raises(JobRejected) as refused:
        parse_job(json.dumps(body).encode())
    message = str(refused.value)
    assert 'put it under {"request": {"path": "/v1/...", "json": ...}}' in message
    assert "examples/jobs.jsonl" in message


def test_a_job_missing_only_its_request_gets_no_body_hint():
    with pytest.raises(JobRejected) as refused:
        parse_job(json.dumps({"id": "a1", "cost": 3}).encode())
    assert "put it under" not in str(refused.value)
