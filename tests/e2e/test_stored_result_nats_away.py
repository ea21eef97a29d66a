"""`Client.stored_result` while NATS is away raises NatsUnavailable instead of answering None
("no Result yet"): a service polling for a job's Result during an outage concluded there was
none (before: None after the read's 5 s timeout, the same answer as for a job still running).
A job that has no Result still gets None, as does an unknown id. Real nats-server, no fleet."""

from __future__ import annotations

import time

import pytest
from faultkit import restartable_nats, until

from ratefleet import Client, NatsUnavailable
from ratefleet.runtime.streams import ensure_topology
from ratefleet.schemas.config import parse_config

pytestmark = [pytest.mark.anyio, pytest.mark.timeout(120)]
JOB = {"request": {"path": "/v1/chat/completions", "json": {"model": "m"}}}


async def test_a_lookup_nats_cannot_answer_is_an_error_not_none(tmp_path):
    server = restartable_nats(tmp_path / "nats")
    try:
        async with await Client.connect(server.url) as client:
            await ensure_topology(client.js, parse_config({}))
            job_id = await client.submit(JOB, "guest")
            assert await client.stored_result(job_id) is None  # stored, no Result yet
            assert await client.stored_result("no-such-job") is None
            server.stop()
            await until(lambda: not client.nc.is_connected, 10, interval=0.01, what="the client disconnected")
            started = time.monotonic()
            with pytest.raises(NatsUnavailable, match="reading a stored result"):
                await client.stored_result(job_id)
            assert time.monotonic() - started < 10.0
            server.start()
            await until(lambda: client.nc.is_connected, 30, what="the client reconnected")
    finally:
        server.stop()
