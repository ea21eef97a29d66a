"""The fleet on a real three-server JetStream cluster (loopback, routes, a store dir each)
with every stream, KV bucket and object store at `streams.replicas = 3`; dispatchers and
workers get the servers as one comma-separated `[nats] url`.

The kill test SIGKILLs one server mid-batch and brings it back with its store after 3 s,
in two variants: the server that leads RATEFLEET_JOBS (the work queue's deliveries and acks
are sequenced there: its death forces a stream and consumer leader election while jobs are
pulled, acked and stored), and the server the leader dispatcher is connected to (its
assignments, the workers' reports and its lease renewals stop until it has moved to another
server; the lease may lapse and the standby take over).
"""

from __future__ import annotations

import asyncio
import time
from collections import defaultdict

import pytest
from aiohttp import web
from clusterkit import NatsCluster, server_of, stream_leader, wait_jetstream_ready
from faultkit import Tracker, assert_exactly_once, fast_keys, figure, until, wait_workers
from fleetkit import FleetKit

from ratefleet import Client
from ratefleet.schemas import Subjects

pytestmark = [pytest.mark.timeout(150), pytest.mark.anyio]

SUBJECTS = Subjects()
SLOTS = 12  # per worker; two workers
ANSWER = {"id": "c", "object": "chat.completion", "usage": {"total_tokens": 3},
          "choices": [{"index": 0, "message": {"role": "assistant", "content": "ok"}}]}


class CountingUpstream:
    """A real HTTP upstream (aiohttp.web, this process) answering 200 after `latency_s`,
    counting the calls per job id (the job puts its id in the request body)."""

    def __init__(self, latency_s: float) -> None:
        self.latency_s = latency_s
        self.calls: dict[str, list[float]] = defaultdict(list)  # job id -> monotonic call starts
        self.runner: web.AppRunner | None = None
        self.url = ""

    async def _handle(self, request: web.Request) -> web.Response:
        body = await request.json()
        self.calls[body.get("job", "?")].append(time.monotonic())
        await asyncio.sleep(self.latency_s)
        return web.json_response(ANSWER)

    async def __aenter__(self) -> CountingUpstream:
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", self._handle)
        self.runner = web.AppRunner(app)
        await self.runner.setup()
        site = web.TCPSite(self.runner, "127.0.0.1", 0)
        await site.start()
        self.url = "http://127.0.0.1:%d" % site._server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *exc) -> None:
        await self.runner.cleanup()


def job(job_id: str) -> dict:
    return {"id": job_id, "request": {"method": "POST", "path": "/v1/chat/completions",
                                      "json": {"model": "m", "job": job_id, "messages": []}}}


@pytest.fixture
def cluster(tmp_path):
    nats_cluster = NatsCluster(tmp_path / "cluster").start()
    try:
        yield nats_cluster
    finally:
        nats_cluster.stop()


def r3_fleet(tmp_path, cluster: NatsCluster, upstream_url: str) -> FleetKit:
    kit = FleetKit(tmp_path, cluster.url, upstream_url, keys=fast_keys(rps=500, burst=50),
                   overrides={"streams": {"ack_wait_s": 10, "replicas": 3},
                              "dispatcher": {"lease_ttl_s": 3.0, "worker_timeout_s": 3.0}})
    kit.dispatcher("d1")
    kit.dispatcher("d2")
    kit.worker("w1", slots=SLOTS)
    kit.worker("w2", slots=SLOTS)
    return kit


async def replicas_by_stream(js) -> dict[str, int]:
    """{stream name: replicas} of every stream on the cluster (KV_* and OBJ_* included)."""
    return {info.config.name: info.config.num_replicas for info in await js.streams_info()}


