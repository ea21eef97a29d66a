"""A worker frozen (SIGSTOP: a VM pause, a swap storm) past `worker_timeout_s` does not call,
once it runs again, the jobs assigned to it while it was frozen.

The leader declares a silent worker gone after `worker_timeout_s` and gives its jobs to
another worker, which calls them and stores their Results. The assignments sent to the
frozen worker still wait in its socket; resumed, it read them and called each job again
(found by bench/soak.py, seed 203: a job called 1.3 s after its Result was stored).
"""

from __future__ import annotations

import signal

import pytest
from faultkit import (
    Tracker,
    calls,
    chat,
    fast_keys,
    restartable_nats,
    status_or_none,
    until,
    upstream,
    wait_workers,
    worker_entry,
)
from fleetkit import FleetKit

from ratefleet import Client

pytestmark = [pytest.mark.timeout(150), pytest.mark.anyio]
N = 4


async def test_a_resumed_worker_does_not_call_the_jobs_given_away_while_it_was_frozen(tmp_path):
    server = restartable_nats(tmp_path / "nats")
    url = server.url
    try:
        with upstream() as mock:
            kit = FleetKit(tmp_path, url, mock.url, keys=fast_keys())
            try:
                kit.dispatcher("d1")
                w1 = kit.worker("w1", slots=N)
                async with Tracker(url) as tracker, await Client.connect(url) as client:
                    await wait_workers(client, {"w1"})
                    w1.send_signal(signal.SIGSTOP)  # the leader still counts its N free slots for 2 s
                    try:
                        ids = await client.submit_many([chat(i) for i in range(N)], "normal", batch="frozen")

                        async def handed_to_w1():  # the leader's view: w1 holds every job
                            entry = worker_entry(await status_or_none(client), "w1")
                            return entry is not None and entry.get("in_flight") == N

                        await until(handed_to_w1, 10, 0.05, f"{N} jobs assigned to the frozen w1")
                        kit.worker("w2", slots=N)  # takes them once the leader gives up on w1
                        counts = await tracker.wait_stored("frozen", ids, 90)
                        assert set(counts) == set(ids), "w2 ran the jobs the frozen w1 held"
                        assert calls(mock) == N
                    finally:
                        w1.send_signal(signal.SIGCONT)

                    async def w1_back_and_settled():  # listed again, nothing in flight, the queue empty
                        entry = worker_entry(await status_or_none(client), "w1")
                        return entry is not None and entry.get("in_flight") == 0 and await tracker.jobs_in_stream() == 0

                    await until(w1_back_and_settled, 30, 0.2, "w1 back with nothing in flight")
                    await until(w1_back_and_settled, 30, 0.2, "w1 still settled one poll later")
                    assert calls(mock) == N, f"the resumed w1 called {calls(mock) - N} job(s) that w2 had already run"
                    assert all(n == 1 for n in (await tracker.stored("frozen")).values())
            finally:
                kit.stop()
    finally:
        server.stop()
