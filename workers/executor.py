"""The upstream executor: one shared httpx.AsyncClient per worker process.

The transport is a setting (`workers.transport`): `aiohttp` (httpx-aiohttp, the default;
it keeps its speed as calls overlap) or `httpcore` (httpx's own pool, which slows down
with many calls in flight; see ../shared/measurements.md). Redirects are never followed
and proxies from the environment are ignored, so a key only ever goes to its upstream.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass
from typing import Any

import anyio
import httpx

from dispatcher.core.signals import classify, parse_ratelimit, parse_retry_after
from schemas import Job, ResponseInfo, UpstreamConfig

KEPT_HEADERS = ("content-type", "retry-after", "x-request-id", "openai-processing-ms")
MAX_BODY_CHARS = 1 << 20


@dataclass(frozen=True)
class CallResult:
    """What one upstream call produced, already classified for the dispatcher."""

    kind: str
    response: ResponseInfo | None
    error: str | None
    retry_after_s: float | None
    ratelimit: dict[str, float | None] | None
    actual_cost: float | None
    latency_ms: float


def build_client(transport: str, slots: int) -> httpx.AsyncClient:
    limits = httpx.Limits(max_connections=slots, max_keepalive_connections=slots)
    if transport == "aiohttp":
        from httpx_aiohttp import AiohttpTransport

        return httpx.AsyncClient(transport=AiohttpTransport(limits=limits, trust_env=False), trust_env=False,
                                 follow_redirects=False)
    return httpx.AsyncClient(limits=limits, trust_env=False, follow_redirects=False)


def _dig(data: Any, path: str) -> float | None:
    for part in path.split("."):
        if not isinstance(data, dict) or part not in data:
            return None
        data = data[part]
    return float(data) if isinstance(data, (int, float)) and not isinstance(data, bool) else None


def _response_info(response: httpx.Response, secret: str) -> ResponseInfo:
    """Status, the headers worth keeping, and the body; the key's secret is masked wherever
    the upstream echoes it (some providers quote the key in their 401 message)."""
    headers = {k: v.replace(secret, "***") for k, v in response.headers.items()
               if k in KEPT_HEADERS or k.startswith("x-ratelimit-")}
    text = response.text
    if secret and secret in text:
        text = text.replace(secret, "***")
    body_json = None
    if "json" in response.headers.get("content-type", ""):
        try:
            body_json = json.loads(text)
            text = None
        except ValueError:
            pass
    if text is not None and len(text) > MAX_BODY_CHARS:
        text = text[:MAX_BODY_CHARS]
    return ResponseInfo(status=response.status_code, headers=headers, json=body_json, body=text or None)


class UpstreamExecutor:
    def __init__(self, client: httpx.AsyncClient):
        self._client = client

    async def call(self, job: Job, upstream: UpstreamConfig, secret: str) -> CallResult:
        """One upstream call, bounded as a whole by `upstream.timeout_s` seconds: connect,
        send, headers and the entire body. httpx's own timeouts are per phase and per read
        (an upstream dripping a byte a second never trips them), so an overall deadline
        wraps the request and its body read; past it the call is a `timeout` outcome
        (an upstream_error: a breaker failure, retried by policy)."""
        started = time.perf_counter()
        try:
            with anyio.fail_after(upstream.timeout_s):
                return await self._call(job, upstream, secret)
        except TimeoutError:
            return self._failed("timeout", f"the call did not finish within timeout_s = {upstream.timeout_s}s "
                                "(connect, send, headers and body)", started)

    async def _call(self, job: Job, upstream: UpstreamConfig, secret: str) -> CallResult:
        request = job.request
        auth = f"{upstream.auth_scheme} {secret}" if upstream.auth_scheme else secret
        headers = {**request.headers, upstream.auth_header: auth}
        kwargs: dict[str, Any] = {"params": request.query or None, "headers": headers, "timeout": upstream.timeout_s}
        if request.json_body is not None:
            kwargs["json"] = request.json_body
        elif request.body is not None:
            kwargs["content"] = request.body.encode()
        started = time.perf_counter()
        try:
            response = await self._client.request(request.method, upstream.base_url + request.path, **kwargs)
        except httpx.TimeoutException:
            return self._failed("timeout", f"no answer from the upstream within {upstream.timeout_s}s", started)
        except httpx.HTTPError as exc:
            return self._failed("connection", f"{type(exc).__name__} calling the upstream", started)
        latency_ms = (time.perf_counter() - started) * 1000
        info = _response_info(response, secret)
        cost = _dig(info.json_body, upstream.usage_path) if upstream.usage_path else None
        limit = parse_ratelimit(response.headers, time.time())
        return CallResult(
            kind=classify(response.status_code, None), response=info, error=None,
            retry_after_s=parse_retry_after(response.headers.get("retry-after"), time.time()),
            ratelimit=None if limit is None else asdict(limit),
            actual_cost=cost, latency_ms=latency_ms,
        )

    @staticmethod
    def _failed(what: str, message: str, started: float) -> CallResult:
        return CallResult(kind=classify(None, what), response=None, error=message, retry_after_s=None,
                          ratelimit=None, actual_cost=None, latency_ms=(time.perf_counter() - started) * 1000)
