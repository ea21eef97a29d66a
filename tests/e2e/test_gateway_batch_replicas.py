"""Two gateway replicas and the Batch API: one runner per batch at a time (a lease in the
batch record), and a batch whose gateway is killed is taken over by the other replica.

Real processes: nats-server, the mock upstream, a dispatcher, a worker and two
`ratefleet gateway` processes; the official `openai` SDK as the client."""

from __future__ import annotations

import io
import json
import signal
import time

import anyio
import pytest
from fleetkit import mock_keys, wait_for_leader
from gatewaykit import start_gateway
from test_gateway_batch_api import chat_line, fleet, jsonl, sdk, wait_status

from ratefleet import Client
from ratefleet.mock import MockSettings, running_mock

pytestmark = [pytest.mark.timeout(180), pytest.mark.anyio]


@pytest.fixture
def upstream():
    settings = MockSettings(keys=mock_keys(rps=200, burst=20), accept_unknown=False, tokens_per_call=100)
    with running_mock(settings) as mock:
        yield mock


@pytest.fixture
def two_gateways(tmp_path, nats_server, upstream, monkeypatch):
    """One key of 2 calls/s, so a 24-line batch stays in progress ~12 s; gateway A started."""
    kit = fleet(tmp_path, nats_server, upstream, monkeypatch, keys=[{"id": "k1", "rps": 2, "burst": 1}], window=4)
    try:
        yield kit
    finally:
        kit.stop()


def log_of(kit, name: str) -> str:
    return (kit.tmp / f"{name}.log").read_text(errors="replace")


async def create_batch(kit, lines: list) -> str:
    async with sdk(kit) as ai:
        uploaded = await ai.files.create(file=("in.jsonl", io.BytesIO(jsonl(lines))), purpose="batch")
        batch = await ai.batches.create(input_file_id=uploaded.id, endpoint="/v1/chat/completions",
                                        completion_window="24h")
        await wait_status(ai, batch.id, {"in_progress"})
        return batch.id


async def finish(kit, batch_id: str) -> tuple:
    async with sdk(kit) as ai:
        done, _ = await wait_status(ai, batch_id, {"completed", "failed", "cancelled"}, timeout=120)
        output = [json.loads(line) for line in (await ai.files.content(done.output_file_id)).text.splitlines()]
        names = [f.filename for f in (await ai.files.list()).data]
    return done, output, names


async def test_a_replica_started_while_a_batch_runs_leaves_it_to_its_runner(two_gateways, nats_server, upstream):
    kit = two_gateways
    lines = [chat_line(f"r{i}", f"n{i}") for i in range(24)]
    async with await Client.connect(nats_server.url) as client:
        await wait_for_leader(client)
        batch_id = await create_batch(kit, lines)
    # B starts while A runs the batch: before the lease, B resumed it too and both finalized it
    kit.gateway_url = start_gateway(kit, name="gateway_b")
    done, output, names = await finish(kit, batch_id)
    await anyio.sleep(1.0)  # a second runner would finalize a moment later
    finished = [line for line in kit.logs().splitlines() if "batch finished" in line and batch_id in line]
    assert done.status == "completed" and done.request_counts.completed == 24
    assert [o["custom_id"] for o in output] == [f"r{i}" for i in range(24)]
    assert len(finished) == 1, finished
    assert names.count(f"{batch_id}_output.jsonl") == 1, names
    ran = ("resuming batch", "taking over batch", "batch submitted", "batch finished")
    assert not [line for line in log_of(kit, "gateway_b").splitlines()
                if batch_id in line and any(event in line for event in ran)]  # B answered, never ran it
    assert sum(key["calls"] for key in upstream.stats()["keys"].values()) == 24


async def test_the_other_replica_takes_over_a_batch_whose_gateway_was_killed(two_gateways, nats_server, upstream):
    kit = two_gateways
    lines = [chat_line(f"r{i}", f"n{i}") for i in range(24)]
    async with await Client.connect(nats_server.url) as client:
        await wait_for_leader(client)
        batch_id = await create_batch(kit, lines)
        url_b = start_gateway(kit, name="gateway_b")
        await anyio.sleep(2.0)
        gateway_a = next(p for p in kit.processes if p.name == "gateway")
        gateway_a.send_signal(signal.SIGKILL)  # a crash: the lease is not given up
        gateway_a.wait(10)
        killed_at = time.time()
    kit.gateway_url = url_b
    done, output, names = await finish(kit, batch_id)
    assert "taking over batch" in log_of(kit, "gateway_b")
    assert done.status == "completed" and done.completed_at >= int(killed_at)
    assert done.request_counts.completed == 24
    assert [o["custom_id"] for o in output] == [f"r{i}" for i in range(24)]
    assert names.count(f"{batch_id}_output.jsonl") == 1, names
    assert sum(key["calls"] for key in upstream.stats()["keys"].values()) == 24  # no line paid twice
