"""With the default timings (heartbeat_s 1, worker_timeout_s 3) an assignment on time costs no
stored-Result read whatever its silent_s up to a heartbeat, and one made late only by a lagging
worker loop (over UNLISTED_LOST_S: the leader may have returned it as unlisted by two heartbeats)
costs one read and is then called once (written in review)."""
from __future__ import annotations

import time

import pytest
from test_bite_worker import assignment, make_worker, take

import ratefleet.workers.service as service

pytestmark = pytest.mark.anyio


async def test_on_time_costs_no_read_and_a_lagging_loop_one_read_one_call(monkeypatch):
    worker, nc, finisher = make_worker(monkeypatch)
    assert (worker.config.workers.heartbeat_s, worker.config.dispatcher.worker_timeout_s) == (1.0, 3.0)
    reads = []

    async def read_result(js, subjects, job_id, batch):
        reads.append(job_id)
        return None

    monkeypatch.setattr(service, "read_result", read_result)
    now = time.time()
    first = assignment(job_id="pace").model_copy(update={"submitted_at": now, "silent_s": 0.0})
    # sent just before a heartbeat (silent 1.0) and 1.9 s behind the pace: 2.9 < 3, 1.9 < 2
    jittery = assignment(job_id="jittery").model_copy(update={"submitted_at": now - 1.9, "silent_s": 1.0})
    # a worker whose loop lagged 2.1 s: one read (the leader may have returned it unlisted), then called
    lagged = assignment(job_id="lagged").model_copy(update={"submitted_at": now - 2.1, "silent_s": 0.0})
    executor = await take(worker, first, jittery, lagged)
    assert reads == ["lagged"] and executor.calls == 3
    assert worker.lateness.current == pytest.approx(0.0, abs=0.5)  # the pace is still the fastest arrival
