"""Worker rules around a job's end (workers/service.py), over the recording fake bus of
test_bite_worker: a request refused on a second key ends `request_denied` naming the status, the
provider's code and the key; an assignment pairing a key with another upstream is sent back as
not ended (a nak, never a call) and logged with what an operator needs; a leader's announce
marks the worker ready and can unfence a lower epoch. Deterministic, no NATS, no HTTP.
"""

from __future__ import annotations

import time
from types import SimpleNamespace

import pytest
from structlog.testing import capture_logs
from test_bite_worker import ACK, assignment, make_worker

from ratefleet.schemas import ResponseInfo
from ratefleet.schemas.internal import LeaderAnnounce
from ratefleet.workers.executor import CallResult

pytestmark = pytest.mark.anyio


class Denying:
    """An executor whose every call is answered 403 (with `code`, the provider's error code)."""

    def __init__(self, code: str | None):
        self.code, self.calls = code, 0

    async def call(self, job, upstream, secret) -> CallResult:
        self.calls += 1
        return CallResult(kind="denied", response=ResponseInfo(status=403, json={}), error=None, retry_after_s=None,
                          ratelimit=None, actual_cost=None, latency_ms=5.0, provider_code=self.code)


@pytest.mark.parametrize("code, says", [("model_not_found", "HTTP 403 (model_not_found) on key k1 after"),
                                        (None, "HTTP 403 on key k1 after")])
async def test_a_request_denied_on_a_second_key_names_status_code_and_key(monkeypatch, code, says):
    worker, nc, finisher = make_worker(monkeypatch)
    await worker._run_assignment(assignment(), Denying(code))  # denial_final: True by default
    [result] = finisher.finished
    assert (result.status, result.error.code) == ("failed", "request_denied")
    assert says in result.error.message and "not retried" in result.error.message
    assert [(r.kind, r.terminal, r.code) for r in nc.reports()] == [("denied", True, code)]


def mispaired(worker):
    """An assignment sending key k1 (pool p, upstream u) to upstream `v`, which the worker knows."""
    from ratefleet.schemas.config import parse_config

    worker.config = parse_config({"upstreams": {"u": {"base_url": "https://api.example.test"},
                                                "v": {"base_url": "https://other.example.test"}},
                                  "pools": {"p": {"upstream": "u",
                                                  "keys": [{"id": "k1", "secret": "env:RF_BITE_K1", "rps": 10}]}}})
    a = assignment()
    return a.model_copy(update={"upstream": "v", "job": {**a.job, "upstream": "v"}})


async def test_a_mispaired_assignment_is_sent_back_not_ended_and_logged(monkeypatch):
    worker, nc, finisher = make_worker(monkeypatch)
    executor = Denying(None)
    a = mispaired(worker)
    with capture_logs() as logs:
        await worker._run_assignment(a, executor)
    assert executor.calls == 0 and finisher.finished == [] and finisher.log == [("nak", ACK, 1.0)]
    assert [(r.kind, r.terminal) for r in nc.reports()] == [("none", False)]
    [line] = [entry for entry in logs if entry["log_level"] == "error"]
    assert "assignment refused" in line["event"] and "key 'k1'" in line["problem"]
    assert (line["upstream"], line["assignment"]) == ("v", a.id)


async def test_a_failed_nak_of_a_mispaired_assignment_is_a_warning(monkeypatch):
    worker, nc, finisher = make_worker(monkeypatch)

    async def nak(ack, delay_s=0.0):
        raise ConnectionError("away")

    finisher.nak = nak
    with capture_logs() as logs:
        await worker._run_assignment(mispaired(worker), Denying(None))
    [line] = [entry for entry in logs if entry["log_level"] == "warning"]
    assert line["event"] == "nak failed; the job returns after ack_wait" and line["error"] == "ConnectionError"
    assert [(r.kind, r.terminal) for r in nc.reports()] == [("none", False)]


async def test_an_announce_makes_the_worker_ready_and_can_unfence_a_lower_epoch(monkeypatch):
    worker, nc, finisher = make_worker(monkeypatch)
    assert await worker.not_ready() == "no leader heard yet"
    announce = SimpleNamespace(data=LeaderAnnounce(leader="d1", epoch=(100, 9)).model_dump_json().encode())
    await worker._on_leader(announce)
    assert await worker.not_ready() is None and worker.epoch == (100, 9)
    worker.epoch_seen_at = time.monotonic() - worker.epoch_forget_s - 1  # that leader has gone silent
    await worker._on_leader(SimpleNamespace(data=LeaderAnnounce(leader="d2", epoch=(50, 1)).model_dump_json().encode()))
    assert worker.epoch == (50, 1)


async def test_a_job_that_cannot_be_sent_is_logged_with_its_code_and_reason(monkeypatch):
    worker, nc, finisher = make_worker(monkeypatch)
    with capture_logs() as logs:
        await worker._run_assignment(assignment(not_a_field=1),  # refused by the job schema
                                     Denying(None))
    [result] = finisher.finished
    assert result.status == "invalid"
    [line] = [entry for entry in logs if entry["log_level"] == "warning"]
    assert line["event"] == "job cannot be sent; ended as invalid without a call"
    assert line["code"] == str(result.error.code) and line["reason"] == result.error.message


async def test_a_result_that_cannot_be_stored_sends_the_job_back_and_says_why(monkeypatch):
    worker, nc, finisher = make_worker(monkeypatch)
    a = assignment()
    worker.calling[a.id] = [ACK, time.monotonic()]
    with capture_logs() as logs:
        assert await worker._requeue(a, ConnectionError("x" * 300)) is False
    assert a.id not in worker.calling, "in-progress acks would go on after the nak and postpone the retry"
    assert finisher.log == [("nak", ACK, 1.0)]
    [line] = logs
    assert line["event"] == "could not store the Result; job goes back to the queue" and line["log_level"] == "error"
    assert line["error"] == "ConnectionError" and line["detail"] == "x" * 200


async def test_a_failed_nak_after_a_failed_store_is_not_raised(monkeypatch):
    worker, nc, finisher = make_worker(monkeypatch)

    async def nak(ack, delay_s=0.0):
        raise ConnectionError("away")

    finisher.nak = nak
    assert await worker._requeue(assignment(), ConnectionError("store away")) is False  # ack_wait brings it back
