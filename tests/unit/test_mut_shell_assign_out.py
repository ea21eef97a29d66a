"""One dispatch pass's assignments to one worker (dispatcher/shell/assign_out.py): the array
split exactly at `max_payload`, a server whose limit is lower than it said (one by one, the
too-large job alone fails), and NATS going away mid-pass (every assignment not sent is
reported, with the failures before it). Over the in-memory bus."""

from __future__ import annotations

import json

import pytest

from ratefleet.dispatcher.core.commands import Assign
from ratefleet.dispatcher.core.delivery import Incoming
from ratefleet.dispatcher.core.events import AssignFailed
from ratefleet.dispatcher.shell.assign_out import runs, send_assignments
from ratefleet.dispatcher.shell.bus import PayloadTooLarge
from ratefleet.dispatcher.shell.memory_bus import MemoryBus
from ratefleet.schemas import Job
from ratefleet.schemas.internal import batch_payload

pytestmark = [pytest.mark.anyio, pytest.mark.usefixtures("no_tracing_sdk")]
SUBJECT = "ratefleet.assign.w1"


def incoming(n: int) -> Incoming:
    return Incoming(job=Job.model_validate({"id": f"j{n}", "request": {"path": "/x"}}), job_id=f"j{n}", tier="normal",
                    upstream="u", ack=f"ack.{n}", reply_to=None, attempt=1, max_attempts=3, submitted_at=1.0,
                    stream_seq=n)


def assign(n: int, pad: int) -> Assign:
    return Assign("w1", f"a{n}", json.dumps({"id": f"a{n}", "pad": "x" * pad}).encode(), incoming(n))


@pytest.mark.anyio
async def test_runs_split_exactly_where_the_array_passes_max_payload():
    items = [b"aaa", b"bbb"]
    assert len(batch_payload(items)) == 9
    assert runs(items, 9) == [(0, 2)]  # "[aaa,bbb]" is 9 bytes: it fits
    assert runs(items, 8) == [(0, 1), (1, 2)]
    assert runs([b"aaa", b"bbb", b"ccc", b"ddd"], 9) == [(0, 2), (2, 4)]  # a new run starts counting afresh
    assert runs([], 9) == []


class LowerLimitBus(MemoryBus):
    """Says 1 MiB, refuses anything over `real` bytes."""

    real: int = 200

    async def publish(self, subject, payload, reply="", headers=None):
        if len(payload) > self.real:
            raise PayloadTooLarge(f"{len(payload)} bytes")
        await super().publish(subject, payload, reply, headers)


async def test_a_server_limit_below_the_one_told_sends_one_by_one_and_fails_only_the_large_job():
    bus = LowerLimitBus()
    commands = [assign(1, 50), assign(2, 300), assign(3, 50)]
    failed, error = await send_assignments(bus, SUBJECT, commands)
    assert error is None
    assert [json.loads(p)["id"] for p in bus.sent_to(SUBJECT)] == ["a1", "a3"]
    [too_large] = failed
    assert too_large == AssignFailed("a2", commands[1].incoming, True, len(commands[1].payload))


class AwayBus(MemoryBus):
    """Refuses what is over `max_payload` as too large; goes away at the first payload naming a4."""

    async def publish(self, subject, payload, reply="", headers=None):
        if b'"a4"' in payload:
            raise ConnectionError("nats away")
        await super().publish(subject, payload, reply, headers)


async def test_nats_away_mid_pass_reports_every_assignment_not_sent_and_the_failures_before():
    bus = AwayBus(max_payload=120)
    commands = [assign(1, 20), assign(2, 300), assign(3, 20), assign(4, 20), assign(5, 20)]
    failed, error = await send_assignments(bus, SUBJECT, commands)
    assert isinstance(error, ConnectionError)
    assert [json.loads(p)["id"] for p in bus.sent_to(SUBJECT)] == ["a1"]
    assert [(f.assignment, f.incoming.job_id, f.too_large) for f in failed] == [
        ("a2", "j2", True), ("a3", "j3", False), ("a4", "j4", False), ("a5", "j5", False)]


async def test_nothing_is_sent_while_the_connection_is_down():
    bus = MemoryBus(connected=False)
    commands = [assign(1, 10), assign(2, 10)]
    failed, error = await send_assignments(bus, SUBJECT, commands)
    assert bus.published == [] and error is not None and "down" in str(error)
    assert [(f.assignment, f.too_large) for f in failed] == [("a1", False), ("a2", False)]


async def test_assignments_made_while_nats_is_away_are_not_flushed_at_once_on_its_return(nats_server):
    """An operator's trial: nats-py buffered the assignments a leader made while nats-server was
    down and sent them all the moment it came back: 6 calls on a key with burst 2 within 11 ms,
    2-4 x 429 in 3 of 4 runs. Over a real nats-server, stopped and started on its store; the
    worker listens from a connection made before the leader's reconnects."""
    import anyio
    import nats

    from ratefleet.dispatcher.shell.bus import NatsLeaderBus
    from ratefleet.schemas import Config

    leader = await nats.connect(nats_server.url, max_reconnect_attempts=-1, reconnect_time_wait=1.5)
    worker = None
    try:
        bus = NatsLeaderBus(Config(), leader)
        nats_server.port = int(nats_server.url.rsplit(":", 1)[1])  # back on the same port
        nats_server.stop()
        with anyio.fail_after(10):
            while leader.is_connected:
                await anyio.sleep(0.05)
        failed, error = await send_assignments(bus, SUBJECT, [assign(1, 10), assign(2, 10)])
        nats_server.start()
        worker = await nats.connect(nats_server.url)
        seen = []

        async def on_assign(msg) -> None:
            seen.append(msg.data)

        await worker.subscribe(SUBJECT, cb=on_assign)
        await worker.flush()
        with anyio.fail_after(20):
            while not leader.is_connected:
                await anyio.sleep(0.05)
        await leader.flush()
        await worker.flush()
        await anyio.sleep(0.3)
    finally:
        await leader.close()
        if worker is not None:
            await worker.close()
    assert seen == []  # before: both, the moment the connection came back
    assert error is not None and len(failed) == 2
