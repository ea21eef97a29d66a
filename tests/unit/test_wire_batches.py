"""Batched leader<->worker messages (schemas/internal.py): one assignment message per worker
per dispatch pass, outcome reports coalesced per loop iteration, the job carried as its JSON
text and validated once by the worker. The leader over the in-memory bus, the worker over a
fake NATS connection and httpx.MockTransport; the e2e tests run the same over nats-server."""

from __future__ import annotations

import json
import time

import anyio
import httpx
import pytest
from test_leader_session_memory import SUBJECTS, Running, job_message, until
from test_worker_job_faults import RecordingFinisher, make_worker

from ratefleet.dispatcher.core.commands import Assign
from ratefleet.dispatcher.shell.assign_out import runs, send_assignments, traced
from ratefleet.dispatcher.shell.leader import LeaderSession
from ratefleet.dispatcher.shell.memory_bus import MemoryBus, MemoryMessage
from ratefleet.runtime.tracing import valid_traceparent
from ratefleet.schemas import Config
from ratefleet.schemas.internal import (
    Assignment,
    Heartbeat,
    OutcomeReport,
    batch_payload,
    read_assignments,
    read_reports,
)
from ratefleet.workers.executor import UpstreamExecutor
from ratefleet.workers.outbox import ReportOutbox

pytestmark = [pytest.mark.anyio, pytest.mark.timeout(30)]
TP = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"


def report(n: int) -> OutcomeReport:
    return OutcomeReport(assignment=f"a{n}", worker="w1", key_id="k1", job_id=f"j{n}", kind="ok", status=200)


def assignment(n: int, job_json: str, **fields) -> Assignment:
    return Assignment(id=f"a{n}", job_json=job_json, job_id=f"j{n}", tier="normal", upstream="u", key_id="k1",
                      pool="p", ack=f"$JS.ACK.{n}", attempt=1, max_attempts=5, submitted_at=time.time(),
                      queued_ms=0.0, **fields)


# -- the wire forms -------------------------------------------------------------------------

def test_one_item_is_sent_bare_and_several_as_an_array_and_readers_take_both():
    one, two = report(1).model_dump_json().encode(), report(2).model_dump_json().encode()
    assert batch_payload([one]) == one
    assert json.loads(batch_payload([one, two])) == [json.loads(one), json.loads(two)]
    assert [r.job_id for r in read_reports(one)] == ["j1"]
    assert [r.job_id for r in read_reports(batch_payload([one, two]))] == ["j1", "j2"]


def test_a_malformed_entry_of_a_batch_is_skipped_and_an_unreadable_message_raises():
    good = report(1).model_dump_json().encode()
    assert [r.job_id for r in read_reports(b"[" + good + b',{"worker": "w1"}]')] == ["j1"]
    for bad in (b"[", b'[{"worker": "w1"}]', b"{}", b"not json"):
        with pytest.raises(ValueError):
            read_reports(bad)


def test_an_assignment_carries_its_job_as_json_text_validated_once():
    a = read_assignments(assignment(1, '{"id": "j1", "batch": "b", "request": {"path": "/v1/x"}}').model_dump_json()
                         .encode())[0]
    job = a.job_model()
    assert (job.id, job.batch, job.request.path) == ("j1", "b", "/v1/x")
    assert a.job_model() is job  # remembered, not validated again
    assert a.job_data()["batch"] == "b"


def test_the_trace_context_leads_each_entry_and_runs_stay_under_max_payload():
    payload = b'{"id":"a1","job_id":"j1"}'
    entry = json.loads(traced(payload, {"traceparent": TP, "tracestate": 'k="v"'}))
    assert entry == {"traceparent": TP, "tracestate": 'k="v"', "id": "a1", "job_id": "j1"}
    assert traced(payload, {}) == payload
    items = [b"x" * 10] * 5
    assert runs(items, 1000) == [(0, 5)]
    assert runs(items, 25) == [(0, 2), (2, 4), (4, 5)]  # [x10,x10] is 23 bytes, three would be 34
    assert all(len(batch_payload(items[a:b])) <= 25 for a, b in runs(items, 25))
    assert runs([b"x" * 50, b"y"], 25) == [(0, 1), (1, 2)]  # too large alone: a run of its own


# -- the leader ------------------------------------------------------------------------------

class Bursting(Running):
    """The in-memory leader with a key whose bucket lets a whole pass through (burst 10)."""

    def __init__(self, bus: MemoryBus) -> None:
        super().__init__(bus)
        config = Config.model_validate({
            "upstreams": {"u": {"base_url": "http://127.0.0.1:9"}},
            "pools": {"p": {"keys": [{"id": "k1", "rps": 100, "burst": 10, "secret": "env:UNUSED"}]}},
            "workers": {"heartbeat_s": 0.1}, "dispatcher": {"first_burst": None}})
        self.session = LeaderSession(config, bus, "d-mem", conservative=False, epoch=(3, 4))


