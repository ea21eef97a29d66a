"""The Result, the outcome vocabulary and the error tree of the public contract
(schemas/result.py, outcome.py, errors.py): the JSON a consumer reads (field names, times,
text that cannot be UTF-8), which outcomes are retried, and what an error carries.
Deterministic, no server."""

from __future__ import annotations

import json
from datetime import UTC, datetime

import pytest

from ratefleet.schemas.errors import JobRejected, RatefleetError, SecretUnavailable
from ratefleet.schemas.outcome import OutcomeKind, is_retryable
from ratefleet.schemas.result import ErrorCode, ErrorInfo, ResponseInfo, Result, Timings

SUBMITTED = datetime(2026, 11, 30, 3, 4, 5, 678000, tzinfo=UTC)


@pytest.mark.parametrize("status, ok", [("succeeded", True), ("failed", False), ("expired", False),
                                        ("invalid", False)])
def test_only_a_succeeded_result_is_ok(status, ok):
    assert Result(job_id="j1", status=status).ok is ok


def _result(body: str) -> Result:
    return Result(job_id="j1", status="succeeded", tier="vip", attempts=2, key_id="k1",
                  response=ResponseInfo(status=200, headers={"content-type": "application/json"},
                                        json={"answer": body}),
                  timings=Timings(submitted_at=SUBMITTED, total_ms=12.5), metadata={"m": body})


@pytest.mark.parametrize("body", ["plain ünïcode", "a lone surrogate \ud800 in the answer"],
                         ids=["utf8", "lone-surrogate"])
def test_result_json_names_the_body_json_and_writes_times_as_rfc3339(body):
    raw = _result(body).to_json()
    assert isinstance(raw, bytes)
    data = json.loads(raw.decode("utf-8"))  # strict UTF-8, whatever the answer held
    assert "json" in data["response"] and "json_body" not in data["response"]
    assert data["response"]["json"]["answer"].startswith(body[:10])
    assert data["timings"]["submitted_at"].startswith("2026-11-30T03:04:05.678")
    assert data["attempts"] == 2 and data["key_id"] == "k1" and data["tier"] == "vip"
    back = Result.from_json(raw)
    assert back.timings.submitted_at == SUBMITTED
    assert back.response is not None and back.response.status == 200
    assert back.ok and back.job_id == "j1"


def test_a_lone_surrogate_is_written_escaped_not_dropped():
    data = json.loads(_result("x\udc80y").to_json())
    assert data["response"]["json"]["answer"] == "x\\udc80y"
    assert data["metadata"]["m"] == "x\\udc80y"


def test_result_reads_back_from_text_and_bytes():
    raw = Result(job_id="j2", status="failed",
                 error=ErrorInfo(code=ErrorCode.UPSTREAM_ERROR, message="503")).to_json()
    for form in (raw, raw.decode()):
        back = Result.from_json(form)
        assert back.status == "failed" and back.error is not None
        assert back.error.code is ErrorCode.UPSTREAM_ERROR and json.loads(raw)["error"]["code"] == "upstream_error"


# -- outcomes ----------------------------------------------------------------------------------

def test_the_former_name_lost_reads_as_none_and_nothing_else_does():
    assert OutcomeKind("lost") is OutcomeKind.NONE
    assert OutcomeKind("none") is OutcomeKind.NONE
    for wrong in ("LOST", "lost ", "", "XXlostXX", None):
        with pytest.raises(ValueError):
            OutcomeKind(wrong)


@pytest.mark.parametrize("kind, denial_final, retried", [
    (OutcomeKind.OK, False, False), (OutcomeKind.BAD_REQUEST, False, False), (OutcomeKind.NONE, False, False),
    (OutcomeKind.RATE_LIMITED, False, True), (OutcomeKind.UPSTREAM_ERROR, False, True),
    (OutcomeKind.KEY_ERROR, False, True), (OutcomeKind.KEY_ERROR, True, True),
    (OutcomeKind.DENIED, False, True), (OutcomeKind.DENIED, True, False),
    ("denied", False, True), ("denied", True, False), ("rate_limited", True, True), ("ok", True, False),
])
def test_which_outcomes_send_the_job_back(kind, denial_final, retried):
    assert is_retryable(kind, denial_final=denial_final) is retried


def test_a_denial_is_final_unless_told_otherwise_only_by_the_flag():
    assert is_retryable(OutcomeKind.DENIED) is True  # the default: tried on another key


# -- errors ------------------------------------------------------------------------------------

def test_job_rejected_carries_its_code_message_and_ids():
    exc = JobRejected(ErrorCode.FORBIDDEN_TARGET, "path leaves the upstream", job_id="j9", batch="b1")
    assert isinstance(exc, RatefleetError)
    assert str(exc) == "path leaves the upstream" and exc.message == "path leaves the upstream"
    assert exc.code is ErrorCode.FORBIDDEN_TARGET and exc.job_id == "j9" and exc.batch == "b1"
    bare = JobRejected(ErrorCode.INVALID_JOB, "not JSON")
    assert bare.job_id is None and bare.batch is None and bare.args == ("not JSON",)


def test_secret_unavailable_has_a_short_reason_defaulting_to_its_message():
    exc = SecretUnavailable("key k1: the variable LOCAL_KEY_1 is not set", reason="LOCAL_KEY_1 not set")
    assert str(exc) == "key k1: the variable LOCAL_KEY_1 is not set" and exc.reason == "LOCAL_KEY_1 not set"
    plain = SecretUnavailable("LOCAL_KEY_2 not set")
    assert plain.reason == "LOCAL_KEY_2 not set" and str(plain) == "LOCAL_KEY_2 not set"
    assert SecretUnavailable("msg", reason="").reason == "msg"
