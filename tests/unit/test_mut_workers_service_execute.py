"""How a worker runs one assignment (workers/service.py `_take`, `_execute`, `_call`,
`_run_traced`): what it does while the call runs (in-progress acks, the key version, the
calls count, the metrics), a secret it cannot use, an expired job, a request the executor
refuses, a streamed job's chunk relay and a call cut short at shutdown (a fault of the worker
itself and taking assignments: test_mut_workers_service_take.py). Over the recording fake
bus, finisher and executors of test_bite_worker; deterministic, no NATS, no HTTP.
"""

from __future__ import annotations

import time

import anyio
import pytest
from prometheus_client import CollectorRegistry
from structlog.testing import capture_logs
from test_bite_worker import ACK, FakeExecutor, RecordingFinisher, assignment, deadline, make_worker
from test_mut_workers_service_conclude import Books
from test_mut_workers_service_result import call

from ratefleet.runtime.metrics import new_registry
from ratefleet.schemas.errors import InvalidRequest
from ratefleet.schemas.internal import Heartbeat
from ratefleet.workers.metrics import WorkerMetrics

pytestmark = pytest.mark.anyio
TRACEPARENT = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"


class ReplyFinisher(RecordingFinisher):
    """Also records the reply subject each Result is sent to."""

    def __init__(self):
        super().__init__()
        self.replies = []

    async def finish(self, result, *, ack, reply_to, then=None, before_answer=None):
        self.replies.append(reply_to)
        return await super().finish(result, ack=ack, reply_to=reply_to, then=then)


class Watching:
    """An executor that records what the worker holds while the call runs."""

    def __init__(self, worker, answer=None):
        self.worker, self.answer, self.seen, self.relays = worker, answer or call("ok", 200, latency_ms=250.0), [], []
        self.jobs, self.on_answers = [], []

    async def call(self, job, upstream, secret, relay=None, on_answer=None):
        a_id = next(iter(self.worker.calling))
        self.seen.append((self.worker.calling[a_id][0], self.worker.key_versions.get(a_id), secret,
                          str(upstream.base_url), a_id in self.worker._cancel_scopes))
        self.jobs.append(job.id)
        self.relays.append(relay)
        self.on_answers.append(on_answer)
        return self.answer


def measured(worker) -> CollectorRegistry:
    """Give the worker metrics in a registry of their own, returned."""
    registry = new_registry()
    worker.metrics = WorkerMetrics(registry, lambda: (worker.slots, len(worker.in_flight)))
    return registry


# -- while the call runs ---------------------------------------------------------------------


async def test_while_the_call_runs_the_worker_keeps_it_alive_and_knows_its_key_version(monkeypatch):
    worker, nc, finisher = make_worker(monkeypatch)
    executor = Watching(worker)
    a = assignment()
    await worker._run_assignment(a, executor)
    [(ack, version, secret, base_url, cancellable)] = executor.seen
    assert (ack, version, secret, cancellable) == (ACK, "v1", "sk-bite-0000000000", True)
    assert base_url.startswith("https://api.example.test")
    assert worker.calling == {} and worker.key_versions == {} and worker._cancel_scopes == {}
    [result] = finisher.finished
    assert result.key_version == "v1" and worker.calls == 1


async def test_every_log_line_of_a_job_names_the_job_tier_key_attempt_and_worker(monkeypatch):
    import structlog

    worker, nc, finisher = make_worker(monkeypatch)
    bound = []

    class Looking:
        async def call(self, job, upstream, secret):
            bound.append(structlog.contextvars.get_contextvars())
            return call("ok", 200)

    structlog.contextvars.clear_contextvars()
    await worker._run_assignment(assignment(attempt=2).model_copy(update={"tier": "vip"}), Looking())
    [context] = bound
    assert {k: context.get(k) for k in ("job_id", "tier", "key_id", "attempt", "worker", "key_version")} == {
        "job_id": "j1", "tier": "vip", "key_id": "k1", "attempt": 2, "worker": "w-bite", "key_version": "v1"}
    structlog.contextvars.clear_contextvars()


@pytest.mark.parametrize("trace, expected", [({"traceparent": TRACEPARENT}, {"traceparent": TRACEPARENT}),
                                             (None, {})])
async def test_the_jobs_span_names_the_worker_and_continues_the_jobs_trace(monkeypatch, trace, expected):
    from contextlib import contextmanager

    import ratefleet.workers.service as service

    spans = []

    @contextmanager
    def run_span(a, worker, headers):
        spans.append((a.job_id, worker, headers))
        yield None

    monkeypatch.setattr(service, "run_span", run_span)
    worker, nc, finisher = make_worker(monkeypatch)
    await worker._run_assignment(assignment(), FakeExecutor(), trace)
    assert spans == [("j1", "w-bite", expected)] and len(finisher.finished) == 1