async def test_a_dispatch_pass_sends_a_worker_all_its_assignments_in_one_message_each_with_its_trace():
    bus = MemoryBus()
    async with Bursting(bus) as run:
        messages: list[MemoryMessage] = []
        await bus.subscribe(SUBJECTS.assign("w1"), lambda msg: _append(messages, msg))
        for seq in (1, 2, 3):
            await bus.deliver(job_message(run.session, seq))  # no worker yet: held
        await until(lambda: len(run.session.machine.held) == 3)
        await bus.deliver(MemoryMessage(SUBJECTS.heartbeat, Heartbeat(worker="w1", slots=3).model_dump_json().encode()))
        await until(lambda: messages)
        await anyio.sleep(0.2)
        [message] = messages
        sent = read_assignments(message.data)
        assert sorted(a.job_id for a in sent) == ["j1", "j2", "j3"]
        assert all(a.epoch == (3, 4) and valid_traceparent(a.traceparent) for a in sent)
        assert len({a.traceparent for a in sent}) == 3  # each job its own trace
        assert sorted(a.job_model().id for a in sent) == ["j1", "j2", "j3"]
        # one message of three reports frees the three slots: the next three jobs go out
        reports = [OutcomeReport(assignment=a.id, worker="w1", key_id="k1", job_id=a.job_id, kind="ok").model_dump_json()
                   .encode() for a in sent]
        for seq in (4, 5, 6):
            await bus.deliver(job_message(run.session, seq))
        await until(lambda: len(run.session.machine.held) == 3)
        await bus.deliver(MemoryMessage(SUBJECTS.outcome, batch_payload(reports)))
        await until(lambda: sum(len(read_assignments(m.data)) for m in messages) == 6)


async def _append(into: list, item) -> None:
    into.append(item)


async def test_an_assignment_too_large_alone_fails_alone_and_the_others_are_sent():
    bus = MemoryBus(max_payload=300)
    sent: list[bytes] = []
    await bus.subscribe(SUBJECTS.assign("w1"), lambda msg: _append(sent, msg.data))
    small = [Assign("w1", f"a{n}", json.dumps({"id": f"a{n}", "pad": "x" * 100}).encode(), _incoming(n))
             for n in (1, 2, 3)]
    large = Assign("w1", "a9", json.dumps({"id": "a9", "pad": "x" * 400}).encode(), _incoming(9))
    failed, error = await send_assignments(bus, SUBJECTS.assign("w1"), [small[0], large, small[1], small[2]])
    assert error is None
    assert [(f.assignment, f.too_large) for f in failed] == [("a9", True)]
    assert sorted(json.loads(e)["id"] for m in sent for e in _entries(m)) == ["a1", "a2", "a3"]
    assert all(len(m) <= 300 for m in sent)


def _entries(message: bytes) -> list[bytes]:
    data = json.loads(message)
    return [json.dumps(e).encode() for e in (data if isinstance(data, list) else [data])]


def _incoming(n: int):
    from ratefleet.dispatcher.core.delivery import Incoming
    from ratefleet.schemas import Job

    return Incoming(Job.model_validate({"id": f"j{n}", "request": {"path": "/v1/x"}}), f"j{n}", "normal", "u",
                    f"ack.{n}", None, 1, 5, time.time(), n, traceparent=TP)


# -- the worker ------------------------------------------------------------------------------

async def test_reports_ending_in_one_loop_iteration_go_as_one_message_and_urgent_ones_at_once():
    published: list[bytes] = []

    async def publish(payload: bytes) -> None:
        published.append(payload)

    outbox = ReportOutbox(publish)
    async with anyio.create_task_group() as tg:
        for n in (1, 2, 3):
            tg.start_soon(outbox.send, report(n).model_dump_json().encode())
    assert [[r.job_id for r in read_reports(p)] for p in published] == [["j1", "j2", "j3"]]
    published.clear()
    await outbox.send(report(4).model_dump_json().encode())  # alone: the bare object
    assert OutcomeReport.model_validate_json(published[-1]).job_id == "j4"
    async with anyio.create_task_group() as tg:
        tg.start_soon(outbox.send, report(5).model_dump_json().encode())
        await anyio.sleep(0)
        assert outbox.pending == 1
        await outbox.send(report(6).model_dump_json().encode(), now=True)  # e.g. a 401 before its nak
        assert [r.job_id for r in read_reports(published[-1])] == ["j5", "j6"] and outbox.pending == 0
    assert len(published) == 2  # the round's opener found nothing left to send


