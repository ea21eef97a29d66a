"""A poison message: a job whose call takes its worker down every time (here: the worker is
SIGKILLed whenever it runs it, as an OOM on a huge answer would). It must end `failed` with
`poison_message` and a dead letter after streams.max_deliver deliveries, never loop, and
the fleet keeps serving other jobs."""

from __future__ import annotations

import time

import pytest
from faultkit import (
    Tracker,
    assert_exactly_once,
    assert_only_host,
    calls,
    chat,
    embed_job,
    fast_keys,
    figure,
    until,
    upstream,
    wait_exit,
    wait_workers,
)
from fleetkit import FleetKit

from ratefleet import Client

pytestmark = [pytest.mark.timeout(75), pytest.mark.anyio]

MAX_DELIVER = 3


async def test_job_that_kills_its_worker_ends_in_dead_letters(tmp_path, nats_server):
    with upstream() as mock:
        kit = FleetKit(tmp_path, nats_server.url, mock.url, keys=fast_keys(),
                       overrides={"streams": {"max_deliver": MAX_DELIVER}})
        try:
            kit.dispatcher("d1")
            async with await Client.connect(nats_server.url) as client, Tracker(nats_server.url) as tracker:
                await until(lambda: _leader(client), 20, 0.2, "a leader")
                started = time.monotonic()
                poison = await client.submit(embed_job(0, id="poison-1", mock={"sleep_ms": 9000}), "normal",
                                             batch="poison")
                kills = []
                for cycle in range(1, MAX_DELIVER):
                    worker = kit.worker(f"w{cycle}")

                    def upstream_calls(n=cycle):
                        return sum(k["calls"] for k in mock.stats()["keys"].values()) >= n

                    await until(upstream_calls, 20, 0.05, f"delivery {cycle} of the poison job reaching the upstream")
                    worker.kill()
                    kills.append(time.monotonic() - started)
                    assert await wait_exit(worker, 5) is not None
                survivor = kit.worker("w-last")
                await wait_workers(client, {"w-last"})
                await until(lambda: poison in tracker.first_seen, 25, 0.1, "a result for the poison job")
                counts = await tracker.wait_stored("poison", [poison], timeout=2)
                ended_s = time.monotonic() - started
                good = await client.submit_many([chat(i) for i in range(10)], "normal", batch="after-poison")
                assert_exactly_once(await tracker.wait_stored("after-poison", good, timeout=20), good)
                await _sleep(2.0)  # no further delivery may show up

                result = await tracker.result(poison, "poison")
                anywhere = await tracker.result(poison, "*")
                letters = [x for x in await tracker.dead_letters() if x.get("job_id") == poison]
                info = await client.js.consumer_info(client.subjects.jobs_stream, "tier-normal")
                poison_calls = calls(mock, path="/v1/embeddings")  # completed calls; arrivals below
                arrivals = sum(k["calls"] for k in mock.stats()["keys"].values()) - len(good)
                figure("poison message", max_deliver=MAX_DELIVER, worker_kills_at_s=[round(k, 1) for k in kills],
                       result_after_s=ended_s, status=result and result.status,
                       code=result and result.error and result.error.code, attempts=result and result.attempts,
                       upstream_arrivals=arrivals, dead_letters=len(letters),
                       left_in_queue=info.num_pending + info.num_ack_pending,
                       stored_as=anywhere and f"{tracker.batch_of.get(poison)}/{anywhere.job_id} {anywhere.status}")
                assert anywhere is not None, "the poison job has no result at all"
                assert_exactly_once(counts, [poison])  # in its own batch, where its producer looks
                assert result.status == "failed" and result.error.code == "poison_message", result
                assert result.attempts == MAX_DELIVER - 1  # the calls (its last delivery ended at intake)
                assert arrivals == MAX_DELIVER - 1, f"the poison job reached the upstream {arrivals} times"
                assert poison_calls <= MAX_DELIVER - 1
                assert len(letters) == 1 and letters[0]["reason"]["code"] == "poison_message"
                assert letters[0]["job"]["id"] == poison and letters[0]["attempts"] == MAX_DELIVER - 1
                assert info.num_pending == 0 and info.num_ack_pending == 0, "something is still looping"
                assert survivor.poll() is None
                assert_only_host(mock)
        finally:
            kit.stop()


async def _leader(client) -> bool:
    status = await client.status(timeout=1)
    return bool(status.get("leader"))


async def _sleep(seconds: float) -> None:
    import asyncio

    await asyncio.sleep(seconds)
