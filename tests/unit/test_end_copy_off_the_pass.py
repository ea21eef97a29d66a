"""An EndCopy's follow (a Result read, then a follower) must not hold the leader's dispatch
pass: the read is retried up to FALLBACK_READ_S while the Results stream does not answer."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from types import SimpleNamespace

import anyio
import pytest
from test_leader_session_memory import Running, until

from ratefleet.dispatcher.shell.memory_bus import MemoryBus, MemoryMessage
from ratefleet.schemas import Subjects
from ratefleet.schemas.internal import Assignment, Heartbeat

pytestmark = [pytest.mark.anyio, pytest.mark.timeout(30)]
SUBJECTS = Subjects()


class SlowFollowBus(MemoryBus):
    """end_copy as NatsLeaderBus's: the ack, then the follow, whose Result read hangs."""

    def __init__(self) -> None:
        super().__init__()
        self.release = anyio.Event()

    async def end_copy(self, incoming) -> None:
        await super().end_copy(incoming)
        await self.release.wait()  # the Results stream not answering (read_result retries 5 s)


def message(session, seq: int, job_id: str) -> MemoryMessage:
    meta = SimpleNamespace(num_delivered=1, sequence=SimpleNamespace(stream=seq, consumer=seq),
                           timestamp=datetime.now(UTC))
    body = json.dumps({"id": job_id, "request": {"path": "/v1/x"}}).encode()
    return MemoryMessage(session.inboxes["normal"].inbox, body, f"ack.{seq}.1",
                         {"Nats-Msg-Id": job_id, "Ratefleet-Reply-To": "_INBOX.copy"}, meta)


async def test_a_copys_slow_follow_does_not_hold_the_next_assignment():
    bus = SlowFollowBus()
    async with Running(bus) as run:
        assigned: list[bytes] = []

        async def on_assign(msg) -> None:
            assigned.append(msg.data)

        await bus.subscribe(SUBJECTS.assign("w1"), on_assign)
        await bus.deliver(MemoryMessage(SUBJECTS.heartbeat, Heartbeat(worker="w1", slots=4).model_dump_json().encode()))
        await bus.deliver(message(run.session, 1, "j1"))
        await until(lambda: len(assigned) == 1)
        await bus.deliver(message(run.session, 2, "j1"))  # j1 again: a copy, ended with EndCopy
        await until(lambda: len(bus.copies) == 1)
        await bus.deliver(message(run.session, 3, "j3"))
        try:
            await until(lambda: len(assigned) == 2, timeout=3.0)
        finally:
            bus.release.set()
        assert Assignment.model_validate_json(assigned[1]).job_id == "j3"
