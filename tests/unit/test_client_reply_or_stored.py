"""How `Client.request` waits: the reply, or the stored Result when the reply may have been
lost (this connection reconnected meanwhile) or goes to another requester (a duplicate id);
an ordinary long call reads nothing until its timeout."""

from __future__ import annotations

import asyncio
import time
from types import SimpleNamespace

import pytest

from ratefleet.client import Client
from ratefleet.schemas import Result

pytestmark = pytest.mark.anyio
STORED = Result(job_id="j1", status="succeeded", tier="vip")


def client(reads: list[float]) -> Client:
    """A Client with a stand-in connection (its reconnect count) and stored-Result reader."""
    made = Client.__new__(Client)
    made.nc = SimpleNamespace(stats={"reconnects": 0}, is_connected=True)  # type: ignore[assignment]

    async def stored_result(job_id: str, batch: str | None = None, **_: object) -> Result | None:
        reads.append(time.monotonic())
        return STORED if made.nc.stats["reconnects"] else None

    made.stored_result = stored_result  # type: ignore[method-assign]
    return made


async def test_a_long_call_reads_no_stored_result_before_its_timeout():
    reads: list[float] = []
    reply = asyncio.get_running_loop().create_future()
    assert await client(reads)._reply_or_stored(reply, "j1", 2.5, duplicate=False) is None
    assert len(reads) == 1  # at the timeout only (slices at 1 s and 3 s came and went unread)


async def test_after_a_reconnect_the_stored_result_ends_the_wait_at_the_next_slice():
    reads: list[float] = []
    made = client(reads)
    loop = asyncio.get_running_loop()
    loop.call_later(0.3, made.nc.stats.__setitem__, "reconnects", 1)  # NATS came back meanwhile
    started = time.monotonic()
    got = await made._reply_or_stored(loop.create_future(), "j1", 30.0, duplicate=False)
    assert got == STORED and time.monotonic() - started < 2.0  # before: the whole 30 s


async def test_a_duplicate_reads_from_a_quarter_second_and_a_reply_still_wins():
    reads: list[float] = []
    made = client(reads)
    loop = asyncio.get_running_loop()
    reply = loop.create_future()
    loop.call_later(0.6, reply.set_result, "the reply")
    started = time.monotonic()
    assert await made._reply_or_stored(reply, "j1", 30.0, duplicate=True) == "the reply"
    assert len(reads) == 1 and reads[0] - started < 0.4  # read once, at 0.25 s; the reply at 0.6 s


async def test_a_request_with_its_own_id_reads_the_store_while_it_waits():
    """A job with its own id may be a copy the leader ended (its first message was being
    called): its answer then comes from the leader's follower of that call, which a dispatcher
    restart or the follower limits can take away. The store is read at each slice, as for a
    duplicate, but from 1 s (before: only at the timeout)."""
    reads: list[float] = []
    made = client(reads)
    stored_at = time.monotonic() + 1.5

    async def stored_result(job_id: str, batch: str | None = None, **_: object) -> Result | None:
        reads.append(time.monotonic())
        return STORED if time.monotonic() >= stored_at else None

    made.stored_result = stored_result  # type: ignore[method-assign]
    reply = asyncio.get_running_loop().create_future()
    started = time.monotonic()
    assert await made._reply_or_stored(reply, "j1", 10.0, duplicate=False, repeat=True) is STORED
    assert time.monotonic() - started < 4.0 and len(reads) == 2  # read at 1 s and 3 s
