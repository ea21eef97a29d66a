"""A repeat's Result lookup runs beside intake (puller.py). Answered "none" just before the
first message's worker stored the Result, it reaches the leader after that call ended (its
report came in meanwhile): the repeat must not be called a second time (paid twice)."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from types import SimpleNamespace

import anyio
import pytest
from test_leader_session_memory import Running, until

from ratefleet.dispatcher.shell.memory_bus import MemoryBus, MemoryMessage
from ratefleet.schemas import Subjects
from ratefleet.schemas.internal import Assignment, Heartbeat, OutcomeReport

pytestmark = [pytest.mark.anyio, pytest.mark.timeout(30)]
SUBJECTS = Subjects()


class LookupBus(MemoryBus):
    """A lookup answered "no Result" (the store had none yet) that reaches the puller late."""

    def __init__(self) -> None:
        super().__init__()
        self.asked = anyio.Event()
        self.answer = anyio.Event()

    async def stored_result(self, job_id: str, batch: str | None) -> bytes | None:
        self.asked.set()
        await self.answer.wait()
        return None


def message(session, seq: int, job_id: str, headers: dict[str, str]) -> MemoryMessage:
    meta = SimpleNamespace(num_delivered=1, sequence=SimpleNamespace(stream=seq, consumer=seq),
                           timestamp=datetime.now(UTC))
    body = json.dumps({"id": job_id, "request": {"path": "/v1/x"}}).encode()
    return MemoryMessage(session.inboxes["normal"].inbox, body, f"ack.{seq}.1", {"Nats-Msg-Id": job_id, **headers},
                         meta)


async def test_a_repeat_looked_up_before_the_first_call_stored_is_not_called_again():
    bus = LookupBus()
    async with Running(bus) as run:
        assigned: list[bytes] = []

        async def on_assign(msg) -> None:
            assigned.append(msg.data)

        await bus.subscribe(SUBJECTS.assign("w1"), on_assign)
        await bus.deliver(MemoryMessage(SUBJECTS.heartbeat, Heartbeat(worker="w1", slots=4).model_dump_json().encode()))
        await bus.deliver(message(run.session, 1, "j1", {}))
        await until(lambda: len(assigned) == 1)
        first = Assignment.model_validate_json(assigned[0])
        await bus.deliver(message(run.session, 2, "j1", {"Ratefleet-Repeat": "1"}))  # j1 sent again
        with anyio.fail_after(5):
            await bus.asked.wait()  # its lookup: asked, answered "none" (the first call still running)
        # the first call ends: its worker stores the Result, acks, reports, and the report is read
        report = OutcomeReport(assignment=first.id, worker="w1", key_id="k1", job_id="j1", kind="ok", status=200)
        await bus.deliver(MemoryMessage(SUBJECTS.outcome, report.model_dump_json().encode()))
        await until(lambda: run.session.machine.fleet.calling_seq("j1") is None)
        bus.answer.set()  # then the lookup's "none" reaches intake
        await until(lambda: bus.handed_back or bus.copies or len(assigned) > 1)
        assert len(assigned) == 1, "j1 was handed to a worker twice"
        assert [seq for seq, _, _ in bus.handed_back] == [2]  # looked up again when it comes back
