"""A stopping gateway ends the streams waiting for their first part too (gateway/streaming.py `next_part`)."""

from __future__ import annotations

import asyncio
import time

import pytest

from ratefleet.gateway.streaming import StreamStopped, next_part

pytestmark = pytest.mark.anyio


class Silent:
    """A subscription on which nothing arrives (the job still queued)."""

    async def next_msg(self, timeout: float):
        await asyncio.sleep(timeout)
        raise TimeoutError


async def test_a_stream_waiting_for_its_first_part_ends_at_the_stop_deadline_not_its_idle_timeout():
    """A review: such a stream waited its whole timeout (60 s) past the stop and got uvicorn's bare
    connection reset at shutdown."""
    stop = {"at": None}
    started = time.monotonic()

    async def stop_soon():
        await asyncio.sleep(0.2)
        stop["at"] = time.monotonic() + 0.3

    asyncio.ensure_future(stop_soon())
    with pytest.raises(StreamStopped):
        await next_part(Silent(), time.monotonic() + 60, lambda: stop["at"])  # type: ignore[arg-type]
    assert time.monotonic() - started < 1.5  # at the deadline (polled each second at most)


async def test_without_a_stop_the_first_part_wait_ends_at_its_timeout():
    started = time.monotonic()
    with pytest.raises(TimeoutError):
        await next_part(Silent(), time.monotonic() + 0.3, lambda: None)  # type: ignore[arg-type]
    assert 0.25 <= time.monotonic() - started < 1.0
