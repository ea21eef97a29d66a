"""A flush that times out while the NATS server stalls leaves the connection working
(ratefleet/runtime/connect.py `flush`). nats-py 2.16's own `nc.flush(timeout)` does not: its
late PONG kills the read loop while the client still says it is connected, and a leader
that stepped down during a 20 s stall read nothing for about 5 minutes (a break-it trial).
Real nats-server, stalled with SIGSTOP."""

from __future__ import annotations

import asyncio
import os
import signal
from pathlib import Path

import nats
import pytest

from ratefleet.runtime.connect import connect, flush

pytestmark = [pytest.mark.anyio, pytest.mark.timeout(60)]


async def stopped(pid: int) -> None:
    """Wait (bounded) until every thread of `pid` is stopped (state T), as SIGSTOP takes a moment."""
    for _ in range(200):
        states = {Path(f"/proc/{pid}/task/{tid}/stat").read_text().rsplit(")", 1)[1].split()[0]
                  for tid in os.listdir(f"/proc/{pid}/task")}
        if states == {"T"}:
            return
        await asyncio.sleep(0.01)


async def received_after_a_stalled_flush(server, flusher) -> list[bytes]:
    nc = await connect(server.url, name="t")
    got: list[bytes] = []

    async def on_msg(msg) -> None:
        got.append(msg.data)

    await nc.subscribe("t.after", cb=on_msg)
    await nc.flush()
    os.kill(server.process.pid, signal.SIGSTOP)  # the server stalls: no PONG
    try:
        await stopped(server.process.pid)
        with pytest.raises(nats.errors.FlushTimeoutError):
            await flusher(nc)
    finally:
        os.kill(server.process.pid, signal.SIGCONT)  # the PONG arrives late
    await asyncio.sleep(0.5)
    other = await nats.connect(server.url)
    await other.publish("t.after", b"still reading")
    await other.flush()
    for _ in range(40):
        if got:
            break
        await asyncio.sleep(0.05)
    await other.close()
    await nc.close()
    return got


async def test_a_flush_that_times_out_leaves_the_connection_reading(nats_server):
    assert await received_after_a_stalled_flush(nats_server, lambda nc: flush(nc, 0.5)) == [b"still reading"]


async def test_the_leaders_step_down_flush_leaves_the_connection_reading(nats_server):
    # the call site that stalled a dispatcher: the leader bus's flush at step-down
    # (with nats-py's nc.flush(timeout) here, nothing more is read: this test fails)
    from ratefleet.dispatcher.shell.bus import NatsLeaderBus
    from ratefleet.schemas import Config

    config = Config.model_validate({"upstreams": {"u": {"base_url": "http://127.0.0.1:9"}},
                                    "pools": {"p": {"keys": [{"id": "k1", "rps": 1, "secret": "x"}]}}})
    got = await received_after_a_stalled_flush(nats_server, lambda nc: NatsLeaderBus(config, nc).flush(0.5))
    assert got == [b"still reading"]


async def test_a_drain_given_up_under_a_deadline_leaves_the_connection_reading(nats_server):
    # the step-down path a break-it trial stalled: the leader's pull inboxes drained under
    # anyio.fail_after (dispatcher/shell/puller.py `stop`); drain() flushes with nats-py's own
    # flush, and its cancelled PING future met the late PONG (read nothing for 25-30 s after NATS
    # stalled 8-10 s). Every connection of connect() now takes a late PONG in its stride.
    import anyio

    async def drain_under_a_deadline(nc) -> None:
        sub = await nc.subscribe("t.drained")
        try:
            with anyio.fail_after(0.5):
                await sub.drain()
        except TimeoutError:
            raise nats.errors.FlushTimeoutError from None

    assert await received_after_a_stalled_flush(nats_server, drain_under_a_deadline) == [b"still reading"]


async def test_nats_pys_own_flush_timeout_leaves_a_connect_connection_reading(nats_server):
    assert await received_after_a_stalled_flush(nats_server, lambda nc: nc.flush(timeout=1)) == [b"still reading"]
