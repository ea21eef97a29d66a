"""An assignment held up on the way to a worker (a stalled network path, a frozen server of a
cluster) does not call a job that another worker ran meanwhile.

Worker w1 reaches NATS through a relay that the test holds (faultkit.PausableProxy): its
heartbeats stop reaching the leader, and the assignments the leader sends it wait. The leader
gives w1 up after worker_timeout_s and w2 runs the jobs. When the path opens again, w1 reads
the held assignments, late by the time the path was held; w1 itself never stopped, so it did
not know, and it called each job again (bench/soak.py --cluster, seed 302: 7 jobs called
after their Result was stored). It now looks up the stored Result of an assignment that
arrives late enough to have been given away (later than worker_timeout_s less the silence the
leader had seen when it sent it, `silent_s`, or later than UNLISTED_LOST_S) and answers with it
instead.
"""

from __future__ import annotations

import pytest
from faultkit import (
    PausableProxy,
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


def kit_for(tmp_path, name: str, url: str, upstream_url: str) -> FleetKit:
    folder = tmp_path / name  # each kit writes its own ratefleet.toml
    folder.mkdir()
    return FleetKit(folder, url, upstream_url, keys=fast_keys())


async def test_assignments_held_on_the_way_do_not_call_jobs_run_elsewhere(tmp_path):
    server = restartable_nats(tmp_path / "nats")
    url = server.url
    proxy = await PausableProxy(int(url.rsplit(":", 1)[1])).start()
    try:
        with upstream() as mock:
            main = kit_for(tmp_path, "main", url, mock.url)
            held = kit_for(tmp_path, "held", proxy.url, mock.url)
            try:
                main.dispatcher("d1")
                held.worker("w1", slots=N)
                async with Tracker(url) as tracker, await Client.connect(url) as client:
                    await wait_workers(client, {"w1"})
                    proxy.pause()
                    try:
                        ids = await client.submit_many([chat(i) for i in range(N)], "normal", batch="held")

                        async def handed_to_w1():
                            entry = worker_entry(await status_or_none(client), "w1")
                            return entry is not None and entry.get("in_flight") == N

                        await until(handed_to_w1, 10, 0.05, f"{N} jobs assigned to w1 behind the held path")
                        main.worker("w2", slots=N)
                        counts = await tracker.wait_stored("held", ids, 90)
                        assert set(counts) == set(ids), "w2 ran the jobs held for w1"
                        assert calls(mock) == N
                    finally:
                        proxy.resume()

                    async def w1_back_and_settled():
                        entry = worker_entry(await status_or_none(client), "w1")
                        return entry is not None and entry.get("in_flight") == 0 and await tracker.jobs_in_stream() == 0

                    await until(w1_back_and_settled, 30, 0.2, "w1 back with nothing in flight")
                    await until(w1_back_and_settled, 30, 0.2, "w1 still settled one poll later")
                    assert calls(mock) == N, f"w1 called {calls(mock) - N} job(s) that w2 had already run"
                    assert all(n == 1 for n in (await tracker.stored("held")).values())
            finally:
                main.stop()
                held.stop()
    finally:
        await proxy.close()
        server.stop()
