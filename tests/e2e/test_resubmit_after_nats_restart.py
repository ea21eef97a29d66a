"""A job sent again with its own id after a NATS restart is not called (paid) again.

JetStream's dedup (Nats-Msg-Id) forgets, when the server restarts, the ids of messages it
no longer holds: a JOBS message acked (done) before the restart is gone, so the same id sent
again after it is stored as a new message, inside duplicate_window_s. A producer does exactly
that when `submit_many` raised during the outage ("N of M stored"; retry with the same ids).
The job already has its Result: the fleet must answer with it, not call the upstream again.
"""

from __future__ import annotations

import pytest
from faultkit import Tracker, calls, chat, fast_keys, restartable_nats, until, upstream, wait_workers
from fleetkit import FleetKit

from ratefleet import Client

pytestmark = [pytest.mark.timeout(120), pytest.mark.anyio]


@pytest.mark.parametrize("how", ["sigkill", "sigterm"])
async def test_a_done_job_sent_again_after_a_nats_restart_is_not_called_again(tmp_path, how):
    server = restartable_nats(tmp_path / "nats")
    url = server.url
    try:
        with upstream() as mock:
            kit = FleetKit(tmp_path, url, mock.url, keys=fast_keys())
            try:
                kit.dispatcher("d1")
                kit.worker("w1", slots=4)
                jobs = [chat(i, id=f"again-{i}") for i in range(5)]
                async with Tracker(url) as tracker:
                    async with await Client.connect(url) as client:
                        await wait_workers(client, {"w1"})
                        ids = await client.submit_many(jobs, "normal", batch="again")
                    counts = await tracker.wait_stored("again", ids, 30)
                    assert set(counts) == set(ids)
                    await until(lambda: calls(mock) == 5, 10, what="5 upstream calls")
                    server.kill() if how == "sigkill" else server.stop()
                    server.start()
                    async with await Client.connect(url) as client:
                        await wait_workers(client, {"w1"}, timeout=40)
                        await client.submit_many(jobs, "normal", batch="again")  # the producer's retry
                        extra = await client.submit(chat(99, id="again-new"), "normal", batch="again")
                    counts = await tracker.wait_stored("again", [*ids, extra], 30)
                    assert counts.get(extra) == 1, "the new job ran"
                    # every message sent again is done (acked) too: a call it made is in the log by now
                    async def jobs_stream_empty() -> bool:
                        return await tracker.jobs_in_stream() == 0

                    await until(jobs_stream_empty, 30, what="JOBS stream empty")
                    assert calls(mock) == 6, f"{calls(mock) - 6} job(s) with a stored Result were called again"
                    assert all(counts[i] == 1 for i in ids)
            finally:
                kit.stop()
    finally:
        server.stop()
