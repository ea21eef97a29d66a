"""A paid answer NATS will not store (workers/unstored.py): which errors are a refusal (the job
ends) and which mean NATS is away (the job goes back), and the `failed` Result that replaces
it: every body field dropped (any one left would be refused again), status and headers kept,
and a message naming the answer's status, the refusal and what the job had ended as.
Deterministic, no server.
"""

from __future__ import annotations

import nats.errors
import pytest
from nats.js.errors import APIError

from ratefleet.schemas import ErrorInfo, ResponseInfo, Result
from ratefleet.schemas.errors import ResultNotStored
from ratefleet.schemas.result import BodyRef
from ratefleet.workers.unstored import refused, unstorable

FULL = APIError(code=503, description="maximum bytes exceeded", err_code=10077)
REF = BodyRef(bucket="ratefleet_bodies", name="j1", size=3, sha256="ab" * 32, encoding="text")


@pytest.mark.parametrize("exc, is_refusal", [
    (FULL, True),
    (ResultNotStored("refused 4 times"), True),
    (APIError(code=503, description="no responders"), False),  # no server error code: not a refusal
    (nats.errors.TimeoutError(), False),
    (ConnectionError("away"), False),
])
def test_a_refusal_is_told_apart_from_nats_being_away(exc, is_refusal):
    assert refused(exc) is is_refusal


@pytest.mark.parametrize("body", [
    {"json": {"answer": 42}}, {"body": "text"}, {"body_b64": "AAEC"}, {"body_ref": REF},
], ids=["json", "body", "body_b64", "body_ref"])
def test_every_body_field_is_dropped_and_status_and_headers_kept(body):
    response = ResponseInfo(status=200, headers={"x-request-id": "r1"}, **body)
    ended = unstorable(Result(job_id="j1", status="succeeded", response=response, attempts=2), FULL)
    assert ended.response.model_dump(by_alias=True) == {"status": 200, "headers": {"x-request-id": "r1"}, "json": None,
                                                         "body": None, "body_b64": None, "body_ref": None}
    assert (ended.status, ended.error.code, ended.attempts, ended.job_id) == ("failed", "result_not_stored", 2, "j1")
    assert response.model_dump(exclude_none=True, by_alias=True) != ended.response.model_dump(exclude_none=True,
                                                                                            by_alias=True)


def test_the_message_names_the_answer_the_refusal_and_the_earlier_outcome():
    response = ResponseInfo(status=503, body="busy")
    earlier = ErrorInfo(code="attempts_exhausted", message="gave up")
    ended = unstorable(Result(job_id="j1", status="failed", response=response, error=earlier), FULL)
    message = ended.error.message
    assert "(HTTP 503)" in message and "APIError" in message and "maximum bytes exceeded" in message
    assert "; it had ended failed (attempts_exhausted);" in message
    assert "Object Store" in message  # where to look


def test_a_result_without_an_answer_or_an_error():
    ended = unstorable(Result(job_id="j1", status="succeeded"), ResultNotStored("x" * 300))
    assert ended.response is None and ended.error.code == "result_not_stored"
    message = ended.error.message
    assert "(no answer)" in message and "; it had ended succeeded;" in message
    assert "ResultNotStored: " + "x" * 200 + ")" in message  # the refusal's text, cut at 200 characters