async def test_a_worker_takes_every_assignment_of_a_batch_with_its_own_trace_and_reports_them_together(monkeypatch):
    finisher = RecordingFinisher()
    worker, nc = make_worker(monkeypatch, finisher)
    calls: list[httpx.Request] = []
    executor = UpstreamExecutor(httpx.AsyncClient(transport=httpx.MockTransport(
        lambda r: calls.append(r) or httpx.Response(200, json={"ok": True}))))
    other = "00-1af7651916cd43dd8448eb211c80319c-c7ad6b7169203331-01"
    batch = batch_payload([assignment(1, '{"id": "j1", "request": {"path": "/v1/a"}}', traceparent=TP)
                           .model_dump_json().encode(),
                           assignment(2, '{"id": "j2", "request": {"path": "/v1/b"}}', traceparent=other)
                           .model_dump_json().encode()])
    traces: dict[str, str] = {}
    run = worker._run_assignment

    async def recording(a, ex, trace=None):
        traces[a.job_id] = (trace or {}).get("traceparent")
        await run(a, ex, trace)

    monkeypatch.setattr(worker, "_run_assignment", recording)
    async with anyio.create_task_group() as tg:
        async for msg in _Sub([batch]).messages:
            await worker._on_assignments(msg, executor, tg)
    assert traces == {"j1": TP, "j2": other}
    assert sorted(r.url.path for r in calls) == ["/v1/a", "/v1/b"]
    assert sorted(r.job_id for r in finisher.finished) == ["j1", "j2"]
    outcome = [p for s, p in nc.published if s.endswith("internal.outcome")]
    assert len(outcome) == 1 and sorted(r.job_id for r in read_reports(outcome[0])) == ["j1", "j2"]


async def test_an_invalid_job_in_json_text_ends_invalid_with_its_raw_fields_in_the_dead_letter(monkeypatch):
    finisher = RecordingFinisher()
    worker, nc = make_worker(monkeypatch, finisher)
    calls: list = []
    executor = UpstreamExecutor(httpx.AsyncClient(transport=httpx.MockTransport(lambda r: calls.append(r))))
    raw = '{"id": "j1", "batch": "b7", "metadata": {"u": 1}, "request": {"path": "//elsewhere.test/x"}}'
    await worker._run_assignment(assignment(1, raw), executor)
    assert calls == []
    [result] = finisher.finished
    assert (result.status, result.error.code, result.batch, result.metadata) == ("invalid", "invalid_job", "b7", {"u": 1})
    assert "scheme or host" in result.error.message
    [letter] = finisher.dead_letters
    assert letter["job"] == json.loads(raw)
    assert [(r.kind, r.terminal) for r in nc.reports()] == [("none", True)]


class _Sub:
    def __init__(self, payloads: list[bytes]) -> None:
        self.payloads = payloads

    @property
    async def messages(self):
        for payload in self.payloads:
            yield MemoryMessage("ratefleet.internal.assign.w-unit", payload)


def test_the_leaders_assignment_json_is_a_valid_assignment_with_every_field():
    from types import SimpleNamespace

    from ratefleet.dispatcher.core.handout import Held, LeaderSettings, assignment_payload

    settings = LeaderSettings("d1", (7, 9), {}, {}, 1, 1, 1, 1, 1 << 20)
    incoming = _incoming(5)
    held = Held(incoming, touched=10.0, at=10.0, wall=incoming.submitted_at + 0.25)
    decision = SimpleNamespace(key_id="k2", pool="p2", variant="split", reservation=SimpleNamespace(denial_final=False))
    assignment_id, payload = assignment_payload(settings, held, decision, 10.5, 42)
    sent = set(json.loads(payload))
    assert sent == set(Assignment.model_fields) - {"job", "traceparent", "tracestate"}  # a new field is sent too
    a = Assignment.model_validate_json(traced(payload, {"traceparent": TP}))
    assert assignment_id == a.id == "d1.42"
    assert (a.job_id, a.key_id, a.pool, a.variant, a.epoch, a.seq, a.ack, a.denial_final, a.traceparent) == (
        "j5", "k2", "p2", "split", (7, 9), 5, "ack.5", False, TP)
    assert a.queued_ms == pytest.approx(750.0)
    assert a.job_model() == incoming.job


def test_an_assignment_keeps_its_jobs_utf8_text_unescaped():
    """A 600 KB job of emoji must not become a 1.8 MB assignment (over max_payload): the job's
    text inside the assignment stays UTF-8, 4 bytes an emoji, not a 12-byte \\ud83d\\ude00."""
    from types import SimpleNamespace

    from ratefleet.dispatcher.core.delivery import Incoming
    from ratefleet.dispatcher.core.handout import Held, LeaderSettings, assignment_payload
    from ratefleet.schemas import Job

    text = "\U0001F600" * 50_000 + "日" * 50_000
    job = Job.model_validate({"id": "u1", "request": {"path": "/v1/x", "json": {"content": text}}})
    incoming = Incoming(job, "u1", "normal", "u", "ack.1", None, 1, 5, time.time(), 1)
    settings = LeaderSettings("d1", (7, 9), {}, {}, 1, 1, 1, 1, 1 << 20)
    held = Held(incoming, touched=10.0, at=10.0, wall=incoming.submitted_at)
    decision = SimpleNamespace(key_id="k1", pool="p", variant=None, reservation=SimpleNamespace(denial_final=True))
    _, payload = assignment_payload(settings, held, decision, 10.0, 1)
    job_bytes = len(job.model_dump_json(by_alias=True, exclude_none=True).encode())
    assert job_bytes > len(text.encode()) and len(payload) < job_bytes + 2_000, (len(payload), job_bytes)
    assert Assignment.model_validate_json(payload).job_model() == job