async def test_fleet_runs_on_an_r3_cluster_with_every_store_replicated(tmp_path, cluster):
    await wait_jetstream_ready(cluster.urls)
    async with CountingUpstream(latency_s=0.02) as upstream:
        kit = r3_fleet(tmp_path, cluster, upstream.url)
        try:
            async with await Client.connect(cluster.url) as client:
                await wait_workers(client, {"w1", "w2"}, timeout=60)
                ids = await client.submit_many([job(f"a{i}") for i in range(60)], "normal", batch="r3")
                async with Tracker(cluster.urls) as tracker:
                    counts = await tracker.wait_stored("r3", ids, timeout=60)
                    assert_exactly_once(counts, ids)
                    replicas = await replicas_by_stream(tracker.js)
            assert all(len(upstream.calls[i]) == 1 for i in ids)
            wanted = {SUBJECTS.jobs_stream, SUBJECTS.results_stream, SUBJECTS.dead_stream,
                      f"KV_{SUBJECTS.leader_bucket}", f"KV_{SUBJECTS.leader_bucket}_seen",
                      f"KV_{SUBJECTS.handbacks_bucket}", f"KV_{SUBJECTS.keys_bucket}",
                      f"KV_{SUBJECTS.config_bucket}", f"OBJ_{SUBJECTS.bodies_bucket}"}
            assert wanted <= set(replicas), sorted(wanted - set(replicas))
            assert {name: n for name, n in replicas.items() if n != 3} == {}, replicas
        finally:
            kit.stop()


async def pick_victim(kit: FleetKit, cluster: NatsCluster, client: Client, js, which: str) -> str:
    if which == "jobs-leader":
        return await stream_leader(js, SUBJECTS.jobs_stream)
    leader = (await client.status(timeout=5))["leader"]
    proc = next(p for p in kit.processes if p.name == leader)
    return server_of(cluster, proc.pid)


@pytest.mark.parametrize("which", ["jobs-leader", "leader-dispatcher-server"])
async def test_killing_a_server_mid_batch_loses_nothing(tmp_path, cluster, which):
    n = 300
    await wait_jetstream_ready(cluster.urls)
    async with CountingUpstream(latency_s=0.1) as upstream:
        kit = r3_fleet(tmp_path, cluster, upstream.url)
        try:
            async with Tracker(cluster.urls) as tracker:
                async with await Client.connect(cluster.url) as client:
                    await wait_workers(client, {"w1", "w2"}, timeout=60)
                    ids = await client.submit_many([job(f"j{i}") for i in range(n)], "normal", batch="kill")
                    await until(lambda: tracker.seen(ids) >= 60, 40, 0.05, "60 results before the kill")
                    victim = await pick_victim(kit, cluster, client, tracker.js, which)
                assert victim in cluster.servers, victim
                jobs_leader = await stream_leader(tracker.js, SUBJECTS.jobs_stream)
                done_before = tracker.seen(ids)
                killed_at = time.monotonic()
                cluster.kill(victim)
                await asyncio.sleep(3.0)
                cluster.restart(victim)
                up_at = time.monotonic()

                counts = await tracker.wait_stored("kill", ids, timeout=75)
                all_done_s = time.monotonic() - killed_at
                assert_exactly_once(counts, ids)
                results = await tracker.results(ids, "kill")
                assert all(r.status == "succeeded" for r in results.values()), \
                    sorted({(r.status, r.error.code if r.error else None) for r in results.values()})
            assert all(p.poll() is None for p in kit.processes), \
                {p.name: p.returncode for p in kit.processes if p.poll() is not None}

            calls = {i: upstream.calls.get(i, []) for i in ids}
            assert all(calls.values()), [i for i, c in calls.items() if not c][:5]
            twice = {i: c for i, c in calls.items() if len(c) > 1}
            # a call again only for a job whose first call was under way when the server died
            # (its result or ack could not be stored); at most one slot's worth per worker slot
            assert len(twice) <= 2 * SLOTS, {i: len(c) for i, c in twice.items()}
            assert all(len(c) == 2 and c[0] <= up_at for c in twice.values()), \
                {i: [round(t - killed_at, 2) for t in c] for i, c in twice.items()}
            after = sorted(t for t in tracker.first_seen.values() if t > killed_at)
            figure(f"server killed ({which})", victim=victim, victim_led_jobs=victim == jobs_leader, jobs=n,
                   done_before=done_before,
                   downtime_s=up_at - killed_at, kill_to_next_result_s=(after[0] - killed_at) if after else None,
                   kill_to_all_results_s=all_done_s, calls=sum(len(c) for c in calls.values()),
                   jobs_called_twice=len(twice))
        finally:
            kit.stop()
