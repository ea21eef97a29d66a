"""What a worker writes about a job (workers/service.py): the outcome report to the leader
(`_report`: every field of the call, or none), the Result (`_result`: who, where, when,
batch and metadata, also of a job the worker could not validate) and the Result of a final
call (`_call_result`: which error code and message for which answer). Over the recording
fake bus of test_bite_worker; deterministic, no NATS, no HTTP.
"""

from __future__ import annotations

import time
from datetime import UTC, datetime

import pytest
from test_bite_worker import assignment, make_worker

from ratefleet.schemas import ErrorCode, ResponseInfo
from ratefleet.schemas.internal import InFlight
from ratefleet.schemas.outcome import RateLimitInfo
from ratefleet.schemas.ratelimit_scope import RateLimitScope
from ratefleet.workers.executor import CallResult
from ratefleet.workers.service import _batch_and_metadata, _rate_limited_message

pytestmark = pytest.mark.anyio


def call(kind: str = "ok", status: int | None = 200, **fields) -> CallResult:
    values = {"error": None, "retry_after_s": None, "ratelimit": None, "actual_cost": None, "latency_ms": 12.5}
    response = ResponseInfo(status=status, json={"n": 1}) if status is not None else None
    return CallResult(kind=kind, response=response, **{**values, **fields})


# -- the outcome report ----------------------------------------------------------------------


async def test_a_report_carries_every_fact_of_the_call_and_frees_the_slot(monkeypatch):
    worker, nc, finisher = make_worker(monkeypatch)
    a = assignment()
    worker.in_flight[a.id] = InFlight(assignment=a.id, key_id="k1", job_id="j1")
    worker.in_flight["other"] = InFlight(assignment="other", key_id="k1", job_id="j2")
    limits = RateLimitInfo(remaining_requests=0.0, remaining_tokens=120.0, reset_requests_s=1.5)
    await worker._report(a, call("rate_limited", 429, retry_after_s=3.5, ratelimit=limits, actual_cost=7.0,
                                 latency_ms=42.0, provider_code="rate_limit_exceeded",
                                 scope=RateLimitScope(scope="key", reason="no room")), terminal=False)
    [report] = nc.reports()
    assert report.ratelimit == limits
    assert report.model_dump(exclude={"ratelimit"}) == {
        "assignment": a.id, "worker": "w-bite", "key_id": "k1", "job_id": "j1", "kind": "rate_limited",
        "status": 429, "retry_after_s": 3.5, "actual_cost": 7.0, "latency_ms": 42.0,
        "terminal": False, "code": "rate_limit_exceeded", "scope": "key"}
    assert list(worker.in_flight) == ["other"], "the reported assignment still takes a slot"


async def test_a_report_without_a_call_says_none_and_nothing_else(monkeypatch):
    worker, nc, finisher = make_worker(monkeypatch)
    await worker._report(assignment(), None, terminal=True)
    [report] = nc.reports()
    assert (report.kind, report.terminal) == ("none", True)
    assert [report.status, report.retry_after_s, report.ratelimit, report.actual_cost, report.latency_ms,
            report.code, report.scope] == [None] * 7


async def test_a_report_of_a_call_without_an_answer_has_no_status_and_no_scope(monkeypatch):
    worker, nc, finisher = make_worker(monkeypatch)
    await worker._report(assignment(), call("upstream_error", None, error="timeout"), terminal=False)
    [report] = nc.reports()
    assert (report.kind, report.status, report.scope, report.latency_ms) == ("upstream_error", None, None, 12.5)


async def test_a_report_waits_for_the_round_unless_it_must_go_now(monkeypatch):
    worker, nc, finisher = make_worker(monkeypatch)
    published = []

    async def publish(payload):
        published.append(payload)

    worker.reports._publish = publish
    worker.reports._round_open = True  # another report of this loop iteration opened the round
    await worker._report(assignment(job_id="later"), None, terminal=False)
    assert published == [], "a report that may wait was sent on its own"
    await worker._report(assignment(job_id="now"), None, terminal=False, now=True)
    assert len(published) == 1 and b'"later"' in published[0] and b'"now"' in published[0]


# -- the Result ------------------------------------------------------------------------------


async def test_a_result_names_the_job_key_version_pool_worker_and_its_times(monkeypatch):
    worker, nc, finisher = make_worker(monkeypatch)
    a = assignment(attempt=3, batch="b7", metadata={"user": "u1"}).model_copy(
        update={"variant": "split", "submitted_at": time.time() - 2.0, "tier": "vip", "pool": "p"})
    worker.key_versions[a.id] = "k1@2"
    result = worker._result(a, "succeeded", response=ResponseInfo(status=200, json={}), queued_ms=5.0, upstream_ms=9.0)
    assert (result.job_id, result.status, result.tier, result.batch, result.metadata) == (
        "j1", "succeeded", "vip", "b7", {"user": "u1"})
    assert (result.attempts, result.key_id, result.pool, result.worker, result.key_version, result.variant) == (
        3, "k1", "p", "w-bite", "k1@2", "split")
    assert result.response.status == 200 and result.error is None
    assert result.timings.submitted_at == datetime.fromtimestamp(a.submitted_at, UTC)
    assert (result.timings.queued_ms, result.timings.upstream_ms) == (5.0, 9.0)
    assert 2000.0 <= result.timings.total_ms < 60_000.0


