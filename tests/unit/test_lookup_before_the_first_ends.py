"""A repeat's Result lookup runs beside intake (puller.py). Answered "none" just before the
first message's worker stored the Result, it reaches the leader after that call ended (its
report came in meanwhile): the repeat must not be called a second time (paid twice)."""

from __future__ import annotations

import anyio
import pytest
from test_leader_session_memory import GatedLookupBus, Running, job_message, until, worker_w1

from ratefleet.dispatcher.shell.memory_bus import MemoryMessage
from ratefleet.schemas import Subjects
from ratefleet.schemas.internal import Assignment, OutcomeReport

pytestmark = [pytest.mark.anyio, pytest.mark.timeout(30)]
SUBJECTS = Subjects()


async def test_a_repeat_looked_up_before_the_first_call_stored_is_not_called_again():
    bus = GatedLookupBus()
    async with Running(bus) as run:
        assigned = await worker_w1(bus)
        await bus.deliver(job_message(run.session, 1, job_id="j1"))
        await until(lambda: len(assigned) == 1)
        first = Assignment.model_validate_json(assigned[0])
        await bus.deliver(job_message(run.session, 2, job_id="j1", headers={"Ratefleet-Repeat": "1"}))  # j1 sent again
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
