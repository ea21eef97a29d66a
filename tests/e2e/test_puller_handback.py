"""What a leader's puller does with deliveries that arrive while it steps down, over a real
nats-server: hand them back (nak with a delay), drop them when the lease may have lapsed
(the new leader owns them), and never nak the last delivery the server will make
(`max_deliver`): that one is finished through intake, or the job would be stuck for good."""

from __future__ import annotations

import asyncio
import json
import time

import nats
import pytest

from ratefleet.dispatcher.shell.puller import HANDBACK_MARGIN_S, PULL_EXPIRES_S, TierPuller
from ratefleet.runtime.streams import ensure_topology, tier_consumer
from ratefleet.schemas import Config, Subjects

pytestmark = [pytest.mark.timeout(30), pytest.mark.anyio]


def _config(max_deliver: int, ack_wait_s: float) -> Config:
    return Config.model_validate({
        "upstreams": {"mock": {"base_url": "http://127.0.0.1:9"}},
        "pools": {"shared": {"keys": [{"id": "k1", "rps": 1, "secret": "env:UNUSED"}]}},
        "streams": {"max_deliver": max_deliver, "ack_wait_s": ack_wait_s},
    })


class Harness:
    """A puller on the `normal` tier whose on_job records deliveries; `mode` says what the
    test's 'leader' does with each one."""

    def __init__(self, nc, config: Config, *, fence: bool = True):
        self.nc, self.config = nc, config
        self.subjects = Subjects()
        self.deliveries: list[tuple[int, float]] = []
        self.arrived = asyncio.Event()
        self.fenced = fence
        self.puller = TierPuller(nc, self.subjects.jobs_stream, tier_consumer("normal"), "normal", 4, self._on_job,
                                 held=lambda: 0, fence=lambda: self.fenced, max_deliver=config.streams.max_deliver)
        self.on_first = None

    async def _on_job(self, tier: str, msg) -> None:
        self.deliveries.append((msg.metadata.num_delivered, time.monotonic()))
        self.arrived.set()
        if len(self.deliveries) == 1 and self.on_first is not None:
            await self.on_first(msg)

    async def next_delivery(self, timeout: float) -> int:
        await asyncio.wait_for(self.arrived.wait(), timeout)
        self.arrived.clear()
        return self.deliveries[-1][0]


async def _setup(url: str, max_deliver: int, ack_wait_s: float):
    nc = await nats.connect(url)
    config = _config(max_deliver, ack_wait_s)
    js = nc.jetstream()
    await ensure_topology(js, config)
    await js.publish(Subjects().jobs("normal"), json.dumps({"request": {"method": "GET", "path": "/x"}}).encode(),
                     headers={"Nats-Msg-Id": "j1"})
    return nc, js, config


async def test_handed_back_delivery_returns_after_the_pull_requests_expired(nats_server):
    nc, js, config = await _setup(nats_server.url, max_deliver=5, ack_wait_s=20)
    try:
        h = Harness(nc, config)

        async def step_down_then_redeliver(msg):
            h.puller.stop_pulling()  # stepping down; our pull request is still open
            await msg.nak()  # the server redelivers at once, into that open request

        h.on_first = step_down_then_redeliver
        await h.puller.start()
        assert await h.next_delivery(5) == 1
        await asyncio.sleep(0.5)
        assert len(h.deliveries) == 1, "the stepping-down puller passed a delivery on instead of handing it back"
        handed_back_at = time.monotonic()
        await h.puller.stop()
        # a fresh puller (the next leader) gets it once the handback delay is over, far before ack_wait
        nxt = Harness(nc, config)
        await nxt.puller.start()
        while await nxt.next_delivery(10) < 3:
            pass
        waited = time.monotonic() - handed_back_at
        assert waited < PULL_EXPIRES_S + HANDBACK_MARGIN_S + 3, f"came back only after {waited:.1f}s"
    finally:
        await nc.close()


async def test_fenced_puller_drops_deliveries_instead_of_nak(nats_server):
    """Once the lease may have lapsed, a nak could re-deliver a job the new leader already runs."""
    nc, js, config = await _setup(nats_server.url, max_deliver=5, ack_wait_s=4)
    try:
        h = Harness(nc, config)

        async def lose_lease_then_redeliver(msg):
            h.puller.stop_pulling()
            h.fenced = False  # the lease may have lapsed
            await msg.nak()

        h.on_first = lose_lease_then_redeliver
        await h.puller.start()
        assert await h.next_delivery(5) == 1
        await asyncio.sleep(0.5)  # the second delivery reaches the fenced puller
        assert len(h.deliveries) == 1
        await h.puller.stop()
        nxt = Harness(nc, config)
        await nxt.puller.start()
        delivered = 0
        while delivered < 3:
            delivered = await nxt.next_delivery(10)
        # the second delivery came right after the first; dropped, not nak'd, it is sent again
        # only when ack_wait (4 s) ran out (a nak would bring it back after 1.25 s)
        waited = nxt.deliveries[-1][1] - h.deliveries[0][1]
        assert waited > 3.0, f"redelivered {waited:.1f}s after the second delivery: the fenced puller nak'd it"
    finally:
        await nc.close()


async def test_last_delivery_is_never_handed_back(nats_server):
    """max_deliver 2: the second delivery is the last one the server makes. A puller stepping
    down (even fenced) passes it to intake, which ends it as a poison message; a nak here
    would leave the job in the stream forever, without a result."""
    nc, js, config = await _setup(nats_server.url, max_deliver=2, ack_wait_s=20)
    try:
        h = Harness(nc, config)

        async def step_down_fenced_then_redeliver(msg):
            h.puller.stop_pulling()
            h.fenced = False
            await msg.nak()

        h.on_first = step_down_fenced_then_redeliver
        await h.puller.start()
        assert await h.next_delivery(5) == 1
        assert await h.next_delivery(5) == 2, "the last delivery was not passed on"
        await h.puller.stop()
    finally:
        await nc.close()