async def test_a_result_carries_the_trace_id_of_the_span_that_noted_how_the_job_ended(monkeypatch):
    import ratefleet.workers.service as service
    from ratefleet.schemas import ErrorInfo

    noted = []

    def note_result(status, error):
        noted.append((status, error))
        return "4bf92f3577b34da6a3ce929d0e0e4736"

    monkeypatch.setattr(service, "note_result", note_result)
    worker, nc, finisher = make_worker(monkeypatch)
    error = ErrorInfo(code="deadline_exceeded", message="late")
    result = worker._result(assignment(), "expired", error=error)
    assert noted == [("expired", error)] and result.trace_id == "4bf92f3577b34da6a3ce929d0e0e4736"


async def test_a_result_of_a_job_submitted_in_the_future_has_no_negative_total(monkeypatch):
    worker, nc, finisher = make_worker(monkeypatch)
    a = assignment().model_copy(update={"submitted_at": time.time() + 60})  # a producer's clock ahead
    result = worker._result(a, "expired")
    assert result.timings.total_ms == 0.0 and result.key_version is None


@pytest.mark.parametrize("raw, expected", [
    ({"batch": "b1", "metadata": {"m": 1}}, ("b1", {"m": 1})),
    ({"batch": 5, "metadata": {"m": 1}}, (None, {"m": 1})),  # not a batch name
    ({"batch": "b2"}, ("b2", {})),
    ({"metadata": None}, (None, {})),
])
def test_batch_and_metadata_of_a_job_the_worker_cannot_validate_come_from_its_raw_json(raw, expected):
    a = assignment(not_a_field=1, **raw)  # refused by the job schema
    assert _batch_and_metadata(a) == expected


def test_batch_and_metadata_of_a_valid_job():
    assert _batch_and_metadata(assignment(batch="b3", metadata={"k": "v"})) == ("b3", {"k": "v"})
    assert _batch_and_metadata(assignment()) == (None, {})


# -- the Result of a final call --------------------------------------------------------------


@pytest.mark.parametrize("the_call, denial_final, status, code, message", [
    (call("ok", 200), True, "succeeded", None, None),
    (call("bad_request", 413, code=ErrorCode.RESPONSE_TOO_LARGE, error="the answer is larger than 10 bytes"), True,
     "failed", "response_too_large", "the answer is larger than 10 bytes"),
    (call("ok", 200, code=ErrorCode.RESPONSE_TOO_LARGE, error="too big"), True, "failed", "response_too_large",
     "too big"),
    (call("upstream_error", 503), True, "failed", "attempts_exhausted", "gave up after 4 attempts; last: HTTP 503"),
    (call("upstream_error", None, error="ReadTimeout"), True, "failed", "attempts_exhausted",
     "gave up after 4 attempts; last: ReadTimeout"),
    (call("key_error", 401), True, "failed", "attempts_exhausted", "gave up after 4 attempts; last: HTTP 401"),
    (call("denied", 403), False, "failed", "attempts_exhausted", "gave up after 4 attempts; last: HTTP 403"),
    (call("bad_request", 422), True, "failed", "upstream_error",
     "the upstream refused the request with HTTP 422; not retried"),
])
async def test_the_result_of_a_final_call(monkeypatch, the_call, denial_final, status, code, message):
    worker, nc, finisher = make_worker(monkeypatch)
    a = assignment(attempt=4).model_copy(update={"denial_final": denial_final})
    result = worker._call_result(a, the_call, 3.0)
    assert result.status == status
    assert (result.error.code if result.error else None, result.error.message if result.error else None) == (
        code, message)
    assert result.response == the_call.response
    assert (result.timings.queued_ms, result.timings.upstream_ms, result.attempts) == (3.0, 12.5, 4)


async def test_the_result_of_a_final_429_says_how_many_it_got(monkeypatch):
    worker, nc, finisher = make_worker(monkeypatch)
    a = assignment().model_copy(update={"rate_limited": 9, "max_rate_limited": 10})
    result = worker._call_result(a, call("rate_limited", 429), 0.0)
    assert (result.status, result.error.code, result.response.status) == ("failed", "rate_limited", 429)
    assert result.error.message.startswith("answered 429 10 times (max_rate_limited = 10); the last one, on key k1, ")



@pytest.mark.parametrize("scope, says", [
    (None, "gave no rate-limit headers or error detail saying whether the key was out of room or the provider "
           "refused this request; it was counted against the key"),
    (RateLimitScope(scope="request", reason="8000 tokens asked, 6000 left"),
     "was about this request, not the key: 8000 tokens asked, 6000 left; the key kept serving other jobs, so the "
     "provider refuses this request itself (check its size and model)"),
    (RateLimitScope(scope="key", reason="0 requests left"),
     "said the key was out of room: 0 requests left; the keys stayed busy for as long as it waited"),
])
def test_the_message_of_a_job_ended_rate_limited_says_what_the_last_429_said(scope, says):
    a = assignment().model_copy(update={"rate_limited": 4, "max_rate_limited": 5})
    assert _rate_limited_message(a, call("rate_limited", 429, scope=scope)) == (
        "answered 429 5 times (max_rate_limited = 5); the last one, on key k1, " + says)
