"""Leaving `async with Client` (an app shutting down) while calls are under way ends them at
once with an error that says the Client was closed, and closing during a NATS outage closes
quietly. Before: requests in flight waited their whole timeout (30 s by default) and then said
"no result ... it is stored and still runs"; a `submit_many` in flight retried for 39 s and
said "is the NATS server up?"; `close()` while NATS was away raised NatsUnavailable
(ConnectionReconnectingError from drain) and left the connection reconnecting. Real
nats-server, no fleet (nothing answers the requests)."""

from __future__ import annotations

import asyncio
import time

import pytest
from faultkit import restartable_nats, until

from ratefleet import Client, NatsUnavailable
from ratefleet.runtime.streams import ensure_topology
from ratefleet.schemas.config import parse_config

pytestmark = [pytest.mark.anyio, pytest.mark.timeout(120)]
JOB = {"request": {"path": "/v1/chat/completions", "json": {"model": "m"}}}


async def outcome(call) -> tuple[float, BaseException | None]:
    """(when the call ended: time.monotonic(), what it raised)."""
    try:
        await call
    except BaseException as exc:  # noqa: BLE001 - what the caller sees is the point
        return time.monotonic(), exc
    return time.monotonic(), None


async def test_closing_ends_requests_and_submits_under_way_at_once(nats_server):
    async with await Client.connect(nats_server.url) as client:
        await ensure_topology(client.js, parse_config({}))
        requests = [asyncio.ensure_future(outcome(client.request(JOB, "guest", timeout=30))) for _ in range(3)]
        batch = asyncio.ensure_future(outcome(client.submit_many([JOB] * 20_000, "guest")))
        await until(lambda: client.replies.waiting == 3, 20, interval=0.01, what="the requests waiting")

        async def some_of_the_batch_stored() -> bool:
            return (await client.js.stream_info(client.subjects.jobs_stream)).state.messages > 100

        await until(some_of_the_batch_stored, 20, interval=0.01, what="the batch under way")
        closed_at = time.monotonic()  # the block ends here: close() (the calls' own start-up is not timed:
        # on a loaded CI machine getting them under way took 11 s)
    for ended_at, error in await asyncio.gather(*requests):
        assert ended_at - closed_at < 5.0, ended_at - closed_at  # before: the whole 30 s
        assert isinstance(error, NatsUnavailable) and "this Client was closed while the request for job" in str(error)
    ended_at, error = await batch
    assert ended_at - closed_at < 5.0, ended_at - closed_at  # before: 39 s
    assert isinstance(error, NatsUnavailable) and "this Client is closed" in str(error)
    assert "of 20000 jobs stored before that" in str(error)


async def test_closing_while_nats_is_away_closes_quietly(tmp_path):
    server = restartable_nats(tmp_path / "nats")
    try:
        client = await Client.connect(server.url)
        server.stop()
        await until(lambda: not client.nc.is_connected, 10, interval=0.01, what="the client disconnected")
        await client.close()  # before: NatsUnavailable (ConnectionReconnectingError), still reconnecting
        assert client.nc.is_closed
    finally:
        server.stop()


async def test_submits_under_way_at_close_return_their_ids_as_usual(nats_server):
    """A `submit` returns once its job is stored; closing must not turn one that was about to
    return into an error. Before: 2,000 submits in flight at close all raised NatsUnavailable
    'could not be stored' after 5.1-5.3 s (nats-py's drain dropped their acknowledgements),
    though their jobs were stored."""
    async with await Client.connect(nats_server.url) as client:
        await ensure_topology(client.js, parse_config({}))
        submits = [asyncio.ensure_future(outcome(client.submit(JOB, "guest"))) for _ in range(500)]
        await until(lambda: len(client.nc._resp_map) > 0, 10, interval=0.001, what="submits waiting for acks")
        started = time.monotonic()
    closing_took = time.monotonic() - started
    outcomes = await asyncio.gather(*submits)
    assert [error for _, error in outcomes if error is not None] == []
    assert closing_took < 5.0, closing_took
    async with await Client.connect(nats_server.url) as reader:
        assert (await reader.js.stream_info(reader.subjects.jobs_stream)).state.messages == 500


