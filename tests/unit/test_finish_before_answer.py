"""The reply of a cached job waits for the answer cache's write (workers/service.py, bounded by
CACHE_SETTLE_S): sent first, a caller sending the same job again the moment it read the answer
missed the entry and paid a second call (a CI run's `test_client_jobs_are_looked_up_by_the_
dispatchers_intake`, once the reply path got faster). Finisher.finish awaits `before_answer`
after the Result is stored and before the reply and the ack (real nats-server)."""

from __future__ import annotations

import asyncio

import nats
import pytest

from ratefleet.runtime.finish import Finisher
from ratefleet.runtime.store import read_result
from ratefleet.runtime.streams import ensure_topology
from ratefleet.schemas import Result, Subjects
from ratefleet.schemas.config import parse_config

pytestmark = [pytest.mark.anyio, pytest.mark.timeout(60)]


async def test_the_reply_and_the_ack_wait_for_before_answer(nats_server):
    nc = await nats.connect(nats_server.url)
    js, subjects = nc.jetstream(), Subjects()
    try:
        await ensure_topology(js, parse_config({}))
        order: list[str] = []
        published = nc.publish

        async def publish(subject, payload=b"", reply="", headers=None):
            if subject in ("t.reply", "t.ack"):
                order.append(subject)
            await published(subject, payload, reply=reply, headers=headers)

        nc.publish = publish  # type: ignore[method-assign]

        async def cache_write() -> None:
            assert await read_result(js, subjects, "j1") is not None  # the Result is stored first
            await asyncio.sleep(0.2)
            order.append("cache written")

        finisher = Finisher(nc, js, subjects)
        stored = await finisher.finish(Result(job_id="j1", status="succeeded", tier="normal"), ack="t.ack",
                                       reply_to="t.reply", before_answer=cache_write)
        assert stored and order == ["cache written", "t.reply", "t.ack"]
    finally:
        await nc.close()
