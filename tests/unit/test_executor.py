"""The upstream executor over httpx.MockTransport: auth header, classification, masking."""

from __future__ import annotations

import json

import httpx
import pytest

from ratefleet.schemas import Job, UpstreamConfig
from ratefleet.workers.executor import UpstreamExecutor

SECRET = "sk-test-SECRET-123456"


def executor(handler) -> UpstreamExecutor:
    return UpstreamExecutor(httpx.AsyncClient(transport=httpx.MockTransport(handler)))


def job(**request) -> Job:
    return Job.model_validate({"request": {"path": "/v1/chat/completions", "json": {"m": 1}, **request}})


UPSTREAM = UpstreamConfig(base_url="https://api.example.test", usage_path="usage.total_tokens")


@pytest.mark.anyio
async def test_call_sends_the_key_only_in_the_auth_header_to_the_upstream():
    seen = {}

    def handler(request: httpx.Request) -> httpx.Response:
        seen.update(url=str(request.url), auth=request.headers["authorization"], body=json.loads(request.content))
        return httpx.Response(200, json={"usage": {"total_tokens": 42}},
                              headers={"x-ratelimit-remaining-requests": "7", "x-ratelimit-reset-requests": "1s"})

    result = await executor(handler).call(job(query={"a": "1"}), UPSTREAM, SECRET)
    assert seen == {"url": "https://api.example.test/v1/chat/completions?a=1", "auth": f"Bearer {SECRET}",
                    "body": {"m": 1}}
    assert result.kind == "ok" and result.actual_cost == 42.0
    assert result.ratelimit.remaining_requests == 7.0 and result.ratelimit.reset_requests_s == 1.0


@pytest.mark.anyio
# a bare 401/403 (no provider code) is "denied" now, not "key_error" (see test_provider_codes_reach_the_outcome)
@pytest.mark.parametrize("status, kind", [(429, "rate_limited"), (401, "denied"), (403, "denied"),
                                          (500, "upstream_error"), (503, "upstream_error"), (400, "bad_request"),
                                          (404, "bad_request"), (422, "bad_request")])
async def test_answers_are_classified(status, kind):
    result = await executor(lambda r: httpx.Response(status, headers={"retry-after": "3"}, json={})).call(
        job(), UPSTREAM, SECRET)
    assert result.kind == kind and result.response.status == status and result.retry_after_s == 3.0


@pytest.mark.anyio
@pytest.mark.parametrize("status, body, kind, code", [
    (401, {"error": {"type": "invalid_request_error", "code": "invalid_api_key"}}, "key_error", "invalid_api_key"),
    (429, {"error": {"type": "insufficient_quota", "code": "insufficient_quota"}}, "key_error", "insufficient_quota"),
    (403, {"error": {"type": "invalid_request_error", "code": "model_not_found"}}, "denied", "model_not_found"),
    (529, {"type": "error", "error": {"type": "overloaded_error"}}, "upstream_error", "overloaded_error"),
    (401, {"type": "error", "error": {"type": "authentication_error"}}, "key_error", "authentication_error"),
])
async def test_provider_codes_reach_the_outcome(status, body, kind, code):
    result = await executor(lambda r: httpx.Response(status, json=body)).call(job(), UPSTREAM, SECRET)
    assert (result.kind, result.provider_code) == (kind, code)


@pytest.mark.anyio
async def test_connection_errors_and_timeouts_are_upstream_errors():
    def refuse(request):
        raise httpx.ConnectError("refused", request=request)

    def slow(request):
        raise httpx.ReadTimeout("slow", request=request)

    for handler in (refuse, slow):
        result = await executor(handler).call(job(), UPSTREAM, SECRET)
        assert result.kind == "upstream_error" and result.response is None and SECRET not in result.error


@pytest.mark.anyio
async def test_a_secret_echoed_by_the_upstream_is_masked():
    def handler(request):
        return httpx.Response(401, json={"error": {"message": f"Incorrect API key provided: {SECRET}."}})

    result = await executor(handler).call(job(), UPSTREAM, SECRET)
    assert SECRET not in result.response.model_dump_json()
    assert result.response.json_body["error"]["message"] == "Incorrect API key provided: ***."


class _Http:
    """A tiny real HTTP/1.1 server on 127.0.0.1: answers every request with `reply(path)`
    (status, headers) and records (path, authorization header) per request."""

    def __init__(self, reply):
        self.reply, self.seen, self.url = reply, [], ""

    async def __aenter__(self) -> _Http:
        import asyncio

        async def handle(reader, writer):
            head = (await reader.readuntil(b"\r\n\r\n")).decode("latin-1").split("\r\n")
            fields = dict(line.split(": ", 1) for line in head[1:] if ": " in line)
            length = int({k.lower(): v for k, v in fields.items()}.get("content-length", 0))
            if length:
                await reader.readexactly(length)
            path = head[0].split(" ")[1]
            self.seen.append((path, {k.lower(): v for k, v in fields.items()}.get("authorization")))
            status, headers = self.reply(path)
            extra = "".join(f"{k}: {v}\r\n" for k, v in headers.items())
            writer.write(f"HTTP/1.1 {status} X\r\n{extra}content-length: 0\r\nconnection: close\r\n\r\n".encode())
            await writer.drain()
            writer.close()

        self.server = await asyncio.start_server(handle, "127.0.0.1", 0)
        self.url = f"http://127.0.0.1:{self.server.sockets[0].getsockname()[1]}"
        return self

    async def __aexit__(self, *exc) -> None:
        self.server.close()