async def test_a_request_or_read_racing_close_says_the_client_was_closed_at_once(nats_server):
    """A request of a job with its own id first reads the job's stored Result; a close landing
    during that read (an app shutting down as a handler starts) drained the read's response
    away. Before: the request waited the read's 5 s and then said 'NATS did not answer ...
    check that NATS runs (`ratefleet up`) and that --nats names it', though NATS was fine; a
    stored_result racing the close did the same."""
    client = await Client.connect(nats_server.url)
    await ensure_topology(client.js, parse_config({}))
    request = asyncio.ensure_future(outcome(client.request({**JOB, "id": "own-1"}, "guest", timeout=20)))
    read = asyncio.ensure_future(outcome(client.stored_result("own-2")))
    await asyncio.sleep(0)  # both started: their reads sent
    closed_at = time.monotonic()
    await client.close()
    for ended_at, error in (await request, await read):
        assert ended_at - closed_at < 2.0, ended_at - closed_at  # before: 5.0 s
        assert error is None or (isinstance(error, NatsUnavailable) and "this Client is closed" in str(error)), error
    _, error = await request
    assert isinstance(error, NatsUnavailable)  # closed before its job was sent: nothing stored
    assert (await client_for_count(nats_server.url)) == 0


async def client_for_count(url: str) -> int:
    async with await Client.connect(url) as reader:
        return (await reader.js.stream_info(reader.subjects.jobs_stream)).state.messages


async def test_closing_after_a_call_during_a_nats_outage_closes_quietly(tmp_path):
    """A call made while NATS is away leaves its bytes in nats-py's pending buffer; closing
    then wrote them to the dead socket. Before: close() (an `async with` block ending while
    NATS is away, after one failed call) raised ConnectionResetError, a nats-level error the
    Client promises never to let out, and nats-py's close stopped half way (subscriptions
    left running)."""
    server = restartable_nats(tmp_path / "nats")
    try:
        client = await Client.connect(server.url)
        server.stop()
        await until(lambda: not client.nc.is_connected, 10, interval=0.01, what="the client disconnected")
        with pytest.raises(NatsUnavailable):
            await client.status(timeout=0.5)  # its request is buffered, never sent
        await client.close()  # before: ConnectionResetError('Connection lost')
        assert client.nc.is_closed
    finally:
        server.stop()


async def test_closes_from_several_tasks_close_once_and_promptly(nats_server):
    """An app's shutdown may close its Client twice at once (`async with` ending while a signal
    handler or another task closes it too). Each close() drained the connection: nats-py ran a
    second drain of every subscription beside the first, and now and then (1 in ~12 rounds
    here) the connection's PONG never resolved the first drain's flush, which waited its 10 s:
    close took 10.0 s instead of 0.01 s. Now the closes share one closing."""
    for _ in range(12):
        client = await Client.connect(nats_server.url)
        await ensure_topology(client.js, parse_config({}))
        drains = 0
        drain = client.nc.drain

        async def counted_drain(drain=drain) -> None:
            nonlocal drains
            drains += 1
            await drain()

        client.nc.drain = counted_drain
        submits = [asyncio.ensure_future(outcome(client.submit(JOB, "guest"))) for _ in range(300)]
        request = asyncio.ensure_future(outcome(client.request(JOB, "guest", timeout=20)))
        await asyncio.sleep(0.01)
        started = time.monotonic()
        await asyncio.gather(client.close(), client.close(), client.close())
        took = time.monotonic() - started
        assert [error for _, error in await asyncio.gather(*submits) if error is not None] == []
        _, error = await request
        assert isinstance(error, NatsUnavailable)
        assert drains == 1 and client.nc.is_closed
        assert took < 5.0, took  # before: 10.0 s now and then