async def test_the_calling_entry_starts_with_the_call_time(monkeypatch):
    worker, nc, finisher = make_worker(monkeypatch)
    stamps = []

    class Stamp:
        async def call(self, job, upstream, secret):
            stamps.append(next(iter(worker.calling.values()))[1])
            return call("ok", 200)

    before = time.monotonic()
    await worker._run_assignment(assignment(), Stamp())
    assert before <= stamps[0] <= time.monotonic(), "the first in-progress ack would come at once or never"


async def test_the_queue_wait_and_the_call_are_measured(monkeypatch):
    worker, nc, finisher = make_worker(monkeypatch)
    sample = measured(worker).get_sample_value
    a = assignment().model_copy(update={"submitted_at": time.time() - 3.0, "variant": "split"})
    await worker._run_assignment(a, Watching(worker, call("upstream_error", 503, latency_ms=250.0)))
    [result] = finisher.finished or [None]
    assert result is None  # attempt 1 of 5: sent back
    assert sample("ratefleet_queue_wait_seconds_count", {"tier": "normal"}) == 1
    assert 3.0 <= sample("ratefleet_queue_wait_seconds_sum", {"tier": "normal"}) < 60
    assert sample("ratefleet_upstream_requests_total", {"key": "k1", "outcome": "upstream_error"}) == 1
    assert sample("ratefleet_upstream_request_duration_seconds_sum", {"upstream": "u"}) == 0.25
    assert sample("ratefleet_split_request_duration_seconds_sum", {"tier": "normal", "variant": "split"}) == 0.25
    assert worker.calls == 1


async def test_the_result_and_the_metrics_carry_the_time_the_job_waited(monkeypatch):
    from types import SimpleNamespace

    import ratefleet.workers.service as service

    worker, nc, finisher = make_worker(monkeypatch)
    sample = measured(worker).get_sample_value
    monkeypatch.setattr(service, "time", SimpleNamespace(time=lambda: 1000.0, monotonic=time.monotonic))
    a = assignment().model_copy(update={"submitted_at": 997.5})
    await worker._run_assignment(a, FakeExecutor())
    [result] = finisher.finished
    assert (result.timings.queued_ms, result.timings.total_ms) == (2500.0, 2500.0)
    assert sample("ratefleet_queue_wait_seconds_sum", {"tier": "normal"}) == 2.5


async def test_every_call_is_counted(monkeypatch):
    worker, nc, finisher = make_worker(monkeypatch)
    for job_id in ("j1", "j2", "j3"):
        await worker._run_assignment(assignment(job_id=job_id), FakeExecutor())
    assert worker.calls == 3
    await worker._send_heartbeat()
    assert [Heartbeat.model_validate_json(p).calls for s, p in nc.published if s.endswith(".heartbeat")] == [3]


async def test_a_job_submitted_in_the_future_waited_no_time(monkeypatch):
    worker, nc, finisher = make_worker(monkeypatch)
    a = assignment().model_copy(update={"submitted_at": time.time() + 60.0})
    await worker._run_assignment(a, FakeExecutor())
    [result] = finisher.finished
    assert result.timings.queued_ms == 0.0


# -- no call ------------------------------------------------------------------------------------


async def test_an_expired_job_is_answered_to_its_waiting_caller(monkeypatch):
    worker, nc, finisher = make_worker(monkeypatch)
    worker.finisher = finisher = ReplyFinisher()
    a = assignment(deadline=deadline(-1)).model_copy(update={"reply_to": "_INBOX.caller"})
    with capture_logs() as logs:
        await worker._run_assignment(a, FakeExecutor())
    assert [(e["event"], e["log_level"]) for e in logs] == [("job expired before its call", "info")]
    assert finisher.replies == ["_INBOX.caller"] and finisher.log[0][:2] == ("finish", ACK)
    [result] = finisher.finished
    assert result.error.message == "the deadline passed before the call could start"
    finisher.finished.clear()
    await worker._run_assignment(a.model_copy(update={"rate_limited": 4}), FakeExecutor())
    assert finisher.finished[0].error.message.endswith("after 4 answers of 429 (the keys' limits: a longer deadline "
                                                       "or more key capacity)")


async def test_a_secret_the_worker_cannot_use_hands_the_job_back_and_tells_the_leader(monkeypatch):
    worker, nc, finisher = make_worker(monkeypatch)
    monkeypatch.delenv("RF_BITE_K1")
    books = Books(worker)
    executor = FakeExecutor()
    await worker._run_assignment(assignment(), executor)
    assert executor.calls == 0 and finisher.finished == [] and books.log == [("hand_back", 7, ACK, 0.0)]
    assert worker.unusable == {"k1": "RF_BITE_K1 not set"}
    [beat] = [Heartbeat.model_validate_json(p) for s, p in nc.published if s.endswith(".heartbeat")]
    assert beat.unusable_keys == {"k1": "RF_BITE_K1 not set"}
    assert [(r.kind, r.terminal) for r in nc.reports()] == [("none", False)]
    assert worker.calling == {} and worker.calls == 0


