"""The Job contract (schemas/job.py) at its edges: which paths and headers are refused
and with which code, the size limit and where it comes from, the id and batch an invalid
job's Result is filed under, the field path in every message, and the job's wire form.
Deterministic, no server."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta

import pytest
from pydantic import ValidationError
from pydantic_core import PydanticCustomError

from ratefleet.schemas import ErrorCode, Job, JobRejected, parse_job
from ratefleet.schemas.job import (
    ASSIGNMENT_OVERHEAD,
    HttpRequest,
    check_header,
    check_path,
    describe_validation_error,
    job_size_limit,
)


def raw_job(path: str = "/v1/chat", **top) -> bytes:
    return json.dumps({"request": {"path": path}, **top}).encode()


def rejected(raw: bytes, **kwargs) -> JobRejected:
    with pytest.raises(JobRejected) as caught:
        parse_job(raw, **kwargs)
    return caught.value


# -- paths ------------------------------------------------------------------------------------

@pytest.mark.parametrize("path", [
    "/v1/chat/completions", "/users/@me", "/api/@me/settings", "/v1/files?path=../up", "/a/b.c/..x",
    "/search?q=a/./b", "/%2561",  # a literal "%61" after one decoding
])
def test_plain_paths_are_accepted(path):
    assert check_path(path) == path
    assert parse_job(raw_job(path)).request.path == path


@pytest.mark.parametrize("path", [
    "//evil.example/x", "/http://evil.example", "/@evil.example/x", "/%40evil.example",
    "/a/../b", "/a/./b", "/..", "/x/..?a=1?b", "/a/%2e%2e/b", "/a/%252e%252e/b", "/a/%25252e%25252e/b",
    "/a\\b", "/a%5cb", "/a%0d%0aHost:x", "v1/chat",
])
def test_paths_that_could_leave_the_upstream_are_forbidden_target(path):
    error = rejected(raw_job(path))
    assert error.code == ErrorCode.FORBIDDEN_TARGET
    assert error.message.startswith("request.path: ")


def described(data: object) -> tuple[ErrorCode, str]:
    """(code, message) for a job given as Python values (Client.as_job), where lone surrogates get through."""
    with pytest.raises(ValidationError) as caught:
        Job.model_validate(data)
    return describe_validation_error(caught.value)


def test_a_path_that_is_not_text_is_invalid_not_forbidden():
    with pytest.raises(PydanticCustomError) as caught:
        check_path("/a\ud83d")
    assert caught.value.type == "invalid_job"
    assert caught.value.message().startswith("path contains a lone UTF-16 surrogate U+D83D at character 2")


# -- headers ----------------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["X-Api-Key", "X-Goog-Api-Key", "Authorization:", " host", "COOKIE"])
def test_headers_ratefleet_sets_are_forbidden_in_any_spelling(name):
    with pytest.raises(PydanticCustomError) as caught:
        check_header(name, "v")
    assert caught.value.type == "forbidden_target" and repr(name) in caught.value.message()


def test_the_configured_auth_header_is_forbidden_and_others_pass():
    check_header("X-Trace", "1", auth_header="X-Custom-Auth")
    check_header("X-Trace", "1")
    with pytest.raises(PydanticCustomError) as caught:
        check_header("x-custom-auth", "k", auth_header="X-Custom-Auth")
    assert caught.value.type == "forbidden_target"


def test_a_bad_header_is_invalid_with_its_name_and_reason():
    error = rejected(json.dumps({"request": {"path": "/v1", "headers": {"X-A": "ok", "X-B": "a\nb"}}}).encode())
    assert error.code == ErrorCode.INVALID_JOB
    assert "request.headers: " in error.message and "'X-B' value contains a line break at character 1" in error.message
    error = rejected(json.dumps({"request": {"path": "/v1", "headers": {"X B": "v"}}}).encode())
    assert error.code == ErrorCode.INVALID_JOB and "header name 'X B' is not an RFC 9110 token" in error.message


# -- parse_job: size, JSON, shape, and what an invalid job's Result is filed under ------------

def test_size_limit_is_inclusive_and_names_its_source():
    raw = raw_job(id="j1", batch="b1")
    assert parse_job(raw, max_bytes=len(raw)).id == "j1"
    error = rejected(raw, max_bytes=len(raw) - 1)
    assert (error.code, error.job_id, error.batch) == (ErrorCode.INVALID_JOB, "j1", "b1")
    assert error.message == f"job is {len(raw)} bytes; the limit is {len(raw) - 1} (streams.max_job_bytes)"
    error = rejected(raw, max_bytes=10, limit_source="the NATS server's max_payload")
    assert error.message.endswith("the limit is 10 (the NATS server's max_payload)")
    error = rejected(b"x" * 20, max_bytes=10)
    assert (error.job_id, error.batch) == (None, None)
    assert parse_job(raw).id == "j1"  # the default limit is 1 MiB
    assert rejected(b" " * ((1 << 20) + 1)).message.startswith(f"job is {(1 << 20) + 1} bytes")


@pytest.mark.parametrize("raw, message", [
    (b"{nope", "job is not valid JSON: "), (b"\xff{}", "job is not valid JSON: "),
    (b"[" * 100_000, "job is nested too deeply to parse (the limit is 100 levels)"),
    (b"[]", "job must be a JSON object"), (b'"job"', "job must be a JSON object"),
])
def test_payloads_that_are_not_a_job_object(raw, message):
    error = rejected(raw)
    assert error.code == ErrorCode.INVALID_JOB and error.message.startswith(message)
    assert (error.job_id, error.batch) == (None, None)


def test_an_invalid_job_is_filed_under_its_id_and_batch_when_they_are_tokens():
    error = rejected(raw_job("/../x", id="j-7", batch="b_2"))
    assert (error.code, error.job_id, error.batch) == (ErrorCode.FORBIDDEN_TARGET, "j-7", "b_2")
    error = rejected(raw_job("/../x", id="a b", batch="b.c"))
    assert (error.job_id, error.batch) == (None, None)
    error = rejected(raw_job("/../x", id=5, batch=["b"]))
    assert (error.job_id, error.batch) == (None, None)


def test_messages_name_every_bad_field_by_its_path():
    error = rejected(json.dumps({"request": {"path": "/v1", "method": "BREW"}, "cost": -1}).encode())
    parts = error.message.split("; ")
    assert len(parts) == 2 and parts[0].startswith("request.method: ") and parts[1].startswith("cost: ")
    assert error.code == ErrorCode.INVALID_JOB


def test_a_forbidden_field_among_invalid_ones_makes_the_job_forbidden_target():
    error = rejected(json.dumps({"request": {"path": "//h", "method": "BREW"}}).encode())
    assert error.code == ErrorCode.FORBIDDEN_TARGET


def test_field_names_from_the_payload_are_bounded_and_writable_in_messages():
    long_name = "f" * 100
    error = rejected(json.dumps({"request": {"path": "/v1"}, long_name: 1}).encode())
    assert error.message.startswith(f"{'f' * 80}...: ")
    error = rejected(json.dumps({"request": {"path": "/v1"}, "g" * 80: 1}).encode())
    assert error.message.startswith(f"{'g' * 80}: ")
    code, message = described({"request": {"path": "/v1", "headers": {"a\ud83d": 5}}})
    assert message.startswith("request.headers.a")  # pydantic-core writes the lone surrogate as U+FFFD
    message.encode("utf-8")


def test_a_whole_object_error_is_named_job():
    code, message = described([])
    assert code == ErrorCode.INVALID_JOB and message.startswith("job: ")


# -- the job itself ---------------------------------------------------------------------------

def test_wire_form_uses_the_contract_names_and_leaves_out_what_is_unset():
    job = Job(request=HttpRequest(path="/v1", json={"a": 1}), id="j1")
    assert json.loads(job.to_json()) == {"id": "j1", "request": {"method": "POST", "path": "/v1", "query": {},
                                                                "headers": {}, "json": {"a": 1}},
                                         "metadata": {}}  # no cost given: none sent (estimated)


def test_a_job_built_without_validation_that_cannot_be_written_is_refused_with_its_ids():
    job = Job.model_construct(request=HttpRequest(path="/v1"), metadata={"a": "\ud83d"}, id="j1", batch="b1",
                              cost=1.0)
    with pytest.raises(JobRejected) as caught:
        job.to_json()
    error = caught.value
    assert (error.code, error.job_id, error.batch) == (ErrorCode.INVALID_JOB, "j1", "b1")
    assert error.message.startswith("job cannot be serialised as JSON: ")


def test_with_id_keeps_a_given_id_and_gives_a_fresh_one_otherwise():
    job = Job(request=HttpRequest(path="/v1"), id="mine")
    assert job.with_id() is job
    first, second = Job(request=HttpRequest(path="/v1")).with_id(), Job(request=HttpRequest(path="/v1")).with_id()
    assert first.id and second.id and first.id != second.id and len(first.id) == 32


def test_expiry_is_by_the_deadline_only():
    now = datetime(2026, 1, 1, tzinfo=UTC)
    assert Job(request=HttpRequest(path="/v1")).expired(now) is False
    assert Job(request=HttpRequest(path="/v1"), deadline=now + timedelta(seconds=1)).expired(now) is False
    assert Job(request=HttpRequest(path="/v1"), deadline=now - timedelta(seconds=1)).expired(now) is True


# -- job_size_limit -----------------------------------------------------------------------------

def test_size_limit_is_the_smaller_of_the_config_and_what_fits_in_one_nats_message():
    assert job_size_limit(1000, None) == (1000, "streams.max_job_bytes")
    assert job_size_limit(1000, 1 << 20) == (1000, "streams.max_job_bytes")
    limit, source = job_size_limit(1 << 20, 1 << 20)
    assert limit == (1 << 20) - ASSIGNMENT_OVERHEAD
    assert f"max_payload = {1 << 20} less {ASSIGNMENT_OVERHEAD} bytes" in source
    assert source.endswith(f"; streams.max_job_bytes = {1 << 20}")
    limit, source = job_size_limit(None, 1 << 20)
    assert limit == (1 << 20) - ASSIGNMENT_OVERHEAD and source.endswith("carries the job to a worker")
    assert job_size_limit(None, 100)[0] == 0
    limit, source = job_size_limit(None, None)
    assert limit >= 1 << 62 and source == "streams.max_job_bytes"


def test_the_no_batch_token_is_not_a_batch_name():
    # `_` is what the results subject holds for a job without a batch: a batch of that name got
    # the Results of every unbatched job in `ratefleet results --batch _`
    with pytest.raises(ValidationError, match="reserved"):
        Job.model_validate({"request": {"path": "/x"}, "batch": "_"})
    assert Job.model_validate({"request": {"path": "/x"}, "batch": "_a"}).batch == "_a"
