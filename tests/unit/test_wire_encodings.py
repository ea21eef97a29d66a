"""What goes on the wire and comes back, over a real socket and both transports: a body in a
Content-Encoding httpx cannot decode keeps that header (and its exact bytes); a latin-1 job
header never turns the key into mojibake."""

from __future__ import annotations

import asyncio
import base64

import pytest

from ratefleet.schemas import Job, UpstreamConfig
from ratefleet.workers.executor import UpstreamExecutor, build_client, still_encoded

pytestmark = pytest.mark.anyio
BROTLI_BYTES = b"\x1b\x0b\x00\x00\xa4\x02"


async def raw_server(answer: bytes, seen: list[bytes]):
    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        data = b""
        while b"\r\n\r\n" not in data:
            data += await reader.read(65536)
        head, _, rest = data.partition(b"\r\n\r\n")
        length = [int(line.split(b":")[1]) for line in head.split(b"\r\n") if line.lower().startswith(b"content-length")]
        while length and len(rest) < length[0]:
            rest += await reader.read(65536)
        seen.append(head)
        writer.write(answer)
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    return server, f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}"


@pytest.mark.parametrize("transport", ["aiohttp", "httpcore"])
async def test_a_body_httpx_cannot_decode_keeps_its_content_encoding(transport):
    answer = (b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Encoding: br\r\n"
              b"Content-Length: %d\r\n\r\n" % len(BROTLI_BYTES) + BROTLI_BYTES)
    server, url = await raw_server(answer, [])
    client = build_client(transport, 2)
    try:
        job = Job.model_validate({"request": {"path": "/v1/x", "headers": {"Accept-Encoding": "br"}, "json": {}}})
        result = await UpstreamExecutor(client).call(job, UpstreamConfig(base_url=url, timeout_s=5), "sk-secret-123")
    finally:
        await client.aclose()
        server.close()
    assert result.kind == "ok"
    assert result.response.headers.get("content-encoding") == "br"
    assert base64.b64decode(result.response.body_b64) == BROTLI_BYTES


def test_only_codings_httpx_cannot_decode_count_as_still_encoded():
    assert not still_encoded(None) and not still_encoded("gzip") and not still_encoded("identity")
    assert still_encoded("x-custom") and still_encoded("gzip, x-custom")


@pytest.mark.parametrize("transport, title, key", [
    ("httpcore", b"Caf\xe9", b"sk-secret-\xe9"),             # RFC 9110 obs-text: one latin-1 byte
    ("aiohttp", b"Caf\xc3\xa9", b"sk-secret-\xc3\xa9"),       # aiohttp writes every header value as UTF-8
])
async def test_a_latin1_job_header_leaves_the_key_intact(transport, title, key):
    seen: list[bytes] = []
    server, url = await raw_server(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n", seen)
    client = build_client(transport, 2)
    try:
        job = Job.model_validate({"request": {"path": "/x", "headers": {"X-Title": "Café"}, "json": {}}})
        result = await UpstreamExecutor(client).call(job, UpstreamConfig(base_url=url, timeout_s=5), "sk-secret-é")
    finally:
        await client.aclose()
        server.close()
    assert result.kind == "ok"
    lines = {line.split(b":", 1)[0].lower(): line.split(b":", 1)[1].strip() for line in seen[0].split(b"\r\n")[1:]}
    assert lines[b"x-title"] == title
    assert lines[b"authorization"] == b"Bearer " + key
