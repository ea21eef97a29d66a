"""The worker's side of request-scoped 429s, over httpx.MockTransport and a recording
finisher: a 429 saying the request exceeds the whole limit ends the job `request_too_large`
after that one call (reported as a bad request, the job's fault, so the key is left alone), and a job
that used up its 429 budget is told what its last 429 said."""

from __future__ import annotations

import time

import httpx
import pytest

from ratefleet.schemas.config import parse_config
from ratefleet.schemas.internal import Assignment, OutcomeReport
from ratefleet.workers.executor import UpstreamExecutor
from ratefleet.workers.service import Worker

pytestmark = pytest.mark.anyio
SECRET = "sk-test-SECRET-123456"
TOO_LARGE = {"error": {
    "message": "Request too large for gpt-4o in organization org-x on tokens per min (TPM): Limit 30000, "
               "Requested 50000. The input or output tokens must be reduced in order to run successfully.",
    "type": "tokens", "param": None, "code": "rate_limit_exceeded"}}
PLAIN = {"error": {"message": "Rate limit exceeded.", "type": "requests", "code": "rate_limit_exceeded"}}


class FakeNats:
    def __init__(self):
        self.published: list[tuple[str, bytes]] = []

    def jetstream(self):
        return object()

    async def publish(self, subject: str, payload: bytes) -> None:
        self.published.append((subject, payload))

    def reports(self) -> list[OutcomeReport]:
        return [OutcomeReport.model_validate_json(p) for s, p in self.published if s.endswith("internal.outcome")]


class RecordingFinisher:
    def __init__(self):
        self.finished, self.dead_letters, self.naks = [], [], []

    async def finish(self, result, *, ack, reply_to, then=None, before_answer=None):
        self.finished.append(result)
        if then is not None:
            await then()
        return True

    async def dead(self, tier, result, *, job=None, raw=None, last_error=None):
        self.dead_letters.append(result.error.code)

    async def nak(self, ack, delay_s=0.0):
        self.naks.append((ack, delay_s))


def make_worker(monkeypatch) -> tuple[Worker, FakeNats, RecordingFinisher]:
    monkeypatch.setenv("RF_UNIT_K1", SECRET)
    config = parse_config({"upstreams": {"u": {"base_url": "https://api.example.test"}},
                           "pools": {"p": {"keys": [{"id": "k1", "secret": "env:RF_UNIT_K1", "rps": 10}]}}})
    nc, finisher = FakeNats(), RecordingFinisher()
    worker = Worker(config, nc, worker_id="w-unit")
    worker.finisher = finisher
    return worker, nc, finisher


def assignment(rate_limited: int = 0) -> Assignment:
    job = {"id": "j1", "request": {"method": "POST", "path": "/v1/chat/completions", "json": {"model": "gpt-4o"}}}
    return Assignment(id="a1", job=job, job_id="j1", tier="normal", upstream="u", key_id="k1", pool="p",
                      ack="$JS.ACK.x", attempt=1, max_attempts=5, submitted_at=time.time(), queued_ms=0.0,
                      rate_limited=rate_limited, max_rate_limited=50)


def answering(status: int, body: dict, headers: dict[str, str], calls: list) -> UpstreamExecutor:
    return UpstreamExecutor(httpx.AsyncClient(transport=httpx.MockTransport(
        lambda r: calls.append(r) or httpx.Response(status, json=body, headers=headers))))


async def test_a_request_larger_than_the_whole_limit_ends_after_one_call(monkeypatch):
    worker, nc, finisher = make_worker(monkeypatch)
    calls: list = []
    room = {"x-ratelimit-remaining-requests": "4", "retry-after": "0"}
    await worker._run_assignment(assignment(), answering(429, TOO_LARGE, room, calls))
    assert len(calls) == 1 and finisher.naks == [], "a request that can never fit was sent back"
    [result] = finisher.finished
    assert (result.status, result.error.code, result.attempts) == ("failed", "request_too_large", 1)
    assert "50000" in result.error.message and "30000" in result.error.message, result.error.message
    assert result.response.status == 429
    [report] = nc.reports()
    assert (report.kind, report.scope, report.terminal) == ("bad_request", "request", True)


@pytest.mark.parametrize("headers, scope, says", [
    ({"x-ratelimit-remaining-requests": "4"}, "request", "was about this request, not the key"),
    ({"x-ratelimit-remaining-requests": "0"}, "key", "said the key was out of room"),
    ({}, None, "gave no rate-limit headers or error detail"),
])
async def test_the_last_429_of_the_budget_says_what_it_was(monkeypatch, headers, scope, says):
    worker, nc, finisher = make_worker(monkeypatch)
    await worker._run_assignment(assignment(rate_limited=49), answering(429, PLAIN, headers, []))
    [result] = finisher.finished
    assert (result.status, result.error.code) == ("failed", "rate_limited")
    assert says in result.error.message and "never had room" not in result.error.message, result.error.message
    assert "answered 429 50 times" in result.error.message
    [report] = nc.reports()
    assert (report.kind, report.scope) == ("rate_limited", scope)
