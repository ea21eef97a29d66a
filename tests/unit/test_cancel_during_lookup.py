"""A delivery whose Result is looked up (a redelivery, a repeat) is read beside intake
(puller.py): a batch cancelled while that lookup is under way must still end the job
uncalled, as it does for a job read a moment later or one the leader holds."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from types import SimpleNamespace

import anyio
import pytest
from test_leader_session_memory import Running, until

from ratefleet.dispatcher.core import events as ev
from ratefleet.dispatcher.core.delivery import Refused
from ratefleet.dispatcher.shell.memory_bus import MemoryBus, MemoryMessage
from ratefleet.schemas import Subjects
from ratefleet.schemas.internal import Heartbeat

pytestmark = [pytest.mark.anyio, pytest.mark.timeout(30)]
SUBJECTS = Subjects()


class LookupBus(MemoryBus):
    """A Result lookup that answers "none" when the test lets it."""

    def __init__(self) -> None:
        super().__init__()
        self.asked = anyio.Event()
        self.answer = anyio.Event()

    async def stored_result(self, job_id: str, batch: str | None) -> bytes | None:
        self.asked.set()
        await self.answer.wait()
        return None


async def test_a_batch_cancelled_while_a_jobs_lookup_runs_ends_that_job_uncalled():
    bus = LookupBus()
    async with Running(bus) as run:
        assigned: list[bytes] = []

        async def on_assign(msg) -> None:
            assigned.append(msg.data)

        await bus.subscribe(SUBJECTS.assign("w1"), on_assign)
        await bus.deliver(MemoryMessage(SUBJECTS.heartbeat, Heartbeat(worker="w1", slots=4).model_dump_json().encode()))
        meta = SimpleNamespace(num_delivered=1, sequence=SimpleNamespace(stream=1, consumer=1),
                               timestamp=datetime.now(UTC))
        body = json.dumps({"id": "j1", "batch": "b1", "request": {"path": "/v1/x"}}).encode()
        await bus.deliver(MemoryMessage(run.session.inboxes["normal"].inbox, body, "ack.1.1",
                                        {"Nats-Msg-Id": "j1", "Ratefleet-Repeat": "1"}, meta))  # a resumed batch's line
        with anyio.fail_after(5):
            await bus.asked.wait()
        # `ratefleet cancel --batch b1` lands meanwhile (service.py: the names, then the event)
        run.session.cancelled = frozenset({"b1"})
        run.session.post(ev.BatchCancelled("b1"))
        bus.answer.set()
        await until(lambda: bus.ended or assigned)
        assert not assigned, "a job of the cancelled batch was called"
        assert [(e.job_id, type(e)) for e in bus.ended] == [("j1", Refused)]
