"""The worker's upstream client keeps no cookies (workers/executor.py `NoCookies`, and
aiohttp's `DummyCookieJar` under the aiohttp transport): a `Set-Cookie` in one answer never
rides along on a later call, which may be another job's on another key. Also: the answer's
headers are read once and still reach the Result and the rate-limit signals as before."""

from __future__ import annotations

import socket

import pytest
from aiohttp import web

from ratefleet.schemas import Job, UpstreamConfig
from ratefleet.workers.executor import UpstreamExecutor, build_client

JOB = Job.model_validate({"request": {"path": "/v1/chat/completions", "json": {"model": "m"}}})


async def _serve(app: web.Application) -> tuple[web.AppRunner, str]:
    runner = web.AppRunner(app)
    await runner.setup()
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    await web.TCPSite(runner, "127.0.0.1", port).start()
    return runner, f"http://127.0.0.1:{port}"


@pytest.mark.anyio
@pytest.mark.parametrize("transport", ["aiohttp", "httpcore"])
@pytest.mark.parametrize("host", ["127.0.0.1", "localhost"])  # aiohttp's default jar keeps a host name's cookies
async def test_a_cookie_set_by_one_answer_is_not_sent_with_the_next_call(transport, host):
    seen: list[str | None] = []

    async def answer(request: web.Request) -> web.Response:
        seen.append(request.headers.get("Cookie"))
        response = web.json_response({"ok": True})
        response.set_cookie("session", "from-key-a", path="/")
        return response

    app = web.Application()
    app.router.add_post("/v1/chat/completions", answer)
    runner, url = await _serve(app)
    client = build_client(transport, 2, ["Authorization"])
    try:
        executor = UpstreamExecutor(client)
        upstream = UpstreamConfig(base_url=url.replace("127.0.0.1", host))
        for secret in ("sk-key-a", "sk-key-b"):
            assert (await executor.call(JOB, upstream, secret)).kind == "ok"
    finally:
        await client.aclose()
        await runner.cleanup()
    assert seen == [None, None]


@pytest.mark.anyio
async def test_answer_headers_reach_the_result_and_the_rate_limit_signals():
    async def answer(request: web.Request) -> web.Response:
        headers = {"X-Request-Id": "r-1", "X-RateLimit-Remaining-Requests": "7",
                   "X-RateLimit-Reset-Requests": "2s", "Retry-After": "3", "X-Other": "dropped"}
        return web.json_response({"error": {"type": "rate_limit"}}, status=429, headers=headers)

    app = web.Application()
    app.router.add_post("/v1/chat/completions", answer)
    runner, url = await _serve(app)
    client = build_client("aiohttp", 2, ["Authorization"])
    try:
        result = await UpstreamExecutor(client).call(JOB, UpstreamConfig(base_url=url), "sk-key")
    finally:
        await client.aclose()
        await runner.cleanup()
    assert result.kind == "rate_limited" and result.retry_after_s == 3.0
    assert result.ratelimit.remaining_requests == 7.0 and result.ratelimit.reset_requests_s == 2.0
    assert result.response.headers == {"content-type": "application/json; charset=utf-8", "x-request-id": "r-1",
                                       "x-ratelimit-remaining-requests": "7", "x-ratelimit-reset-requests": "2s",
                                       "retry-after": "3"}
