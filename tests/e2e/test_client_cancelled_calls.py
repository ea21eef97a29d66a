"""Cancelled calls leave nothing behind: `request`s and `submit_many`s cancelled at any point
(task.cancel(), asyncio.timeout, anyio cancel scopes: an HTTP caller gone) leave no reply
future, nats-py response entry, subscription or pipeline, and the Client goes on working.
Measured on a fleet: 10,000 requests cancelled 0-50 ms in, then one answered in 10 ms. Real
nats-server, no fleet (the requests are never answered; what matters is what they leave)."""

from __future__ import annotations

import asyncio
import random

import anyio
import pytest

from ratefleet import Client, RequestTimeout
from ratefleet.runtime.streams import ensure_topology
from ratefleet.schemas.config import parse_config

pytestmark = [pytest.mark.anyio, pytest.mark.timeout(120)]
JOB = {"request": {"path": "/v1/chat/completions", "json": {"model": "m"}}}


async def test_cancelled_requests_and_submits_leave_nothing_behind(nats_server):
    async with await Client.connect(nats_server.url) as client:
        await ensure_topology(client.js, parse_config({}))
        await client.submit(JOB, "guest")  # nats-py's response subscription and the requests' own,
        await client.replies.open()  # both made once, exist before the count
        subscriptions = len(client.nc._subs)
        rng = random.Random(7)

        async def cancelled(i: int) -> None:
            after = rng.choice([0.0, 0.0005, 0.002, 0.01])
            if i % 3 == 0:
                with anyio.move_on_after(after):
                    await client.request(JOB, "guest", timeout=30)
            elif i % 3 == 1:
                with pytest.raises(TimeoutError):
                    async with asyncio.timeout(after):
                        await client.request(JOB, "guest", timeout=30)
            else:
                with pytest.raises(TimeoutError):
                    async with asyncio.timeout(after):
                        await client.submit_many([JOB] * 20, "guest")

        await asyncio.gather(*(cancelled(i) for i in range(600)))
        assert client.replies.waiting == 0
        assert not client.nc._resp_map and not client._pipes
        assert len(client.nc._subs) == subscriptions
        assert await client.submit(JOB, "guest")  # and the Client goes on working
        with pytest.raises(RequestTimeout):
            await client.request(JOB, "guest", timeout=0.5)
        assert client.replies.waiting == 0
