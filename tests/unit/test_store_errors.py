"""Submit errors a user sees before any fleet runs: no streams yet, unknown tier, NATS down."""

from __future__ import annotations

import time

import pytest

from ratefleet import Client, SubmitError, UnknownTier
from ratefleet.runtime.streams import ensure_topology
from ratefleet.schemas.config import parse_config
from ratefleet.schemas.errors import NatsUnavailable

pytestmark = pytest.mark.anyio
JOB = {"request": {"path": "/v1/chat/completions"}}


async def test_submit_before_any_stream_exists_says_to_start_the_fleet(nats_server):
    async with await Client.connect(nats_server.url) as client:
        started = time.monotonic()
        with pytest.raises(SubmitError, match="does not exist on this NATS server; start `ratefleet up`"):
            await client.submit(JOB, "normal")
        assert time.monotonic() - started < 5  # not a 30 s retry loop


async def test_unknown_tier_is_refused_at_once(nats_server):
    async with await Client.connect(nats_server.url) as client:
        await ensure_topology(client.js, parse_config({}))
        # naming the fleet's tiers, as the rpc reply does (a service team's finding: it named none)
        with pytest.raises(UnknownTier, match="unknown tier 'platinum'; the fleet's tiers: vip, premium, normal, "
                           "guest") as refused:
            await client.submit(JOB, "platinum")
        # the code a raw rpc caller gets for the same request; still a SubmitError for older callers
        assert refused.value.code == "unknown_tier" and isinstance(refused.value, SubmitError)
        with pytest.raises(UnknownTier):  # request/reply too: nothing stored, nothing waited for
            await client.request(JOB, "platinum", timeout=5)
        assert await client.submit(JOB, "guest")


async def test_connect_to_nothing_says_how_to_start_nats():
    with pytest.raises(NatsUnavailable, match="ratefleet up"):
        await Client.connect("nats://127.0.0.1:1")


async def test_a_server_without_jetstream_is_not_an_unknown_tier(tmp_path):
    """No stream answering because JetStream is off (or the stream has no leader) used to end,
    after the retries, in UnknownTier "unknown tier 'normal'" for a tier the fleet has: a caller
    catching UnknownTier to drop the job for good would drop it. Now a SubmitError that says
    nothing was stored and to retry."""
    import socket
    import subprocess

    from ratefleet.runtime.embedded import nats_server_binary
    from ratefleet.runtime.store import publish_job_ack
    from ratefleet.schemas import Subjects

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    server = subprocess.Popen([nats_server_binary(), "-a", "127.0.0.1", "-p", str(port)],  # no -js
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        for _ in range(100):
            try:
                client = await Client.connect(f"nats://127.0.0.1:{port}")
                break
            except NatsUnavailable:
                time.sleep(0.1)
        async with client:
            with pytest.raises(SubmitError, match="was NOT stored") as refused:
                await publish_job_ack(client.js, Subjects(), "normal", "job-1", b"{}", retry_for=0.5)
            assert not isinstance(refused.value, UnknownTier) and "unknown tier" not in str(refused.value)
    finally:
        server.terminate()
        server.wait(10)
