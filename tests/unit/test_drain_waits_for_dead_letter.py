"""A worker draining for shutdown waits for the dead letter of a job that just ended. The
terminal report is sent inside Finisher.finish (its `then`, right after the ack), before the
job's dead letter is written; had the report taken the call out of Worker.in_flight there,
Worker._drain (which waits `while self.in_flight`) would return and run() cancel the task
group during the dead letter's publish: a job ending attempts_exhausted / rate_limited /
result_not_stored during a shutdown lost its dead letter (found in review)."""

from __future__ import annotations

import anyio
import pytest
from test_bite_worker import FakeExecutor, FakeNats, assignment

from ratefleet.schemas.config import parse_config
from ratefleet.workers.service import Worker

pytestmark = pytest.mark.anyio


class SlowLetterFinisher:
    """Stores and acks at once (then `then`, as Finisher does); a dead letter takes 0.3 s
    (a JetStream publish round trip on a busy server)."""

    def __init__(self):
        self.dead_letters, self.naks = [], []

    async def finish(self, result, *, ack, reply_to, then=None, before_answer=None):
        if then is not None:
            await then()
        return True

    async def dead(self, tier, result, *, job=None, raw=None, last_error=None):
        await anyio.sleep(0.3)
        self.dead_letters.append(result)

    async def nak(self, ack, delay_s=0.0):
        self.naks.append(ack)

    async def in_progress(self, ack):
        pass


class NoSub:
    async def unsubscribe(self):
        pass


async def test_a_drain_waits_for_the_dead_letter_of_a_job_that_ended(monkeypatch):
    monkeypatch.setenv("RF_BITE_K1", "sk-bite-0000000000")
    config = parse_config({"upstreams": {"u": {"base_url": "https://api.example.test"}},
                           "pools": {"p": {"keys": [{"id": "k1", "secret": "env:RF_BITE_K1", "rps": 10}]}},
                           "workers": {"grace_s": 0.05, "heartbeat_s": 0.02}})
    worker = Worker(config, FakeNats(), worker_id="w-review")
    worker.finisher = finisher = SlowLetterFinisher()
    a = assignment(attempt=5, max_attempts=5)  # a 500 at the last attempt: attempts_exhausted, a dead letter
    async with anyio.create_task_group() as tg:  # as Worker.run: the drain, then the group cancelled
        await worker._take(a, FakeExecutor(status=500), tg, None)
        await anyio.sleep(0.01)  # the call is done, the Result stored and acked; its dead letter on its way
        await worker._drain(NoSub())
        tg.cancel_scope.cancel()
    assert len(finisher.dead_letters) == 1
