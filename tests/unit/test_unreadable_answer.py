"""An upstream answer the HTTP client cannot read (a header line past aiohttp's 8,190 bytes, a
status line that is not HTTP) is an upstream error with its own reason, retried by policy and
counted against the key's breaker. It escaped as an aiohttp exception: the worker then called
it "a fault of this worker or of NATS", gave the delivery back, and the job ended after
max_attempts + 1 paid calls as "attempts_exhausted ... a worker stopped mid-call" (a break-it
trial). Real aiohttp transport (as the workers use), a raw TCP server as the upstream."""

from __future__ import annotations

import asyncio

import pytest

from ratefleet.schemas import Job, UpstreamConfig
from ratefleet.schemas.outcome import OutcomeKind
from ratefleet.workers.executor import UpstreamExecutor, build_client

pytestmark = pytest.mark.anyio

ANSWERS = {
    "huge_header": b"HTTP/1.1 200 OK\r\nX-Big: " + b"x" * 70_000 + b"\r\nContent-Length: 2\r\n\r\n{}",
    "not_http": b"SSH-2.0-OpenSSH_9.6\r\n\r\n",
}


@pytest.mark.parametrize("answer", sorted(ANSWERS))
async def test_an_answer_the_client_cannot_read_is_an_upstream_error_with_its_reason(answer):
    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(ANSWERS[answer])
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(serve, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    executor = UpstreamExecutor(build_client("aiohttp", 2))
    try:
        job = Job.model_validate({"request": {"method": "GET", "path": "/x"}})
        result = await executor.call(job, UpstreamConfig(base_url=f"http://127.0.0.1:{port}", timeout_s=5), "sk-test")
    finally:
        server.close()
        await executor._client.aclose()
    assert result.kind == OutcomeKind.UPSTREAM_ERROR and result.response is None
    assert "could not be read" in result.error and "sk-test" not in result.error
