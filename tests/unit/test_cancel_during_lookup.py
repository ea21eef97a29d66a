"""A delivery whose Result is looked up (a redelivery, a repeat) is read beside intake
(puller.py): a batch cancelled while that lookup is under way must still end the job
uncalled, as it does for a job read a moment later or one the leader holds."""

from __future__ import annotations

import anyio
import pytest
from test_leader_session_memory import GatedLookupBus, Running, job_message, until, worker_w1

from ratefleet.dispatcher.core import events as ev
from ratefleet.dispatcher.core.delivery import Refused

pytestmark = [pytest.mark.anyio, pytest.mark.timeout(30)]


async def test_a_batch_cancelled_while_a_jobs_lookup_runs_ends_that_job_uncalled():
    bus = GatedLookupBus()
    async with Running(bus) as run:
        assigned = await worker_w1(bus)
        await bus.deliver(job_message(run.session, 1, batch="b1", headers={"Ratefleet-Repeat": "1"}))  # a resumed batch's line
        with anyio.fail_after(5):
            await bus.asked.wait()
        # `ratefleet cancel --batch b1` lands meanwhile (service.py: the names, then the event)
        run.session.cancelled = frozenset({"b1"})
        run.session.post(ev.BatchCancelled("b1"))
        bus.answer.set()
        await until(lambda: bus.ended or assigned)
        assert not assigned, "a job of the cancelled batch was called"
        assert [(e.job_id, type(e)) for e in bus.ended] == [("j1", Refused)]
