"""`Client.request(timeout=T)` ends within T (plus the documented second at most to say
why) also while NATS is away: a user-facing handler that gives a request 2 s must get its
answer or RequestTimeout in about 2 s. Before: a request made during a NATS outage spent up to
30 s retrying the job's publish before its T even began (measured: timeout=5 took 15.4 s with
NATS away 12 s), and one waiting as NATS went away read the stored Result at its deadline for
up to 5 s more (timeout=5 took 10.0 s). Real nats-server, no fleet (nothing answers)."""

from __future__ import annotations

import asyncio
import time

import pytest
from faultkit import restartable_nats, until

from ratefleet import Client, RequestTimeout
from ratefleet.runtime.streams import ensure_topology
from ratefleet.schemas.config import parse_config

pytestmark = [pytest.mark.anyio, pytest.mark.timeout(120)]
JOB = {"request": {"path": "/v1/chat/completions", "json": {"model": "m"}}}
TIMEOUT_S = 2.0
SAYING_WHY_S = 1.0  # the documented 2 x WHY_TIMEOUT_S after the timeout, at most


async def timed_request(client: Client) -> tuple[float, RequestTimeout]:
    started = time.monotonic()
    with pytest.raises(RequestTimeout) as timed_out:
        await client.request(JOB, "guest", timeout=TIMEOUT_S)
    return time.monotonic() - started, timed_out.value


async def test_requests_end_within_their_timeout_while_nats_is_away(tmp_path):
    server = restartable_nats(tmp_path / "nats")
    try:
        async with await Client.connect(server.url) as client:
            await ensure_topology(client.js, parse_config({}))
            waiting = asyncio.ensure_future(timed_request(client))  # stored, waiting for a Result (no fleet)
            await until(lambda: client.replies.waiting == 1, 10, interval=0.01, what="the request waiting")
            server.stop()
            await until(lambda: not client.nc.is_connected, 10, interval=0.01, what="the client disconnected")
            took, error = await timed_request(client)  # made during the outage: its publish cannot be confirmed
            assert took < TIMEOUT_S + SAYING_WHY_S, took  # before: 30 s of publish retries, then the wait
            assert error.reason == "nats_unavailable" and error.job_id and error.job_id in str(error)
            took, error = await waiting
            assert took < TIMEOUT_S + SAYING_WHY_S, took  # before: + 5 s reading the stored Result
            assert error.reason == "nats_unavailable"
            server.start()
            await until(lambda: client.nc.is_connected, 30, what="the client reconnected")
    finally:
        server.stop()


async def test_a_timeout_too_short_to_store_the_job_does_not_blame_nats(nats_server):
    # the reason "nats_unavailable" is for a connection away; a connected one merely ran out of time
    async with await Client.connect(nats_server.url) as client:
        await ensure_topology(client.js, parse_config({}))
        with pytest.raises(RequestTimeout) as timed_out:
            await client.request(JOB, "guest", timeout=0.0001)
        assert timed_out.value.reason is None and "away" not in str(timed_out.value)
