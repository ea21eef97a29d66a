"""Removing JetStream messages without a secure erase (runtime/streams.py `delete_message`),
against a real nats-server. nats-py's `delete_msg` sends no `no_erase`, so the server overwrote
each message in its file store before removing it: 5.4 ms a delete against 0.28 ms here
(bench/stream_delete.py), and cancelling a gateway batch of 4,000 queued jobs took 9-15 s at
load 18 (0.76 s now). The tests watch the API requests the code sends (a core subscription on
the API subject sees each request as the server does)."""

from __future__ import annotations

import json
import types

import anyio
import nats
import pytest
from nats.js.errors import APIError, NotFoundError

from ratefleet import Client
from ratefleet.dlq import replay_dead
from ratefleet.gateway.batch_runner import BatchRunner
from ratefleet.runtime.streams import delete_message, ensure_topology
from ratefleet.schemas.config import parse_config

pytestmark = pytest.mark.anyio


async def _watch_deletes(url: str):
    """A connection and the list every STREAM.MSG.DELETE request body lands in."""
    watcher = await nats.connect(url)
    seen: list[dict] = []

    async def on_request(msg):
        seen.append(json.loads(msg.data))

    await watcher.subscribe("$JS.API.STREAM.MSG.DELETE.>", cb=on_request)
    await watcher.flush()
    return watcher, seen


async def test_delete_message_removes_it_without_erasing_and_a_missing_one_is_refused(nats_server):
    nc = await nats.connect(nats_server.url)
    watcher, seen = await _watch_deletes(nats_server.url)
    try:
        js = nc.jetstream()
        await js.add_stream(name="T", subjects=["t.>"])
        acks = [await js.publish("t.x", f"{i}".encode()) for i in range(3)]
        await delete_message(js, "T", acks[1].seq)
        assert (await js.stream_info("T")).state.messages == 2
        assert (await js.get_msg("T", acks[0].seq)).data == b"0"
        with pytest.raises(NotFoundError):
            await js.get_msg("T", acks[1].seq)
        with pytest.raises(APIError, match="not found"):  # 400, err_code 10043 'sequence N not found'
            await delete_message(js, "T", acks[1].seq)
        await watcher.flush()
        assert seen and all(body == {"seq": acks[1].seq, "no_erase": True} for body in seen), seen
    finally:
        await watcher.close()
        await nc.close()


async def test_a_stopped_batch_and_a_replayed_letter_are_deleted_without_erasing(nats_server):
    watcher, seen = await _watch_deletes(nats_server.url)
    try:
        async with await Client.connect(nats_server.url) as client:
            await ensure_topology(client.js, parse_config({}))
            jobs = [{"id": f"j{i}", "batch": "B" if i % 2 else "other",
                     "request": {"method": "POST", "path": "/v1/chat/completions", "json": {"model": "m"}}}
                    for i in range(600)]  # more than one STOP_WINDOW of reads
            await client.submit_many(jobs, "normal")
            runner = types.SimpleNamespace(client=client, stop_wait_s=5, poll_s=0.1)  # what _stop_queued reads
            await BatchRunner._stop_queued(runner, "B", "normal", types.SimpleNamespace(first_seq=1))
            info = await client.js.stream_info(client.subjects.jobs_stream)
            assert info.state.messages == 300  # every job of B gone (none was taken: no dispatcher), others kept
            left = [await client.queued_job(seq) for seq in range(1, 601)]
            assert {job.batch for job in left if job is not None} == {"other"}

            letter = {"job_id": "dead-1", "tier": "normal", "attempts": 5,
                      "reason": {"code": "attempts_exhausted", "message": "gave up"}, "job": jobs[0]}
            await client.js.publish(client.subjects.dead("normal"), json.dumps(letter).encode())
        replayed = await replay_dead(nats_server.url, "ratefleet", None, "dead-1", purge=True)
        assert [original for original, _ in replayed] == ["dead-1"]
        with anyio.fail_after(5):
            while len(seen) < 301:
                await anyio.sleep(0.05)
        assert len(seen) == 301 and all(body.get("no_erase") is True for body in seen), seen[:3]
    finally:
        await watcher.close()
