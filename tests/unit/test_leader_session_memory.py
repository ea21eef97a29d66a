"""The leader shell (dispatcher/shell/leader.py) over the in-memory bus (memory_bus.py): NATS
messages become events, the machine's commands become bus calls. Fast, no nats-server: the
same session the dispatcher runs, with its I/O swapped (the NATS behaviour itself is covered
by tests/e2e)."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from types import SimpleNamespace

import anyio
import pytest

from ratefleet.dispatcher.core import events as ev
from ratefleet.dispatcher.shell.leader import LeaderSession
from ratefleet.dispatcher.shell.memory_bus import MemoryBus, MemoryMessage
from ratefleet.schemas import Config, Subjects
from ratefleet.schemas.internal import Assignment, Heartbeat, OutcomeReport

pytestmark = [pytest.mark.anyio, pytest.mark.timeout(30)]
SUBJECTS = Subjects()


def config() -> Config:
    return Config.model_validate({
        "upstreams": {"u": {"base_url": "http://127.0.0.1:9"}},
        "pools": {"p": {"keys": [{"id": "k1", "rps": 100, "secret": "env:UNUSED"}]}},
        "workers": {"heartbeat_s": 0.1},
    })


def job_message(session: LeaderSession, seq: int, delivered: int = 1, tier: str = "normal", *,
                job_id: str | None = None, batch: str | None = None,
                headers: dict[str, str] | None = None) -> MemoryMessage:
    """A JOBS delivery on `tier`'s pull inbox: job `job_id` (default `j<seq>`), in `batch` if given,
    with `headers` beside its Nats-Msg-Id."""
    job_id = job_id or f"j{seq}"
    meta = SimpleNamespace(num_delivered=delivered, sequence=SimpleNamespace(stream=seq, consumer=seq),
                           timestamp=datetime.now(UTC))
    body = json.dumps({"id": job_id, **({"batch": batch} if batch else {}), "request": {"path": "/v1/x"}}).encode()
    return MemoryMessage(session.inboxes[tier].inbox, body, f"ack.{seq}.{delivered}",
                         {"Nats-Msg-Id": job_id, **(headers or {})}, meta)


async def worker_w1(bus: MemoryBus, slots: int = 4) -> list[bytes]:
    """Worker w1 (`slots` free) heard by the leader; returns the list its assignments are put in."""
    assigned: list[bytes] = []

    async def on_assign(msg) -> None:
        assigned.append(msg.data)

    await bus.subscribe(SUBJECTS.assign("w1"), on_assign)
    await bus.deliver(MemoryMessage(SUBJECTS.heartbeat, Heartbeat(worker="w1", slots=slots).model_dump_json().encode()))
    return assigned


class GatedLookupBus(MemoryBus):
    """A Result lookup that answers "none" only when the test sets `answer` (`asked`: it began)."""

    def __init__(self) -> None:
        super().__init__()
        self.asked = anyio.Event()
        self.answer = anyio.Event()

    async def stored_result(self, job_id: str, batch: str | None) -> bytes | None:
        self.asked.set()
        await self.answer.wait()
        return None


async def until(check, timeout: float = 5.0) -> None:
    with anyio.fail_after(timeout):
        while not check():
            await anyio.sleep(0.01)


class Running:
    def __init__(self, bus: MemoryBus) -> None:
        self.bus = bus
        self.session = LeaderSession(config(), bus, "d-mem", conservative=False, epoch=(3, 4))

    async def __aenter__(self) -> Running:
        self.tg = anyio.create_task_group()
        await self.tg.__aenter__()
        self.tg.start_soon(self.session.run)
        await until(lambda: self.session.inboxes["normal"].inbox and self.session.machine.ready)
        return self

    async def __aexit__(self, *exc) -> None:
        self.tg.cancel_scope.cancel()
        await self.tg.__aexit__(None, None, None)


async def test_a_delivery_goes_to_a_worker_with_a_free_slot_and_its_outcome_frees_it():
    bus = MemoryBus()
    async with Running(bus) as run:
        assigned: list[bytes] = []
        await bus.subscribe(SUBJECTS.assign("w1"), lambda msg: _append(assigned, msg.data))
        await bus.deliver(MemoryMessage(SUBJECTS.heartbeat, Heartbeat(worker="w1", slots=1).model_dump_json().encode()))
        await bus.deliver(job_message(run.session, 1))
        await until(lambda: assigned)
        sent = Assignment.model_validate_json(assigned[0])
        assert (sent.job_id, sent.key_id, sent.ack, sent.epoch, sent.seq) == ("j1", "k1", "ack.1.1", (3, 4), 1)
        await bus.deliver(job_message(run.session, 2))
        await anyio.sleep(0.2)
        assert len(assigned) == 1  # one slot, in use
        report = OutcomeReport(assignment=sent.id, worker="w1", key_id="k1", job_id="j1", kind="ok", status=200)
        await bus.deliver(MemoryMessage(SUBJECTS.outcome, report.model_dump_json().encode()))
        await until(lambda: len(assigned) == 2)
        assert any(s == SUBJECTS.leader_announce for s, _, _ in bus.published)
        assert run.session.status()["workers"][0]["id"] == "w1"


async def _append(into: list[bytes], data: bytes) -> None:
    into.append(data)


async def test_a_redelivery_with_its_result_stored_is_answered_and_not_run():
    bus = MemoryBus(results={"j1": b'{"job_id": "j1"}'})
    async with Running(bus) as run:
        await bus.deliver(MemoryMessage(SUBJECTS.heartbeat, Heartbeat(worker="w1", slots=4).model_dump_json().encode()))
        await bus.deliver(job_message(run.session, 1, delivered=2))
        await until(lambda: bus.answered)
        assert bus.answered == [(b'{"job_id": "j1"}', "ack.1.2", None)]
        assert not bus.sent_to(SUBJECTS.assign("w1"))


async def test_step_down_hands_back_held_jobs_and_late_arrivals():
    bus = MemoryBus()
    async with Running(bus) as run:
        await bus.deliver(job_message(run.session, 1))  # no worker: held
        await until(lambda: run.session.machine.held)
    assert [(seq, ack) for seq, ack, _ in bus.handed_back] == [(1, "ack.1.1")]
    assert bus.handed_back[0][2] > 1.0  # after the open pull requests expired
    assert not bus.subs.get(SUBJECTS.heartbeat)  # unsubscribed


async def test_an_operator_command_is_answered_after_its_state_is_saved():
    bus = MemoryBus()
    async with Running(bus):
        answers: list[bytes] = []
        await bus.subscribe("reply.1", lambda msg: _append(answers, msg.data))
        request = json.dumps({"action": "disable", "key": "k1", "reason": "rotating"}).encode()
        await bus.deliver(MemoryMessage(SUBJECTS.admin_keys, request, "reply.1"))
        await until(lambda: answers)
        answer = json.loads(answers[0])
        assert answer["ok"] and answer["persisted"] and bus.keys["k1"]["reason"] == "rotating"
        await bus.deliver(MemoryMessage(SUBJECTS.admin_keys, b"not json", "reply.1"))
        await until(lambda: len(answers) == 2)
        assert not json.loads(answers[1])["ok"]


async def test_a_session_that_stepped_down_drops_late_events():
    # a dispatcher that loses the lead runs on: a callback of its finished session that posts
    # late (a report, a delivery) must neither raise nor hold the event
    async with Running(MemoryBus()) as run:
        pass
    run.session.post(ev.Tick())
    assert run.session._queued() == []
