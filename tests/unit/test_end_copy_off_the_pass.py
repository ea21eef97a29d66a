"""An EndCopy's follow (a Result read, then a follower) must not hold the leader's dispatch
pass: the read is retried up to FALLBACK_READ_S while the Results stream does not answer."""

from __future__ import annotations

import anyio
import pytest
from test_leader_session_memory import Running, job_message, until, worker_w1

from ratefleet.dispatcher.shell.memory_bus import MemoryBus
from ratefleet.schemas.internal import Assignment

pytestmark = [pytest.mark.anyio, pytest.mark.timeout(30)]
COPY_REPLY = {"Ratefleet-Reply-To": "_INBOX.copy"}  # each message has a requester waiting


class SlowFollowBus(MemoryBus):
    """end_copy as NatsLeaderBus's: the ack, then the follow, whose Result read hangs."""

    def __init__(self) -> None:
        super().__init__()
        self.release = anyio.Event()

    async def end_copy(self, incoming) -> None:
        await super().end_copy(incoming)
        await self.release.wait()  # the Results stream not answering (read_result retries 5 s)


async def test_a_copys_slow_follow_does_not_hold_the_next_assignment():
    bus = SlowFollowBus()
    async with Running(bus) as run:
        assigned = await worker_w1(bus)
        await bus.deliver(job_message(run.session, 1, job_id="j1", headers=COPY_REPLY))
        await until(lambda: len(assigned) == 1)
        await bus.deliver(job_message(run.session, 2, job_id="j1", headers=COPY_REPLY))  # j1 again: a copy, ended with EndCopy
        await until(lambda: len(bus.copies) == 1)
        await bus.deliver(job_message(run.session, 3, job_id="j3", headers=COPY_REPLY))
        try:
            await until(lambda: len(assigned) == 2, timeout=3.0)
        finally:
            bus.release.set()
        assert Assignment.model_validate_json(assigned[1]).job_id == "j3"