async def test_an_upstream_of_a_revision_not_applied_yet_hands_the_job_back(monkeypatch):
    worker, nc, finisher = make_worker(monkeypatch)
    books = Books(worker)
    a = assignment().model_copy(update={"upstream": "newer"})
    a = a.model_copy(update={"job": {**a.job, "upstream": "newer"}})
    with capture_logs() as logs:
        await worker._run_assignment(a, FakeExecutor())
    assert books.log == [("hand_back", 7, ACK, 0.0)] and finisher.finished == []
    assert worker.unusable == {"k1": "upstream not in this worker's config"}
    [line] = [entry for entry in logs if entry["log_level"] == "error"]
    assert line["event"] == "secret unusable; job handed back" and line["problem"] == "upstream not in this worker's config"


async def test_a_job_for_one_upstream_is_never_sent_to_another_with_that_ones_key(monkeypatch):
    from ratefleet.schemas.config import parse_config

    worker, nc, finisher = make_worker(monkeypatch)
    monkeypatch.setenv("RF_MUT_K2", "sk-other-00000000")
    worker.config = parse_config({
        "upstreams": {"u": {"base_url": "https://api.example.test"}, "v": {"base_url": "https://other.example.test"}},
        "pools": {"p": {"upstream": "u", "keys": [{"id": "k1", "secret": "env:RF_BITE_K1", "rps": 10}]},
                  "q": {"upstream": "v", "keys": [{"id": "k2", "secret": "env:RF_MUT_K2", "rps": 10}]}}})
    a = assignment(upstream="u").model_copy(update={"upstream": "v", "key_id": "k2"})  # the job names u
    executor = FakeExecutor()
    await worker._run_assignment(a, executor)
    assert executor.calls == 0 and finisher.finished == [] and finisher.log == [("nak", ACK, 1.0)]


class Refusing:
    async def call(self, job, upstream, secret):
        raise InvalidRequest("header 'X-A' is not allowed")


async def test_a_request_the_executor_refuses_ends_invalid_without_a_call(monkeypatch):
    worker, nc, finisher = make_worker(monkeypatch)
    await worker._run_assignment(assignment(), Refusing())
    [result] = finisher.finished
    assert (result.status, result.error.code, result.error.message) == ("invalid", "invalid_request",
                                                                         "header 'X-A' is not allowed")
    assert worker.calls == 0 and worker.calling == {} and worker.key_versions == {}
    assert [(r.kind, r.terminal) for r in nc.reports()] == [("none", True)]


# -- streamed jobs --------------------------------------------------------------------------------


async def test_a_streamed_job_with_a_waiting_caller_gets_a_chunk_relay(monkeypatch):
    worker, nc, finisher = make_worker(monkeypatch)
    executor = Watching(worker)
    streamed = {"request": {"method": "POST", "path": "/v1/x", "json": {"stream": True}}}
    await worker._run_assignment(assignment(**streamed).model_copy(update={"reply_to": "_INBOX.c"}), executor)
    await worker._run_assignment(assignment(job_id="j2", **streamed), executor)  # nobody waits for chunks
    [relay, none] = executor.relays
    assert relay is not None and none is None
    assert executor.jobs == ["j1", "j2"] and [seen[2] for seen in executor.seen] == ["sk-bite-0000000000"] * 2
    published = []

    async def publish(subject, payload=b"", headers=None):
        published.append((subject, payload, headers))

    nc.publish = publish
    assert executor.on_answers[1] is None
    executor.on_answers[0]({"x-request-id": "req_1"})  # the executor tells the relay the stream's kept headers
    await relay(b"data: 1")
    await relay(b"data: 2")
    assert published == [("_INBOX.c.s", b"data: 1", {"Ratefleet-Attempt": "1", "Ratefleet-Answer-x-request-id": "req_1"}),
                         ("_INBOX.c.s", b"data: 2", {"Ratefleet-Attempt": "1"})]


# -- cut short at shutdown ------------------------------------------------------------------------


async def test_a_call_cut_short_at_shutdown_goes_back_at_once_and_is_not_counted(monkeypatch):
    worker, nc, finisher = make_worker(monkeypatch)
    executor = FakeExecutor(seconds=30)
    a = assignment()
    kept_alive_at_nak = []
    nak = finisher.nak

    async def nak_noting(ack, delay_s=0.0):
        kept_alive_at_nak.append(a.id in worker.calling)
        await nak(ack, delay_s)

    finisher.nak = nak_noting
    with capture_logs() as logs, anyio.fail_after(10):
        async with anyio.create_task_group() as tg:
            tg.start_soon(worker._run_assignment, a, executor)
            while a.id not in worker._cancel_scopes:
                await anyio.sleep(0.01)
            worker._cancel_scopes[a.id].cancel()
    assert finisher.log == [("nak", ACK, 0.0)] and finisher.finished == []
    assert kept_alive_at_nak == [False], "an in-progress ack after the nak would postpone the redelivery"
    assert [(e["event"], e["log_level"]) for e in logs] == [
        ("call abandoned at shutdown; job goes back to the queue", "warning")]
    assert worker.calls == 0 and worker.calling == {} and worker._cancel_scopes == {}
    assert [(r.kind, r.terminal) for r in nc.reports()] == [("none", False)]
