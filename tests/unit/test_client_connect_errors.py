"""`Client.connect` to something that is not a NATS server: a URL that is no NATS URL is a
ConfigError at once, and an address where something accepts TCP but never speaks NATS (a
wrong port: an HTTP server, NATS' monitoring port) fails after one try per server, saying to
check the port. Before: a bare ValueError (port 99999), `http://` retried for 30 s, and a
silent TCP listener held `Client.connect` for 60 tries x (connect_timeout + 0.5 s): 5.5 min."""

from __future__ import annotations

import asyncio
import socket
import time

import pytest

from ratefleet import Client, ConfigError, NatsUnavailable

pytestmark = [pytest.mark.anyio, pytest.mark.timeout(60)]


@pytest.mark.parametrize("url", ["nats://127.0.0.1:99999", "http://127.0.0.1:4222", "nats://u:s3cret@127.0.0.1:0", ""])
async def test_a_url_that_is_no_nats_url_is_refused_at_once(url):
    started = time.monotonic()
    with pytest.raises(ConfigError, match="NATS") as refused:
        await Client.connect(url)
    assert time.monotonic() - started < 1.0
    assert "s3cret" not in str(refused.value)


async def test_a_port_that_accepts_but_never_speaks_nats_fails_after_one_try():
    accepted: list[asyncio.StreamWriter] = []

    async def hold(_reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        accepted.append(writer)  # accepted and silent, like an HTTP server waiting for a request line

    server = await asyncio.start_server(hold, "127.0.0.1", 0, family=socket.AF_INET)
    port = server.sockets[0].getsockname()[1]
    try:
        started = time.monotonic()
        with pytest.raises(NatsUnavailable, match="check the host and port"):
            await Client.connect(f"nats://127.0.0.1:{port}", connect_timeout=1.0)
        assert time.monotonic() - started < 10.0  # one try (1 s), not 60 tries x 1.5 s
    finally:
        for writer in accepted:
            writer.close()
        server.close()


async def test_nothing_answering_says_what_a_python_caller_passes():
    # the hint named only the CLI's --nats flag, which a service using Client.connect does not have
    with pytest.raises(NatsUnavailable, match=r"Client.connect\(url\)"):
        await Client.connect("nats://127.0.0.1:1")
