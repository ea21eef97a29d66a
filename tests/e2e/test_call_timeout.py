"""`timeout_s` bounds the whole upstream call: an upstream that sends its headers at once
and then one body byte a second never trips httpx's per-read timeouts, yet the call must
end as a timeout within about `timeout_s`. A real HTTP server (raw asyncio sockets) drips
the body; once through the executor on both transports, once through a real fleet."""

from __future__ import annotations

import asyncio
import contextlib
import time

import pytest
from faultkit import Tracker, figure, wait_workers
from fleetkit import FleetKit, chat_job

from ratefleet import Client
from ratefleet.schemas import Job, UpstreamConfig
from ratefleet.workers.executor import UpstreamExecutor, build_client

pytestmark = pytest.mark.anyio
DRIP_BYTES = 25  # one a second: 25 s in all


class DripServer:
    """HTTP/1.1 on 127.0.0.1: `/fast` answers at once; any other path sends a 200 with its
    headers, then the body one byte a second. Counts the requests it received."""

    def __init__(self) -> None:
        self.requests: list[str] = []
        self.server: asyncio.base_events.Server | None = None
        self.url = ""

    async def __aenter__(self) -> DripServer:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        port = self.server.sockets[0].getsockname()[1]
        self.url = f"http://127.0.0.1:{port}"
        return self

    async def __aexit__(self, *exc) -> None:
        self.server.close()
        with contextlib.suppress(Exception):
            await asyncio.wait_for(self.server.wait_closed(), 2)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(Exception):
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                lines = head.decode("latin-1").split("\r\n")
                path = lines[0].split(" ")[1]
                length = next((int(line.split(":", 1)[1]) for line in lines
                               if line.lower().startswith("content-length:")), 0)
                if length:
                    await reader.readexactly(length)
                self.requests.append(path)
                if path.startswith("/fast"):
                    body = b'{"ok": true}'
                    writer.write(b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\n"
                                 b"content-length: %d\r\n\r\n%s" % (len(body), body))
                    await writer.drain()
                    continue
                writer.write(b"HTTP/1.1 200 OK\r\ncontent-type: text/plain\r\n"
                             b"content-length: %d\r\n\r\n" % DRIP_BYTES)
                await writer.drain()
                for _ in range(DRIP_BYTES):
                    await asyncio.sleep(1.0)
                    writer.write(b"x")
                    await writer.drain()
        writer.close()


def _job(path: str) -> Job:
    return Job.model_validate({"request": {"method": "POST", "path": path, "json": {"n": 1}}})


@pytest.mark.timeout(40)
@pytest.mark.parametrize("transport", ["aiohttp", "httpcore"])
async def test_dripping_body_ends_as_a_timeout_within_timeout_s(transport):
    async with DripServer() as server:
        client = build_client(transport, 4)
        try:
            executor = UpstreamExecutor(client)
            upstream = UpstreamConfig(base_url=server.url, timeout_s=3)
            fast = await executor.call(_job("/fast"), upstream, "sk-secret")
            assert fast.kind == "ok" and fast.response.json_body == {"ok": True}
            started = time.monotonic()
            result = await executor.call(_job("/drip"), upstream, "sk-secret")
            took = time.monotonic() - started
        finally:
            await client.aclose()
    figure("dripping body", transport=transport, timeout_s=3, took_s=took, kind=result.kind, error=result.error)
    assert result.kind == "upstream_error" and result.response is None, result
    assert "timeout_s = 3" in result.error
    # the body would take 25 s to drip: the upper bound leaves a loaded machine room
    assert 2.9 <= took <= 3.0 + 4.0, f"the call took {took:.1f}s under timeout_s = 3"


@pytest.mark.timeout(90)
async def test_fleet_retries_a_dripping_call_by_policy_and_ends_it_as_a_timeout(tmp_path, nats_server):
    """max_attempts 2, timeout_s 2: two calls of about 2 s each, then `failed` /
    attempts_exhausted naming the timeout; a job on /fast beside it succeeds."""
    async with DripServer() as server:
        kit = FleetKit(tmp_path, nats_server.url, server.url, overrides={
            "upstreams": {"mock": {"base_url": server.url, "timeout_s": 2}},
            "tiers": {"normal": {"max_attempts": 2}},
            "dispatcher": {"breaker_fail_max": 20},
        })
        kit.dispatcher("d1")
        kit.worker("w1")
        try:
            async with await Client.connect(nats_server.url) as client, Tracker(nats_server.url) as tracker:
                await wait_workers(client, {"w1"})
                started = time.monotonic()
                drip = await client.submit({**chat_job(0), "id": "drip",
                                            "request": {"method": "POST", "path": "/drip", "json": {}}},
                                           "normal", batch="timeouts")
                fast = await client.submit({**chat_job(1), "id": "fast",
                                            "request": {"method": "POST", "path": "/fast", "json": {}}},
                                           "normal", batch="timeouts")
                await tracker.wait_stored("timeouts", [drip, fast], timeout=40)
                took = time.monotonic() - started
                results = await tracker.results([drip, fast], "timeouts")
        finally:
            kit.stop()
    r = results[drip]
    figure("fleet dripping body", took_s=took, status=r.status, attempts=r.attempts,
           calls=server.requests.count("/drip"), error=r.error.message if r.error else None)
    assert results[fast].status == "succeeded"
    assert r.status == "failed" and r.error.code == "attempts_exhausted", r
    assert r.attempts == 2 and server.requests.count("/drip") == 2
    assert "timeout_s = 2" in r.error.message
    # two calls of ~2 s plus the retry delay: far below the 25 s the body takes to drip
    assert took < 15, f"the job took {took:.1f}s"
