"""The leader/worker wire messages (schemas/internal.py): an assignment's job as the worker
reads it (validated once, and as the JSON a dead letter keeps), and the batch forms of
assignment and outcome messages. Deterministic, no server."""

from __future__ import annotations

import json

import pytest
from pydantic import ValidationError

from ratefleet.schemas.internal import Assignment, OutcomeReport, batch_payload, read_assignments, read_reports
from ratefleet.schemas.job import Job

JOB = {"id": "j1", "batch": "b1", "deadline": "2030-01-02T03:04:05Z",
       "request": {"method": "POST", "path": "/v1/chat", "json": {"q": 1}}, "metadata": {"m": 1}}


def assignment(**fields) -> Assignment:
    base = dict(id="a1", job_id="j1", tier="normal", upstream="u", key_id="k1", pool="p", ack="$JS.ACK.1",
                attempt=1, max_attempts=5, submitted_at=1.0, queued_ms=0.0)
    return Assignment(**{**base, **fields})


def report(n: int, **fields) -> dict:
    return {"assignment": f"a{n}", "worker": "w1", "key_id": "k1", "job_id": f"j{n}", "kind": "ok", **fields}


def test_the_job_is_validated_from_its_text_or_from_the_object_and_remembered():
    from_text = assignment(job_json=json.dumps(JOB))
    job = from_text.job_model()
    assert isinstance(job, Job) and job.request.json_body == {"q": 1} and job.batch == "b1"
    assert from_text.job_model() is job
    from_object = assignment(job=JOB)
    assert from_object.job_model().request.path == "/v1/chat"
    with pytest.raises(ValidationError):
        assignment(job_json='{"request": {"path": ""}}').job_model()


def test_a_validated_job_is_kept_in_a_dead_letter_as_the_job_a_producer_sent():
    a = assignment(job_json=json.dumps(JOB))
    a.job_model()
    data = a.job_data()
    assert data == {**JOB, "request": {**JOB["request"], "headers": {}, "query": {}}}
    assert json.dumps(data)  # plain JSON: the deadline as RFC 3339 text
    assert Job.model_validate(data).deadline == a.job_model().deadline  # resubmittable as it is


@pytest.mark.parametrize("job_json, data", [
    ('{"id": "j1", "request": 5}', {"id": "j1", "request": 5}),  # JSON, but not a valid job
    ("[1, 2]", {}), ('"text"', {}), ("{not json", {}), ("[" * 100_000, {}),  # not an object
])
def test_an_invalid_job_is_kept_as_its_raw_json_object_or_as_nothing(job_json, data):
    assert assignment(job_json=job_json).job_data() == data


def test_an_older_dispatchers_job_object_is_kept_as_it_came():
    assert assignment(job={"request": 5}).job_data() == {"request": 5}
    assert assignment().job_data() == {}


def test_batches_of_one_are_bare_and_readers_take_leading_whitespace():
    one = json.dumps(report(1)).encode()
    assert batch_payload([one]) == one
    assert batch_payload([one, one]) == b"[" + one + b"," + one + b"]"
    assert [r.job_id for r in read_reports(b"  \n" + batch_payload([one, json.dumps(report(2)).encode()]))] == [
        "j1", "j2"]
    [r] = read_reports(b" " + one)
    assert r.job_id == "j1"


def test_a_batch_keeps_its_good_entries_in_order_and_refuses_when_none_is_good():
    data = json.dumps([report(1), {"worker": "w1"}, report(3, kind="bogus"), report(4), 7]).encode()
    assert [r.job_id for r in read_reports(data)] == ["j1", "j4"]
    good = assignment(job_json="{}").model_dump(mode="json")
    assert [a.id for a in read_assignments(json.dumps([{"id": "x"}, good]).encode())] == ["a1"]
    with pytest.raises(ValueError, match="no readable entry"):
        read_reports(json.dumps([{"worker": "w1"}, 7]).encode())
    assert read_reports(b"[]") == []  # an empty batch holds nothing to act on


def test_a_report_reads_its_kind_ratelimit_and_scope():
    [r] = read_reports(json.dumps(report(1, kind="rate_limited", status=429, scope="request",
                                         ratelimit={"remaining_requests": 0, "future_field": 1})).encode())
    assert r.kind == "rate_limited" and r.scope == "request" and r.ratelimit is not None
    assert r.ratelimit.remaining_requests == 0 and r.terminal is True
    assert OutcomeReport.model_validate(report(2)).kind == "ok"
