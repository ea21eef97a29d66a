"""The /v1 request pipeline: auth, route, body, forced status, limits, then the answer.

Order matters and is part of the mock's behaviour:
401 (no or unknown secret) -> 404/405 (unknown route) -> 400 (bad body) -> the key's
forced status -> 429 (concurrency, requests, tokens; nothing spent) -> the call runs
(latency, ``"mock"`` directive, ``fail_rate``) and holds a concurrency slot until answered
(a streamed answer, ``"stream": true`` on chat completions: until its events start).
Only calls that got past the limits spend tokens: `tokens_per_call` each, or with it None what
a provider charges on entry (the prompt's tokens plus max_tokens per choice, `request_charge`),
corrected to the answer's usage when the call ends. A request charged more than the key's whole
`cost_per_minute` gets OpenAI's 429 "Request too large" (no Retry-After: no wait makes it fit).
The secret never leaves `read_secret`.
"""

from __future__ import annotations

import asyncio
import json
import math
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse

from ratefleet.mock import openai
from ratefleet.mock.limits import Admission, format_duration, ratelimit_headers
from ratefleet.mock.settings import MockSettings, check_status
from ratefleet.mock.state import KeyEntry, MockState

Builder = Callable[[dict[str, Any], int], dict[str, Any]]


@dataclass(frozen=True)
class Endpoint:
    method: str
    build: Builder
    charged: bool  # whether the call spends tokens from the cost bucket (tokens_per_call, or sized)


@dataclass(frozen=True)
class Directive:
    """A test's order for one call, from the body's ``"mock"`` object."""

    status: int | None = None
    sleep_s: float = 0.0
    retry_after: int = 1
    chunk_s: float = 0.0  # with "stream": true, the pause before each streamed chunk after the first
    stream: bool = False  # the body asked for "stream": true (chat completions answer as server-sent events)
    stream_usage: bool = False  # and "stream_options": {"include_usage": true} (a last chunk with the usage)


def error(status: int, message: str, headers: Mapping[str, str] | None = None, **kw: Any) -> Response:
    return JSONResponse(openai.error_body(status, message, **kw), status_code=status, headers=headers)


def refusal(entry: KeyEntry, admission: Admission, headers: dict[str, str], payload: dict[str, Any],
            cost: int) -> Response:
    """The 429 for a call the key's limits refused, worded as OpenAI words it."""
    if admission.reason == "too_large":
        limit = admission.tokens.limit if admission.tokens is not None else 0
        message = (f"Request too large for {payload.get('model', 'mock')} on tokens per min (TPM): Limit {limit}, "
                   f"Requested {cost}. The input or output tokens must be reduced in order to run successfully.")
        return error(429, message, headers, error_type="tokens")
    wait = "a moment" if math.isinf(admission.retry_after_s) else format_duration(admission.retry_after_s)
    message = f"Rate limit reached for key {entry.key.id} on {admission.reason}. Please try again in {wait}."
    return error(429, message, headers, error_type=admission.reason)


def _used_tokens(payload: dict[str, Any], charged: int) -> int:
    """The tokens the answer reports using (its `usage.total_tokens`), else what was charged."""
    usage = payload.get("usage")
    total = usage.get("total_tokens") if isinstance(usage, dict) else None
    return total if isinstance(total, int) and charged else charged


def read_secret(headers: Mapping[str, str], settings: MockSettings) -> str | None:
    """The secret from the auth header: ``<scheme> <secret>``, or bare when the scheme is ""."""
    value = headers.get(settings.auth_header)
    if not value:
        return None
    if settings.auth_scheme:
        scheme, _, secret = value.partition(" ")
        if scheme.lower() != settings.auth_scheme.lower():
            return None
        value = secret
    return value.strip() or None


def parse_directive(body: dict[str, Any]) -> Directive:
    raw = body.get("mock")
    if raw is None:
        return Directive()
    if not isinstance(raw, dict):
        raise ValueError("'mock' must be an object like {\"status\": 503} or {\"sleep_ms\": 200}")
    status = raw.get("status")
    check_status("mock.status", status)
    sleep_ms = raw.get("sleep_ms", 0)
    retry_after = raw.get("retry_after", 1)
    if isinstance(sleep_ms, bool) or not isinstance(sleep_ms, (int, float)) or not 0 <= sleep_ms <= 600_000:
        raise ValueError("mock.sleep_ms must be a number of milliseconds within 0..600000")
    if isinstance(retry_after, bool) or not isinstance(retry_after, int) or retry_after < 0:
        raise ValueError("mock.retry_after must be a whole number of seconds >= 0")
    completion_tokens = raw.get("completion_tokens", 0)
    if isinstance(completion_tokens, bool) or not isinstance(completion_tokens, int) or completion_tokens < 0:
        raise ValueError("mock.completion_tokens must be a whole number of tokens >= 0")
    chunk_ms = raw.get("chunk_ms", 0)
    if isinstance(chunk_ms, bool) or not isinstance(chunk_ms, (int, float)) or not 0 <= chunk_ms <= 60_000:
        raise ValueError("mock.chunk_ms must be a number of milliseconds within 0..60000")
    return Directive(status=status, sleep_s=sleep_ms / 1000.0, retry_after=retry_after, chunk_s=chunk_ms / 1000.0)


