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