@pytest.mark.anyio
@pytest.mark.parametrize("transport", ["aiohttp", "httpcore"])
async def test_redirects_are_not_followed(transport):
    # the worker's own client (build_client) against real servers: a 302 to another host, or
    # to another path of the upstream, is the answer; the key goes to no second address
    from ratefleet.workers.executor import build_client

    async with _Http(lambda path: (200, {})) as evil:
        def upstream_reply(path):
            return (302, {"location": f"{evil.url}/steal"}) if path.startswith("/v1/chat") else (301, {"location": "/v1/other"})

        async with _Http(upstream_reply) as upstream:
            client = build_client(transport, 4)
            try:
                config = UpstreamConfig(base_url=upstream.url)
                result = await UpstreamExecutor(client).call(job(), config, SECRET)
                moved = await UpstreamExecutor(client).call(job(path="/v1/moved"), config, SECRET)
            finally:
                await client.aclose()
    assert result.response.status == 302 and result.kind == "bad_request"
    assert moved.response.status == 301 and moved.kind == "bad_request"
    assert evil.seen == [], "followed a redirect with the key"
    assert upstream.seen == [("/v1/chat/completions", f"Bearer {SECRET}"), ("/v1/moved", f"Bearer {SECRET}")]


@pytest.mark.anyio
@pytest.mark.parametrize("transport", ["aiohttp", "httpcore"])
async def test_worker_clients_never_follow_redirects_nor_use_env_proxies(transport):
    from ratefleet.workers.executor import build_client

    client = build_client(transport, 4)
    try:
        assert client.follow_redirects is False and client.trust_env is False
    finally:
        await client.aclose()


@pytest.mark.anyio
@pytest.mark.filterwarnings("ignore:.*literal secret")
@pytest.mark.parametrize("around", [" ", "\t", "  ", " \t", "\n", "\r\n"])
@pytest.mark.parametrize("source", ["env", "literal"])
async def test_whitespace_around_a_secret_never_leaks_through_an_echo(monkeypatch, around, source):
    """A key set with whitespace around it (a `.env` line, `kubectl create secret --from-file`, a
    Windows file) is sent without it: an HTTP server strips it from the field (RFC 9110 5.5)
    before it echoes the value, so the masking must know the key in that form. Before, the
    resolver kept the spaces, the call worked and the echoed key was stored unmasked."""
    from ratefleet.schemas.config import parse_config
    from ratefleet.workers.secrets import SecretResolver

    monkeypatch.setenv("RF_EXEC_KEY", SECRET + around)
    ref = "env:RF_EXEC_KEY" if source == "env" else SECRET + around
    cfg = parse_config({"upstreams": {"u": {"base_url": "http://127.0.0.1:9"}},
                        "pools": {"p": {"keys": [{"id": "k1", "rps": 5, "secret": ref}]}}})
    _, secret = SecretResolver(cfg).pick("k1")

    def handler(request):
        sent = request.headers["authorization"].strip()  # what a server sees and echoes
        return httpx.Response(400, json={"error": {"message": f"Invalid authorization header: {sent}"}})

    result = await executor(handler).call(job(), UPSTREAM, secret)
    assert SECRET not in result.response.model_dump_json()
    assert result.response.json_body["error"]["message"] == "Invalid authorization header: Bearer ***"


def _dripping(content_type: str, gaps: list[float], part: str | None = None):
    """A handler answering 200 with one part after each gap (seconds): an SSE data event, or `part`."""
    import anyio

    async def parts():
        for n, gap in enumerate(gaps):
            await anyio.sleep(gap)
            yield (part or f"data: {{\"n\": {n}}}\n\n").encode()

    def handler(request):
        return httpx.Response(200, headers={"content-type": content_type}, content=parts())

    return handler


@pytest.mark.anyio
async def test_a_streamed_answer_is_bounded_by_its_progress_not_as_a_whole():
    """8 parts 0.15 s apart with timeout_s = 0.5: a stream taking 1.2 s in all completes (it was
    cut at 0.5 s, then retried and paid again and again); the same body as JSON is still
    bounded as a whole; a stream pausing longer than timeout_s is a timeout."""
    import time as clock

    upstream = UpstreamConfig(base_url="https://api.example.test", timeout_s=0.5)
    seen: list[bytes] = []

    async def relay(chunk: bytes) -> None:
        seen.append(chunk)

    streamed = await executor(_dripping("text/event-stream", [0.15] * 8)).call(job(), upstream, SECRET, relay)
    assert streamed.kind == "ok" and len(seen) == 8
    unrelayed = await executor(_dripping("text/event-stream; charset=utf-8", [0.15] * 8)).call(job(), upstream, SECRET)
    assert unrelayed.kind == "ok"  # no relay (a queued job's stream): the same rule
    whole = await executor(_dripping("application/json", [0.15] * 8)).call(job(), upstream, SECRET)
    assert whole.kind == "upstream_error" and "timeout_s" in whole.error
    paused = await executor(_dripping("text/event-stream", [0.1, 0.1, 0.8, 0.1])).call(job(), upstream, SECRET)
    assert paused.kind == "upstream_error" and "timeout_s" in paused.error
    started = clock.monotonic()
    endless = await executor(_dripping("text/event-stream", [0.05] * 1000)).call(
        job(), UpstreamConfig(base_url="https://api.example.test", timeout_s=0.2), SECRET)
    took = clock.monotonic() - started
    assert endless.kind == "upstream_error" and 1.9 <= took < 4.0  # STREAM_MAX_FACTOR x timeout_s in all
    started = clock.monotonic()
    comments = await executor(_dripping("text/event-stream", [0.1] * 100, part=": keep-alive\n\n")).call(
        job(), upstream, SECRET)
    took = clock.monotonic() - started
    assert comments.kind == "upstream_error" and took < 1.5  # comments only: no progress, timeout_s as a whole
