"""A job travels producer -> JetStream -> dispatcher -> worker -> upstream -> result,
over a real nats-server, real worker/dispatcher processes and a real HTTP upstream."""

from __future__ import annotations

import json

import nats
import pytest
from fleetkit import SECRETS, FleetKit, chat_job, collect, mock_keys, wait_for_leader

from ratefleet import Client
from ratefleet.mock import MockSettings, running_mock
from ratefleet.schemas import Result, Subjects

pytestmark = [pytest.mark.timeout(120), pytest.mark.anyio]


@pytest.fixture
def upstream():
    with running_mock(MockSettings(keys=mock_keys(rps=200, burst=20, ids=("k1", "k2")), accept_unknown=False)) as mock:
        yield mock


@pytest.fixture
def fleet(tmp_path, nats_server, upstream):
    kit = FleetKit(tmp_path, nats_server.url, upstream.url,
                   keys=[{"id": "k1", "rps": 150, "burst": 10}, {"id": "k2", "rps": 150, "burst": 10}])
    kit.dispatcher("d1")
    kit.worker("w1")
    kit.worker("w2")
    yield kit
    kit.stop()


async def test_batch_of_200_gets_200_results_each_job_once(fleet, nats_server, upstream):
    async with await Client.connect(nats_server.url) as client:
        await wait_for_leader(client)
        ids = await client.submit_many([chat_job(i) for i in range(200)], "normal", batch="b200")
        assert len(set(ids)) == 200
        results = await collect(client, "b200", 200, timeout=60)
        assert set(results) == set(ids)
        assert all(r.status == "succeeded" for r in results.values()), {r.status for r in results.values()}
        first = next(iter(results.values()))
        assert first.response.json_body["choices"][0]["message"]["content"].startswith("echo: hello")
        assert first.key_id in ("k1", "k2") and first.worker in ("w1", "w2") and first.attempts == 1
        info = await client.js.stream_info(client.subjects.results_stream, subjects_filter="ratefleet.results.b200.*")
        assert info.state.messages == 200  # exactly one stored Result per job
    stats = upstream.stats()
    assert sum(k["calls"] for k in stats["keys"].values()) == 200
    assert sum(k["rate_limited"] for k in stats["keys"].values()) == 0


async def test_request_reply_from_client_and_from_raw_nats(fleet, nats_server):
    async with await Client.connect(nats_server.url) as client:
        await wait_for_leader(client)
        result = await client.request(chat_job(1), "vip", timeout=20)
        assert result.ok and result.tier == "vip"
        assert result.timings.total_ms is not None and result.timings.upstream_ms is not None

    raw = await nats.connect(nats_server.url)
    try:
        reply = await raw.request("ratefleet.rpc.premium", json.dumps(chat_job(2, id="raw-1")).encode(), timeout=20)
        answer = Result.from_json(reply.data)
        assert answer.job_id == "raw-1" and answer.status == "succeeded" and answer.tier == "premium"
        # the job was stored durably first: its result is in the stream too
        stored = await raw.jetstream().get_last_msg("RATEFLEET_RESULTS", Subjects().results(None, "raw-1"))
        assert Result.from_json(stored.data).job_id == "raw-1"
        # a bad job over rpc gets an `invalid` reply, and the fleet keeps serving
        bad = await raw.request("ratefleet.rpc.vip", b"not json at all", timeout=20)
        assert Result.from_json(bad.data).status == "invalid"
        unknown = await raw.request("ratefleet.rpc.platinum", json.dumps(chat_job(3)).encode(), timeout=20)
        assert Result.from_json(unknown.data).error.code == "unknown_tier"
    finally:
        await raw.close()


async def test_results_can_be_collected_after_the_fact(fleet, nats_server):
    async with await Client.connect(nats_server.url) as client:
        await wait_for_leader(client)
        ids = await client.submit_many([chat_job(i) for i in range(30)], "guest", batch="later")
        await collect(client, "later", 30, timeout=30)
    # a new client, after everything finished, reads the whole batch without following
    async with await Client.connect(nats_server.url) as late:
        collected = [r async for r in late.results("later")]
        assert sorted(r.job_id for r in collected) == sorted(ids)
        one = await late.stored_result(ids[0])
        assert one is not None and one.batch == "later"


async def test_secrets_never_reach_logs_or_results(fleet, nats_server):
    async with await Client.connect(nats_server.url) as client:
        await wait_for_leader(client)
        await client.submit_many([chat_job(i) for i in range(10)], "normal", batch="sec")
        results = await collect(client, "sec", 10, timeout=30)
        status = await client.status()
    blob = fleet.logs() + json.dumps(status) + "".join(r.model_dump_json() for r in results.values())
    assert len(results) == 10
    for secret in SECRETS.values():
        assert secret not in blob
