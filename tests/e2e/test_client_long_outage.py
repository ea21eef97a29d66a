"""A Client embedded in a long-lived service outlives a NATS outage of any length, and a
closed Client says so at once. Before: `Client.connect` gave up reconnecting after 60 tries
(~30 s down) and closed its connection for good; a service whose NATS was away 45 s then had
every `request` and `submit` wait 30 s and fail with "is the NATS server up?" while it was up
again (measured: 29-30 s per call, for the rest of the process's life). A call on a closed
Client (after `close()`, or one that gave up) retried for 30 s the same way, and
`stored_result` answered None ("no Result yet"). Real nats-server, stopped and restarted."""

from __future__ import annotations

import asyncio
import time

import anyio
import pytest
from faultkit import restartable_nats, until

from ratefleet import Client, NatsUnavailable
from ratefleet.runtime import connect as connect_module
from ratefleet.runtime.streams import ensure_topology
from ratefleet.schemas.config import parse_config

pytestmark = [pytest.mark.anyio, pytest.mark.timeout(120)]
JOB = {"request": {"path": "/v1/chat/completions", "json": {"model": "m"}}}


async def test_a_client_outlives_an_outage_longer_than_a_giving_up_connection_lasts(tmp_path, monkeypatch):
    monkeypatch.setattr(connect_module, "GIVE_UP_ATTEMPTS", 2)  # a giving-up connection: closed after ~1 s down
    server = restartable_nats(tmp_path / "nats")
    try:
        service = await Client.connect(server.url)  # as an application connects: the defaults
        cli_like = await Client.connect(server.url, reconnect_forever=False)
        await ensure_topology(service.js, parse_config({}))
        server.stop()
        await until(lambda: cli_like.nc.is_closed, 30, what="the giving-up connection closed")
        server.start()
        with anyio.fail_after(20):  # before: closed too, 30 s of retries, then SubmitError
            assert await service.submit(JOB, "guest")
        started = time.monotonic()
        with pytest.raises(NatsUnavailable, match="this Client is closed .*reconnect_forever=False"):
            await cli_like.submit(JOB, "guest")
        assert time.monotonic() - started < 1.0  # before: 30 s of retries on a connection that never reopens
        await service.close()
        await cli_like.close()
    finally:
        server.stop()


async def test_every_call_on_a_closed_client_fails_at_once_saying_so(nats_server):
    client = await Client.connect(nats_server.url)
    await ensure_topology(client.js, parse_config({}))
    async with client:
        job_id = await client.submit(JOB, "guest")
    calls = {
        "submit": lambda: client.submit(JOB, "guest"),
        "submit_many": lambda: client.submit_many([JOB], "guest"),
        "request": lambda: client.request(JOB, "guest", timeout=5),
        "stored_result": lambda: client.stored_result(job_id),  # before: None, as if there were no Result yet
        "status": lambda: client.status(timeout=1),
    }
    for name, call in calls.items():
        started = time.monotonic()
        with pytest.raises(NatsUnavailable, match=r"this Client is closed \(Client.close\(\) was called"):
            await call()
        assert time.monotonic() - started < 1.0, name
    with pytest.raises(NatsUnavailable, match="this Client is closed"):
        async for _ in client.results(None):
            pass


async def test_a_client_reconnects_through_a_server_that_answers_before_it_speaks_nats(tmp_path):
    """A nightly-batch trial: after nats-server was SIGKILLed and `up` restarted it, every later
    `request` of a service's Client timed out for good, and `submit --wait` hung. A reconnect try
    that reached the server while it was still starting (TCP accepted, no NATS handshake) failed
    inside nats-py's own handshake, and our error callback took it for the first connect and
    ended nats-py's reconnect task (raising from it): nothing ever tried again."""
    server = restartable_nats(tmp_path / "nats")
    port = int(server.url.rsplit(":", 1)[1])

    async def hang_up(reader, writer) -> None:  # a server not yet speaking NATS: accepts, then closes
        writer.close()

    try:
        for client in (await Client.connect(server.url), await Client.connect(server.url, reconnect_forever=False)):
            async with client:
                await ensure_topology(client.js, parse_config({}))
                server.stop()
                starting = await asyncio.start_server(hang_up, "127.0.0.1", port)
                await anyio.sleep(2.5)  # several reconnect tries meet it (0.5 s apart)
                starting.close()
                await starting.wait_closed()
                server.start()
                await until(lambda c=client: c.nc.is_connected, 30, what="reconnected")  # before: never
                with anyio.fail_after(30):
                    assert await client.submit(JOB, "guest")
    finally:
        server.stop()
