"""A job refused by its key goes back to the queue only after the leader was told: the
outcome report is published before the nak, for key-scoped answers (key_error) as for
plain 401/403 (denied), so the redelivered job cannot reach the refused key again. Over
httpx.MockTransport and a recording NATS/finisher that share one event log."""

from __future__ import annotations

import time

import httpx
import pytest

from ratefleet.schemas.config import parse_config
from ratefleet.schemas.internal import Assignment, OutcomeReport
from ratefleet.workers.executor import UpstreamExecutor
from ratefleet.workers.service import Worker

pytestmark = pytest.mark.anyio

GEMINI_BAD_KEY = {"error": {"code": 400, "message": "API key not valid. Please pass a valid API key.",
                            "status": "INVALID_ARGUMENT",
                            "details": [{"@type": "type.googleapis.com/google.rpc.ErrorInfo",
                                         "reason": "API_KEY_INVALID", "domain": "googleapis.com"}]}}
OPENROUTER_CREDITS = {"error": {"code": 402,
                                "message": "Insufficient credits. Add more using https://openrouter.ai/credits"}}
ANTHROPIC_CREDIT = {"type": "error", "error": {
    "type": "invalid_request_error", "message": "Your credit balance is too low to access the Anthropic API."}}


class Recorder:
    """Fake NATS connection and finisher writing to one ordered log."""

    def __init__(self) -> None:
        self.log: list[tuple[str, object]] = []

    def jetstream(self):
        return object()

    async def publish(self, subject: str, payload: bytes) -> None:
        if subject.endswith("internal.outcome"):
            self.log.append(("report", OutcomeReport.model_validate_json(payload)))

    async def nak(self, ack, delay_s=0.0):
        self.log.append(("nak", delay_s))

    async def finish(self, result, *, ack, reply_to, then=None, before_answer=None):
        self.log.append(("finish", result))
        if then is not None:
            await then()
        return True

    async def dead(self, tier, result, **kw):
        self.log.append(("dead", result))


def run_with(monkeypatch, status: int, body: dict) -> tuple[Recorder, Worker, UpstreamExecutor, Assignment]:
    monkeypatch.setenv("RF_UNIT_K1", "sk-unit-0000000000")
    config = parse_config({"upstreams": {"u": {"base_url": "https://api.example.test"}},
                           "pools": {"p": {"keys": [{"id": "k1", "secret": "env:RF_UNIT_K1", "rps": 10}]}}})
    recorder = Recorder()
    worker = Worker(config, recorder, worker_id="w-unit")
    worker.finisher = recorder
    executor = UpstreamExecutor(httpx.AsyncClient(transport=httpx.MockTransport(
        lambda r: httpx.Response(status, json=body))))
    job = {"id": "j1", "request": {"method": "POST", "path": "/v1/x", "json": {}}}
    a = Assignment(id="a1", job=job, job_id="j1", tier="normal", upstream="u", key_id="k1", pool="p",
                   ack="$JS.ACK.x", attempt=1, max_attempts=5, submitted_at=time.time(), queued_ms=0.0,
                   denial_final=False)
    return recorder, worker, executor, a


@pytest.mark.parametrize("status, body, kind, code", [
    (401, {"error": {"code": "invalid_api_key", "type": "invalid_request_error"}}, "key_error", "invalid_api_key"),
    (400, GEMINI_BAD_KEY, "key_error", "API_KEY_INVALID"),
    (402, OPENROUTER_CREDITS, "key_error", "payment_required"),
    (400, ANTHROPIC_CREDIT, "key_error", "credit_balance_too_low"),
    (401, {"error": {"message": "Unauthorized"}}, "denied", None),
])
async def test_the_refusal_is_reported_before_the_job_goes_back(monkeypatch, status, body, kind, code):
    recorder, worker, executor, a = run_with(monkeypatch, status, body)
    await worker._run_assignment(a, executor)
    assert [event for event, _ in recorder.log] == ["report", "nak"], recorder.log
    report = recorder.log[0][1]
    assert (report.kind, report.code, report.key_id, report.terminal) == (kind, code, "k1", False)
    assert recorder.log[1][1] == 0.0  # straight back, to another key
    assert worker.in_flight == {}