async def _events(chunks: list[dict[str, Any]], pause_s: float) -> Any:
    """Server-sent events as OpenAI streams them: `data: <chunk JSON>` blocks, then `data: [DONE]`."""
    for index, chunk in enumerate(chunks):
        if index and pause_s:
            await asyncio.sleep(pause_s)
        yield f"data: {json.dumps(chunk)}\n\n".encode()
    yield b"data: [DONE]\n\n"


async def read_body(request: Request) -> dict[str, Any]:
    """The JSON object body of a POST (GET has none); ValueError when it is not one."""
    if request.method != "POST":
        return {}
    raw = await request.body()
    try:
        body = json.loads(raw)
    except (ValueError, UnicodeDecodeError):
        raise ValueError("We could not parse the JSON body of your request.") from None
    if not isinstance(body, dict):
        raise ValueError("The request body must be a JSON object.")
    return body


class MockApi:
    """Request handler (`handle`) for every path under /v1/."""

    def __init__(self, state: MockState, clock: Callable[[], float]) -> None:
        self.state = state
        self.clock = clock
        self.endpoints = {
            "/v1/chat/completions": Endpoint("POST", openai.chat_completion, charged=True),
            "/v1/embeddings": Endpoint("POST", openai.embeddings, charged=True),
            "/v1/models": Endpoint("GET", openai.models, charged=False),
        }

    async def handle(self, request: Request) -> Response:
        now = self.clock()
        settings = self.state.settings
        entry = self.state.resolve(read_secret(request.headers, settings), now)
        try:
            response = await self._answer(request, entry, now)
        except BaseException:
            self.state.record(entry, self._summary(request), 499, now)
            raise
        self.state.record(entry, self._summary(request), response.status_code, now)
        # as OpenAI's API answers (its API reference, "Debugging requests"): an id per request, in every answer
        response.headers["x-request-id"] = f"req_{uuid.uuid4().hex}"
        return response

    @staticmethod
    def _summary(request: Request) -> tuple[str, str, str]:
        return request.method, request.url.path, request.headers.get("host", "")

    async def _answer(self, request: Request, entry: KeyEntry | None, now: float) -> Response:
        if entry is None:
            return error(401, "Incorrect API key provided.")
        entry.arrive(now)
        endpoint = self.endpoints.get(request.url.path)
        if endpoint is None:
            return error(404, f"Invalid URL ({request.method} {request.url.path})")
        if request.method != endpoint.method:
            return error(405, f"Method {request.method} not allowed for {request.url.path}")
        try:
            body = await read_body(request)
            options = body.get("stream_options")
            directive = replace(parse_directive(body), stream=body.get("stream") is True,
                                stream_usage=isinstance(options, dict) and options.get("include_usage") is True)
            fixed = self.state.settings.tokens_per_call
            payload = endpoint.build(body, fixed)
            cost = 0 if not endpoint.charged else fixed if fixed is not None else openai.request_charge(body)
        except ValueError as exc:
            return error(400, str(exc))
        if entry.forced_status is not None:
            return self._forced(entry.forced_status, {}, payload, retry_after=1)
        return await self._limited_call(entry, directive, payload, cost, now)

    async def _limited_call(
        self, entry: KeyEntry, directive: Directive, payload: dict[str, Any], cost: int, now: float
    ) -> Response:
        admission = entry.limiter.admit(now, cost)
        headers = ratelimit_headers(admission)
        if not admission.allowed:
            return refusal(entry, admission, headers, payload, cost)
        used = _used_tokens(payload, cost)
        entry.count_tokens(used, now)
        entry.note_in_flight()
        try:
            delay = self.state.latency_s() + directive.sleep_s
            if delay > 0:
                await asyncio.sleep(delay)
            status = directive.status
            if status is None and self.state.should_fail():
                status = self.state.config.fail_status
            if payload.get("object") == "chat.completion" and directive.stream and status in (None, 200):
                chunks = openai.chat_completion_chunks(payload, directive.stream_usage)
                return StreamingResponse(_events(chunks, directive.chunk_s), headers=headers,
                                         media_type="text/event-stream")
            return self._forced(status, headers, payload, retry_after=directive.retry_after)
        finally:
            entry.limiter.settle(cost, used, self.clock())
            entry.limiter.release()

    @staticmethod
    def _forced(status: int | None, headers: dict[str, str], payload: dict[str, Any], *, retry_after: int) -> Response:
        """The normal answer, or the forced status with an OpenAI-style error body."""
        if status is None or status == 200:
            return JSONResponse(payload, headers=headers)
        if status < 400:
            return Response(status_code=status, headers=headers)  # e.g. 204, 304: no body allowed
        if status == 429:
            headers = {**headers, "retry-after": str(retry_after)}
        return error(status, f"The mock upstream was told to answer {status}.", headers)
