"""Every failure between assignment and stored Result has a class (the worker side): the
job's own fault ends `invalid` with no call, one attempt and a dead letter naming the error;
NATS failing to store the Result sends the job back (retried) and reports the call that was
made. Over httpx.MockTransport and a recording finisher: no NATS needed for the decisions."""

from __future__ import annotations

import json
import time

import httpx
import nats.errors
import pytest

from ratefleet.schemas.config import parse_config
from ratefleet.schemas.internal import Assignment, OutcomeReport
from ratefleet.workers.executor import UpstreamExecutor
from ratefleet.workers.service import Worker

pytestmark = pytest.mark.anyio
SECRET = "sk-test-SECRET-123456"


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
    def __init__(self, fail_store: Exception | None = None):
        self.fail_store = fail_store
        self.finished, self.dead_letters, self.naks = [], [], []

    async def finish(self, result, *, ack, reply_to, then=None, before_answer=None):
        if self.fail_store is not None:
            raise self.fail_store
        self.finished.append(result)
        if then is not None:
            await then()
        return True

    async def dead(self, tier, result, *, job=None, raw=None, last_error=None):
        self.dead_letters.append({"code": result.error.code, "last_error": last_error, "job": job})

    async def nak(self, ack, delay_s=0.0):
        self.naks.append((ack, delay_s))


def make_worker(monkeypatch, finisher: RecordingFinisher, auth_header: str = "Authorization") -> tuple[Worker, FakeNats]:
    monkeypatch.setenv("RF_UNIT_K1", SECRET)
    config = parse_config({"upstreams": {"u": {"base_url": "https://api.example.test", "auth_header": auth_header}},
                           "pools": {"p": {"keys": [{"id": "k1", "secret": "env:RF_UNIT_K1", "rps": 10}]}}})
    nc = FakeNats()
    worker = Worker(config, nc, worker_id="w-unit")
    worker.finisher = finisher
    return worker, nc


def assignment(**request) -> Assignment:
    job = {"id": "j1", "request": {"method": "POST", "path": "/v1/x", **request}}
    return Assignment(id="a1", job=job, job_id="j1", tier="normal", upstream="u", key_id="k1", pool="p",
                      ack="$JS.ACK.x", attempt=1, max_attempts=5, submitted_at=time.time(), queued_ms=0.0)


def counting_executor(calls: list) -> UpstreamExecutor:
    return UpstreamExecutor(httpx.AsyncClient(transport=httpx.MockTransport(
        lambda r: calls.append(r) or httpx.Response(200, json={"ok": True}))))


@pytest.mark.parametrize("auth_header, request_fields, code, why", [
    ("Authorization", {"headers": {"X-Title": "Café – 日本語"}}, "invalid_job", "U+2013"),
    ("Authorization", {"headers": {"Authorization:": "Bearer sk-caller-0000000"}}, "invalid_job", "set by ratefleet"),
    ("X-Custom-Auth", {"headers": {"x-custom-auth": "mine"}}, "invalid_request", "set by ratefleet"),
])
async def test_the_jobs_own_fault_ends_invalid_with_no_call_no_attempt_and_a_dead_letter(
        monkeypatch, auth_header, request_fields, code, why):
    finisher = RecordingFinisher()
    worker, nc = make_worker(monkeypatch, finisher, auth_header)
    calls: list = []
    await worker._run_assignment(assignment(**request_fields), counting_executor(calls))
    assert calls == [], "the upstream was called"
    [result] = finisher.finished
    assert (result.status, result.error.code, result.attempts) == ("invalid", code, 0)  # its only delivery, no call: no attempt
    assert why in result.error.message and SECRET not in result.error.message
    [letter] = finisher.dead_letters
    assert letter["code"] == code and letter["last_error"]["code"] == code and why in letter["last_error"]["message"]
    assert finisher.naks == [], "a job at fault was sent back to be tried again"
    [report] = nc.reports()
    assert (report.kind, report.terminal) == ("none", True)


async def test_a_result_nats_cannot_store_sends_the_job_back_and_reports_the_call_made(monkeypatch):
    finisher = RecordingFinisher(fail_store=nats.errors.ConnectionClosedError())
    worker, nc = make_worker(monkeypatch, finisher)
    calls: list = []
    await worker._run_assignment(assignment(json={"m": 1}), counting_executor(calls))
    assert len(calls) == 1 and json.loads(calls[0].content) == {"m": 1}
    assert finisher.naks == [("$JS.ACK.x", 1.0)], "the job was not sent back to be retried"
    assert finisher.dead_letters == []
    [report] = nc.reports()
    assert (report.kind, report.terminal) == ("ok", False), "the key's call was reported as no call"
    assert worker.in_flight == {}
