"""A refused connection (nothing listens at the upstream's address) is reported as such, on
both transports. Before, httpx-aiohttp turned aiohttp's ClientConnectorError into httpx's
ConnectTimeout and the Result said "no answer from the upstream within 60s" for a call that
failed in a millisecond: a developer looks for a slow upstream instead of a down one."""

from __future__ import annotations

import socket

import pytest

from ratefleet.schemas import Job, UpstreamConfig
from ratefleet.workers.executor import UpstreamExecutor, build_client

SECRET = "sk-refused-test-secret"


def _closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.mark.anyio
@pytest.mark.parametrize("transport", ["aiohttp", "httpcore"])
async def test_a_refused_connection_is_not_reported_as_a_timeout(transport):
    client = build_client(transport, 4)
    try:
        config = UpstreamConfig(base_url=f"http://127.0.0.1:{_closed_port()}", timeout_s=60)
        job = Job.model_validate({"request": {"path": "/v1/x", "json": {}}})
        result = await UpstreamExecutor(client).call(job, config, SECRET)
    finally:
        await client.aclose()
    assert result.kind == "upstream_error" and result.response is None
    assert "within 60" not in result.error, result.error
    assert "connect" in result.error.lower(), result.error
    assert SECRET not in result.error
