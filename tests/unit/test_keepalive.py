"""`workers.keepalive_s`: an idle upstream connection is reused only this long. A server that
closes idle connections after a while (uvicorn and Node: 5 s) and gets a request on one it is
closing answers nothing; under the server's idle time, the worker opens a new connection instead."""

from __future__ import annotations

import asyncio
import time

import pytest

from ratefleet.schemas import Job, UpstreamConfig
from ratefleet.schemas.config import parse_config
from ratefleet.workers.executor import UpstreamExecutor, build_client

pytestmark = pytest.mark.anyio
JOB = Job.model_validate({"request": {"path": "/v1/chat/completions", "json": {"model": "m"}}})
OK = b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 2\r\n\r\n{}"
SERVER_IDLE_S = 0.4


async def closing_server(connections: list[int]):
    """Keep-alive server whose connections idle past SERVER_IDLE_S are being closed: the next
    request on one gets no answer (the race a client loses when it reuses a connection just as
    the server closes it)."""
    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        connections.append(1)
        answered = None
        while True:
            head = b""
            while b"\r\n\r\n" not in head:
                more = await reader.read(65536)
                if not more:
                    writer.close()
                    return
                head += more
            length = [int(line.split(b":")[1]) for line in head.split(b"\r\n") if line.lower().startswith(b"content-length")]
            body = head.partition(b"\r\n\r\n")[2]
            while length and len(body) < length[0]:
                body += await reader.read(65536)
            if answered is not None and time.monotonic() - answered > SERVER_IDLE_S:
                writer.close()  # the server was closing it
                return
            writer.write(OK)
            await writer.drain()
            answered = time.monotonic()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    return server, f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}"


@pytest.mark.parametrize("transport", ["aiohttp", "httpcore"])
@pytest.mark.parametrize("keepalive_s", [0.2, 1.0])
async def test_an_idle_connection_older_than_keepalive_is_not_reused(transport, keepalive_s):
    connections: list[int] = []
    server, url = await closing_server(connections)
    client = build_client(transport, 2, keepalive_s=keepalive_s)
    try:
        executor = UpstreamExecutor(client)
        upstream = UpstreamConfig(base_url=url, timeout_s=5)
        assert (await executor.call(JOB, upstream, "sk")).kind == "ok"
        await asyncio.sleep(SERVER_IDLE_S + 0.15)  # idle past the server's time
        second = await executor.call(JOB, upstream, "sk")
    finally:
        await client.aclose()
        server.close()
    if keepalive_s < SERVER_IDLE_S:  # dropped by the pool before the server's time: a new connection
        assert second.kind == "ok" and len(connections) == 2
    elif transport == "aiohttp":  # reused as the server closed it: sent, and no answer
        assert second.kind == "upstream_error" and "ServerDisconnectedError" in second.error


def test_the_default_keepalive_is_under_the_common_servers_5_s():
    config = parse_config({"upstreams": {"u": {"base_url": "http://127.0.0.1:9"}},
                           "pools": {"p": {"keys": [{"id": "k1", "rps": 1, "secret": "env:UNUSED"}]}}})
    assert 0 < config.workers.keepalive_s < 5.0
    limits = build_client("aiohttp", 3)._transport.inner.limits
    assert limits.keepalive_expiry == 4.0
