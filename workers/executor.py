"""The upstream executor: one shared httpx.AsyncClient per worker process.

The transport is a setting (`workers.transport`): `aiohttp` (httpx-aiohttp, the default;
it keeps its speed as calls overlap) or `httpcore` (httpx's own pool, which slows down
with many calls in flight; see ../shared/measurements.md). Over aiohttp, a call made while
no span records skips httpx's object model and goes to the aiohttp session itself, with the
bytes httpx would send (workers/direct.py). Redirects are never followed and proxies from the
environment are ignored, so a key only ever goes to its upstream.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace
from functools import lru_cache
from http.cookiejar import CookieJar
from typing import Any

import aiohttp
import aiohttp.http_exceptions
import anyio
import httpx
from httpx_aiohttp import AiohttpTransport
from opentelemetry import trace
from pydantic_core import PydanticCustomError, to_json

from ratefleet.runtime.tracing import inject
from ratefleet.schemas import ErrorCode, Job, ResponseInfo, UpstreamConfig
from ratefleet.schemas.config import KEEPALIVE_S
from ratefleet.schemas.errors import InvalidRequest
from ratefleet.schemas.job import check_header
from ratefleet.schemas.outcome import OutcomeKind, RateLimitInfo
from ratefleet.schemas.ratelimit_scope import RateLimitScope, rate_limit_scope
from ratefleet.schemas.signals import (
    KEY_SCOPED_CODES,
    MODEL_UNAVAILABLE_CODES,
    classify,
    parse_ratelimit,
    provider_code,
    retry_after_of,
)
from ratefleet.workers.body import MASK, body_fields
from ratefleet.workers.direct import Answer, DirectRequest, HttpxAnswer, RequestBuilder, httpx_url
from ratefleet.workers.http_spans import traced_transport
from ratefleet.workers.usage import answer_cost, error_body, stream_cost, stream_error

ChunkSink = Callable[[bytes], Awaitable[None]]
KEPT_HEADERS = ("content-type", "retry-after", "x-request-id", "openai-processing-ms")
try:  # the Content-Encodings httpx decodes here (br and zstd only with brotli/zstandard installed)
    from httpx._decoders import SUPPORTED_DECODERS as _DECODED
except ImportError:  # pragma: no cover - a future httpx: assume the always-present ones
    _DECODED = {"identity": None, "gzip": None, "deflate": None}


@dataclass(frozen=True)
class CallResult:
    """What one upstream call produced, already classified for the dispatcher."""

    kind: OutcomeKind
    response: ResponseInfo | None
    error: str | None
    retry_after_s: float | None
    ratelimit: RateLimitInfo | None
    actual_cost: float | None
    latency_ms: float
    code: ErrorCode | None = None  # ends the job as it is (e.g. response_too_large)
    provider_code: str | None = None  # the provider's error code/type (signals.provider_code)
    scope: RateLimitScope | None = None  # a 429's verdict: the key's or this request's (ratelimit_scope.py)


# answers the HTTP client could not parse, raised by aiohttp through httpx-aiohttp (which maps its
# connection and timeout errors to httpx's, but not these): an upstream error, never "a fault of
# the worker" (that path gives the delivery back without counting the paid call)
_UNREADABLE = (aiohttp.ClientError, aiohttp.http_exceptions.HttpProcessingError)
# bytes of one header line (and of the status line) the aiohttp transport reads; aiohttp's own limit
# is 8,190, so a proxy's 10 kB cookie or debug header on a 200 was an unreadable answer, retried and
# paid max_attempts times (a provider trial: 30 paid calls for 6 jobs, all failed); httpx's own
# transport (h11) reads up to 16 kB of head
MAX_HEADER_LINE_BYTES = 64 * 1024


class UpstreamClient(httpx.AsyncClient):
    """The worker's httpx client (`build_client`). `direct`: its httpx-aiohttp transport when
    the transport setting is `aiohttp`, whose aiohttp session the executor calls itself while
    no span records (workers/direct.py); None with `httpcore`."""

    def __init__(self, *, direct: AiohttpTransport | None = None, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.direct = direct


def build_client(transport: str, slots: int, secret_headers: Iterable[str] = (), *,
                 keepalive_s: float = KEEPALIVE_S) -> UpstreamClient:
    """The worker's client, `slots` connections at most, each kept `keepalive_s` seconds idle
    (`workers.keepalive_s`). With opentelemetry-instrumentation-httpx installed (the `[otel]`
    extra) each call is an HTTP client span while spans record (see workers/http_spans.py;
    `secret_headers`, the upstreams' auth headers, are never recorded on it)."""
    limits = httpx.Limits(max_connections=slots, max_keepalive_connections=slots, keepalive_expiry=keepalive_s)
    direct = _aiohttp_transport(limits) if transport == "aiohttp" else None
    inner: httpx.AsyncBaseTransport
    if direct is not None:
        inner = direct
    else:
        inner = httpx.AsyncHTTPTransport(limits=limits, trust_env=False)
    return UpstreamClient(direct=direct, transport=traced_transport(inner, secret_headers), trust_env=False,
                          follow_redirects=False, cookies=NoCookies())


def _aiohttp_transport(limits: httpx.Limits) -> AiohttpTransport:
    """httpx-aiohttp's transport over an aiohttp session made as its own `get_client` makes
    it (a TCPConnector of `limits.max_connections`, its keep-alive expiry, its SSL context),
    but with aiohttp's `DummyCookieJar`: the session's default jar stored every `Set-Cookie`
    of an answer from a host name (not from an IP address) and sent it with later calls to
    that host, past httpx's `NoCookies`. The session is made at the first call, inside the
    running loop aiohttp needs."""

    def session() -> aiohttp.ClientSession:
        limit = {} if limits.max_connections is None else {"limit": limits.max_connections}
        connector = aiohttp.TCPConnector(keepalive_timeout=limits.keepalive_expiry, ssl=transport.ssl_context, **limit)
        return aiohttp.ClientSession(connector=connector, cookie_jar=aiohttp.DummyCookieJar(),
                                     max_line_size=MAX_HEADER_LINE_BYTES, max_field_size=MAX_HEADER_LINE_BYTES)

    transport = AiohttpTransport(limits=limits, trust_env=False, client=session)
    return transport


class NoCookies(CookieJar):
    """A cookie jar that keeps nothing: a `Set-Cookie` of one upstream answer is never sent
    with a later call, which may be another job's on another key. It also spares the
    worker httpx's cookie handling of every answer (an email.message.Message built from all
    response headers, ~40 µs a call measured here)."""

    def extract_cookies(self, response: Any, request: Any) -> None:
        return None

    def set_cookie(self, cookie: Any) -> None:
        return None


def still_encoded(content_encoding: str | None) -> bool:
    """True when httpx leaves a body with this Content-Encoding (RFC 9110 8.4) as it came:
    a coding it cannot decode here, e.g. `br` without the brotli package."""
    codings = [c.strip().lower() for c in (content_encoding or "").split(",") if c.strip()]
    return any(c not in _DECODED for c in codings)


def kept_headers(received: dict[str, str], secret: str, *, ratelimit: bool = True,
                 encoded: bool = False) -> dict[str, str]:
    """The answer's headers worth keeping (lower-case names: KEPT_HEADERS, the `x-ratelimit-*`
    ones unless `ratelimit` is False, `content-encoding` of a body left `encoded`), the key's
    secret masked as MASK (`***`) wherever the upstream echoes it. A Result's (`_response_info`) and a
    streamed answer's first chunk's (`on_answer`) are made here, so both mask alike."""
    return {k: v.replace(secret, MASK) if secret else v for k, v in received.items()
            if k in KEPT_HEADERS or (ratelimit and k.startswith("x-ratelimit-")) or (encoded and k == "content-encoding")}


def _response_info(status: int, raw: bytes, secret: str, received: dict[str, str]) -> ResponseInfo:
    """Status, the headers worth keeping, and the body (see workers/body.py); the key's secret
    is masked wherever the upstream echoes it (some providers quote the key in their 401 message).
    A body httpx could not decode keeps its `content-encoding` header and comes as `body_b64`
    (the exact encoded bytes), so the caller can decode it; a decoded body drops the header.
    `received`: the answer's headers as a dict (workers/direct.py `Answer.headers`)."""
    encoded = still_encoded(received.get("content-encoding"))
    headers = kept_headers(received, secret, encoded=encoded)
    content_type = "application/octet-stream" if encoded else received.get("content-type")
    return ResponseInfo(status=status, headers=headers, **body_fields(raw, content_type, secret))


class UpstreamExecutor:
    """Makes one upstream call per `call()`. `max_response_bytes`: the largest body read
    (bytes); a longer answer is cut off there and ends the job `response_too_large`.
    `validated`: every job it is given was validated by the Job model (the worker's are,
    `Assignment.job_model`), so a JSON body holds only strict JSON values (schemas/job.py) and
    is written by pydantic-core's encoder: the bytes httpx's `json=` writes (compact, UTF-8,
    httpx/_content.py `encode_json`), but for the notation of some floats (`1e-7` for `1e-07`,
    `0.00001` for `1e-05`: the same numbers), 5x faster (13 against 70 µs for a 32 KiB
    prompt). Otherwise httpx's rule encodes it, and refuses what is not JSON.
    `direct`: with a `build_client` client over aiohttp, a call made while no span records
    goes to the aiohttp session itself, the same bytes on the wire (workers/direct.py);
    False sends every call through httpx."""

    def __init__(self, client: httpx.AsyncClient, max_response_bytes: int = 64 << 20, *, validated: bool = False,
                 direct: bool = True):
        self._client = client
        self._max_response_bytes = max_response_bytes
        self._validated = validated
        self._direct = client.direct if direct and isinstance(client, UpstreamClient) else None
        self._requests = RequestBuilder(client) if self._direct is not None else None

    def _parts(self, job: Job, upstream: UpstreamConfig) -> tuple[list[tuple[str, str]], dict[str, Any]]:
        """The job's headers (checked: RFC 9110 tokens, latin-1 values, none ratefleet sets) and
        its body as keyword arguments (`content` bytes, or `json` for httpx's encoder)."""
        request = job.request
        headers = []
        for name, value in request.headers.items():
            check_header(name, value, upstream.auth_header)
            name.encode("ascii"), value.encode("latin-1")  # (raise UnicodeEncodeError: a ValueError)
            headers.append((name, value))
        body: dict[str, Any] = {}
        if request.json_body is not None and self._validated:
            body["content"] = to_json(request.json_body)
            if not any(name.lower() == "content-type" for name in request.headers):
                headers.append(("Content-Type", "application/json"))  # as httpx's json= sets it
        elif request.json_body is not None:
            body["json"] = request.json_body
        elif request.body is not None:
            body["content"] = request.body.encode("utf-8")
        return headers, body

    def build_request(self, job: Job, upstream: UpstreamConfig) -> httpx.Request:
        """The HTTP request of `job`, without the key. Raises InvalidRequest when the job
        cannot go on the wire (its fault, so no call and no retry): a header that is not a
        token or not latin-1 (RFC 9110 sections 5.1, 5.5), the upstream's auth header, a
        body that is not strict JSON or UTF-8. A non-ASCII (obs-text) header value goes as
        one latin-1 byte per character with the `httpcore` transport, and as UTF-8 with
        `aiohttp` (aiohttp encodes every header value so); ASCII values are the same on both."""
        request = job.request
        with _invalid_request():
            headers, body = self._parts(job, upstream)
            encoded = [(name.encode("ascii"), value.encode("latin-1")) for name, value in headers]
            built = self._build(request.method, upstream.base_url + request.path, params=request.query or None,
                                headers=encoded, timeout=upstream.timeout_s, **body)
        return built

    def _build(self, method: str, url: str, *, params: Any, headers: list, timeout: float, **body: Any) -> httpx.Request:
        """`client.build_request`, without parsing the same URL again for every call: the
        client's headers with the job's over them, the call's timeout. Query parameters, a
        client with a base_url or cookies take httpx's own path (same request either way).
        `params` are merged into a query the path has already (`?x=1`; a name in both takes the
        job's `query` values, and the path's query is written again in httpx's encoding): httpx
        0.28's `params=` replaced that query, and a job's own `?x=1` was lost."""
        client = self._client
        if params or client.cookies or str(client.base_url):
            target = httpx_url(url).copy_merge_params(params) if params else url
            return client.build_request(method, target, headers=headers, timeout=timeout, **body)
        merged = httpx.Headers(client.headers)
        if headers:
            merged.update(headers)
        return httpx.Request(method, httpx_url(url), headers=merged, extensions={"timeout": _timeouts(timeout)}, **body)

    def _direct_request(self, job: Job, upstream: UpstreamConfig, secret: str) -> DirectRequest:
        """`build_request` plus the key and the trace, for the aiohttp session: InvalidRequest as
        `build_request` raises it; a secret beyond latin-1 raises UnicodeEncodeError, as httpx does
        (workers/secrets.py marks such a secret unusable first)."""
        assert self._requests is not None
        request = job.request
        auth = (upstream.auth_header, f"{upstream.auth_scheme} {secret}" if upstream.auth_scheme else secret)
        auth[1].encode("latin-1")  # httpx sets it with the request headers' latin-1: a UnicodeEncodeError, not the job's
        trace: dict[str, str] = {}
        inject(trace)  # the job's trace goes on to the upstream
        with _invalid_request():
            headers, body = self._parts(job, upstream)
            return self._requests.build(request.method, upstream.base_url + request.path, request.query or None,
                                        headers, auth, trace, content=body.get("content"), json_body=body.get("json"),
                                        timeout=upstream.timeout_s)

    async def call(self, job: Job, upstream: UpstreamConfig, secret: str, on_chunk: ChunkSink | None = None,
                   on_answer: Callable[[dict[str, str]], None] | None = None) -> CallResult:
        """One upstream call, bounded as a whole by `upstream.timeout_s` seconds: connect,
        send, headers and the entire body. httpx's own timeouts are per phase and per read
        (an upstream dripping a byte a second never trips them), so an overall deadline
        wraps the request and its body read; past it the call is a `timeout` outcome (an
        upstream_error: a breaker failure, retried by policy). A 429 carries its scope; one
        that can never fit (the request exceeds the whole limit) ends the job as
        `request_too_large`. Raises InvalidRequest (before any call) when the job cannot be sent.
        `on_chunk` is awaited with each chunk of a successful server-sent-events answer as it is read;
        `on_answer` is called with that answer's KEPT_HEADERS (lower-case names, the secret masked
        as in the Result) before its first chunk.

        A successful server-sent-events answer (`"stream": true`) is bounded by its progress
        instead: `timeout_s` from each part of it to the next, and STREAM_MAX_FACTOR x
        timeout_s in all. A long generation streams for minutes while every part comes
        within seconds; cut at `timeout_s` as a whole, it was retried, and paid, again and again
        (a gateway trial: 8 parts 1 s apart, timeout_s 5: three calls, then `expired`)."""
        opened: Callable[[], Awaitable[Answer]]
        if self._direct is not None and not self._client.is_closed and not trace.get_current_span().is_recording():
            direct, transport = self._direct_request(job, upstream, secret), self._direct
            opened = lambda: direct.send(transport)  # noqa: E731
        else:
            built = self.build_request(job, upstream)
            # latin-1, as the job's headers were encoded (httpx would guess and may double-encode)
            built.headers.encoding = "iso-8859-1"
            built.headers[upstream.auth_header] = f"{upstream.auth_scheme} {secret}" if upstream.auth_scheme else secret
            inject(built.headers)  # the job's trace goes on to the upstream (the HTTP span's, when instrumented)

            async def opened() -> Answer:
                return HttpxAnswer(await self._client.send(built, stream=True))
        started = time.perf_counter()
        try:
            with anyio.fail_after(upstream.timeout_s) as deadline:
                result = await self._send(opened, upstream, secret, started, on_chunk, deadline, on_answer)
        except TimeoutError:
            return self._failed("timeout", f"the call did not finish within timeout_s = {upstream.timeout_s}s "
                                "(connect, send, headers and body; a streamed answer: between two parts, "
                                f"at most {STREAM_MAX_FACTOR} x timeout_s in all)", started)
        return _scoped(result, job.cost) if result.kind == OutcomeKind.RATE_LIMITED else result

    async def _send(self, opened: Callable[[], Awaitable[Answer]], upstream: UpstreamConfig, secret: str,
                    started: float, on_chunk: ChunkSink | None = None,
                    deadline: anyio.CancelScope | None = None,
                    on_answer: Callable[[dict[str, str]], None] | None = None) -> CallResult:
        try:
            answer = await opened()
            received = answer.headers
            streamed = _event_stream(answer.status, received)  # read once: relayed as it comes, its usage from its events
            try:
                relay = None
                if streamed:
                    relay = on_chunk
                    if on_answer is not None:  # the headers a Result keeps (secret masked), before the chunks
                        on_answer(kept_headers(received, secret, ratelimit=False))
                    if deadline is not None:
                        relay = _progress_deadline(deadline, upstream.timeout_s, relay)
                raw = await answer.read(self._max_response_bytes, relay)
            finally:
                await answer.close()  # (also when call()'s deadline cancels the read: not leaked)
        except httpx.TimeoutException as exc:
            # httpx-aiohttp maps every aiohttp connection error to ConnectTimeout: what it was is its cause
            cause = exc.__cause__
            if isinstance(cause, aiohttp.ClientSSLError):
                return self._failed("connection", f"{type(cause).__name__} calling the upstream: the TLS handshake "
                                    "failed (a certificate this worker does not trust, or not TLS at that address)",
                                    started)
            if isinstance(cause, aiohttp.ClientConnectorError):
                return self._failed("connection", "ConnectError calling the upstream (could not connect: nothing "
                                    "answers at its address, or the connection was refused)", started)
            if isinstance(cause, aiohttp.ServerDisconnectedError):
                return self._failed("connection", "ServerDisconnectedError calling the upstream: it closed the "
                                    "connection before its answer was complete", started)
            return self._failed("timeout", f"no answer from the upstream within {upstream.timeout_s}s", started)
        except httpx.DecodingError as exc:
            return self._undecodable(answer, exc, secret, started)
        except httpx.HTTPError as exc:
            return self._failed("connection", f"{type(exc).__name__} calling the upstream", started)
        except _UNREADABLE as exc:  # what httpx-aiohttp passes through untranslated: an answer aiohttp cannot parse
            return self._failed("connection", f"{type(exc).__name__}: the upstream's answer could not be read "
                                "(not HTTP, or a header line longer than the HTTP client accepts)", started)
        except UnicodeEncodeError:  # httpx-aiohttp's `reason.encode()`, outside its error mapping (the httpx path only)
            return self._failed("connection", "the upstream's answer could not be passed on by httpx-aiohttp: its "
                                "status line's reason phrase is not UTF-8", started)
        latency_ms = (time.perf_counter() - started) * 1000
        status = answer.status
        if raw is None:
            return self._too_large(status, secret, latency_ms, received)
        info = _response_info(status, raw, secret, received)
        cost = _reported_cost(info, raw, upstream.usage_path, streamed=streamed)
        failure = stream_error(raw) if streamed else error_body(status, info.json_body)
        if failure is not None:
            return _failed_answer(info, failure, received, cost, latency_ms, streamed=streamed)
        success = 200 <= status < 300
        code = None if success else provider_code(info.json_body)
        return CallResult(
            kind=classify(status, None, code), response=info, error=None, provider_code=code,
            retry_after_s=retry_after_of(received, info.json_body, time.time()),
            ratelimit=parse_ratelimit(received, time.time()), actual_cost=cost, latency_ms=latency_ms,
        )

    def _too_large(self, status: int, secret: str, latency_ms: float, received: dict[str, str]) -> CallResult:
        """The body passed max_response_bytes: final for the job (asking again would cost
        another call for the same answer), and no fault of the key (the upstream answered)."""
        info = _response_info(status, b"", secret, received)
        message = (f"the upstream's answer (HTTP {status}, "
                   f"{info.headers.get('content-type') or 'no content-type'}) is larger than "
                   f"workers.max_response_bytes = {self._max_response_bytes} bytes; reading stopped there")
        return CallResult(kind=OutcomeKind.BAD_REQUEST, response=info, error=message,
                          retry_after_s=None, ratelimit=parse_ratelimit(received, time.time()), actual_cost=None,
                          latency_ms=latency_ms, code=ErrorCode.RESPONSE_TOO_LARGE)

    @staticmethod
    def _undecodable(answer: Answer, exc: Exception, secret: str, started: float) -> CallResult:
        """The upstream answered, but its body is not in the Content-Encoding it names (a proxy
        labelling plain JSON `gzip`): final, as a bad request (the key is fine), for a call
        asked again gets the same bytes and is paid again (before: a "connection" error retried
        to max_attempts, five paid calls each answered 200)."""
        received = answer.headers
        info = _response_info(answer.status, b"", secret, received)
        encoding = received.get("content-encoding") or "none"
        message = (f"the upstream answered HTTP {answer.status}, but its body could not be decoded as its "
                   f"Content-Encoding ({encoding}) says ({type(exc).__name__}); not retried (each call is paid): "
                   "the upstream, or a proxy before it, labels its answers wrongly")
        return CallResult(kind=OutcomeKind.BAD_REQUEST, response=info, error=message, retry_after_s=None,
                          ratelimit=parse_ratelimit(received, time.time()), actual_cost=None,
                          latency_ms=(time.perf_counter() - started) * 1000, code=ErrorCode.UPSTREAM_ERROR)

    @staticmethod
    def _failed(what: str, message: str, started: float) -> CallResult:
        return CallResult(kind=classify(None, what), response=None, error=message, retry_after_s=None,
                          ratelimit=None, actual_cost=None, latency_ms=(time.perf_counter() - started) * 1000)


@lru_cache(maxsize=64)
def _timeouts(seconds: float) -> dict[str, float | None]:
    """httpx's per-phase timeouts of one call as its request extension (made once per value)."""
    return httpx.Timeout(seconds).as_dict()


@contextmanager
def _invalid_request() -> Iterator[None]:
    """A job whose request cannot be built raises InvalidRequest (its fault: no call, no retry)."""
    try:
        yield
    except (PydanticCustomError, ValueError, TypeError, RecursionError, httpx.InvalidURL) as exc:
        message = exc.message() if isinstance(exc, PydanticCustomError) else f"{type(exc).__name__}: {exc}"
        raise InvalidRequest(f"the job's HTTP request cannot be built: {message}") from None


def _reported_cost(info: ResponseInfo, raw: bytes, usage_path: str | None, streamed: bool) -> float | None:
    """The answer's actual cost by `usage_path` (workers/usage.py): from its JSON body, or
    from its events when it was streamed (`streamed`: a successful server-sent-events
    answer), whose usage comes in a chunk of its own. Before, a streamed answer reported
    no cost, and jobs estimated below their usage overspent the key's tokens per minute."""
    if not usage_path:
        return None
    return stream_cost(raw, usage_path) if streamed else answer_cost(info.json_body, usage_path)


STREAM_MAX_FACTOR = 10  # a streamed answer may take this many times timeout_s in all (60 s: 10 minutes)


def _progress_deadline(deadline: anyio.CancelScope, idle_s: float, relay: ChunkSink | None) -> ChunkSink:
    """A chunk sink that moves `deadline` to `idle_s` seconds after each chunk holding answer
    data (never past STREAM_MAX_FACTOR x idle_s after the call began), then hands the chunk to
    `relay`. A chunk of SSE comments only (`: keep-alive`, WHATWG HTML 9.2.6: lines starting
    with a colon are ignored) is no progress: an upstream sending only those held a key's slot
    for 10 x timeout_s on every attempt (a reviewer's trial)."""
    latest = deadline.deadline - idle_s + STREAM_MAX_FACTOR * idle_s

    async def on_chunk(chunk: bytes) -> None:
        if b"data" in chunk:
            deadline.deadline = min(latest, anyio.current_time() + idle_s)
        if relay is not None:
            await relay(chunk)

    return on_chunk


_STREAM_RATE_LIMITED = frozenset({"rate_limit_error", "rate_limit_exceeded"})  # Anthropic's, OpenAI's
# codes and types saying the request itself is wrong (OpenAI's and Anthropic's `invalid_request_error`
# type, OpenAI's codes for it): such an error in a 2xx body is a bad request, as its 400 would be, not an
# upstream error retried on every key and counted against their breakers (a reviewer)
_REQUEST_ERRORS = frozenset({"invalid_request_error", "context_length_exceeded", "string_above_max_length",
                             "invalid_value", "invalid_prompt", "invalid_type", "bad_request", "validation_error"})


def _failed_answer(info: ResponseInfo, failure: dict[str, Any], received: dict[str, str], cost: float | None,
                   latency_ms: float, streamed: bool = True) -> CallResult:
    """A streamed answer that began with a 2xx and ended with an error event (usage.stream_error),
    or (`streamed` False) a 2xx whose JSON body is only an error (usage.error_body): not a
    success. Its error's code classifies it as the same code would as a status: key-scoped
    (the key out), a rate limit (a 429's wait), else an upstream error (Anthropic's
    overloaded_error, a server error: a breaker failure, retried by policy). Before, such an answer
    was stored `succeeded` with the answer cut off, or with no answer at all (provider trials)."""
    code = provider_code(failure)
    error = failure.get("error") if isinstance(failure.get("error"), dict) else {}
    about_key = code in KEY_SCOPED_CODES or code in MODEL_UNAVAILABLE_CODES  # (invalid_api_key has a request type)
    if not streamed and not about_key and (code in _REQUEST_ERRORS or error.get("type") in _REQUEST_ERRORS):
        kind = OutcomeKind.BAD_REQUEST
    elif code in KEY_SCOPED_CODES and streamed:
        # (not from a 2xx body that is only an error: an upstream echoing its request would let a
        # job word the error that takes the key out; such a body is an upstream error, retried)
        kind = OutcomeKind.KEY_ERROR
    elif code in _STREAM_RATE_LIMITED:
        kind = OutcomeKind.RATE_LIMITED
    else:
        kind = OutcomeKind.UPSTREAM_ERROR
    if not streamed:
        message = (f"the upstream answered HTTP {info.status} with an error body{f' ({code})' if code else ''} "
                   "instead of an answer (a proxy passing on the provider's error)")
    elif code == "stream_cut_off":
        message = f"the upstream's streamed answer (HTTP {info.status}) stopped before its end event (cut off)"
    else:
        message = (f"the upstream's streamed answer (HTTP {info.status}) ended with an error event"
                   f"{f' ({code})' if code else ''} instead of its end")
    now = time.time()
    return CallResult(kind=kind, response=info, error=message, provider_code=code,
                      retry_after_s=None if streamed else retry_after_of(received, info.json_body, now),
                      ratelimit=parse_ratelimit(received, now), actual_cost=cost, latency_ms=latency_ms)


def _event_stream(status: int, headers: dict[str, str]) -> bool:
    """A successful answer streamed as server-sent events (WHATWG HTML 9.2), decoded by httpx."""
    content_type = headers.get("content-type", "")
    return (200 <= status < 300 and content_type.split(";", 1)[0].strip().lower() == "text/event-stream"
            and not still_encoded(headers.get("content-encoding")))


def _scoped(result: CallResult, cost: float | None) -> CallResult:
    """A 429 with its scope; one that can never fit ends the job (`request_too_large`) and is
    reported as a bad request (the job's fault, like a 413), so the key is left alone."""
    body = result.response.json_body if result.response is not None else None
    scope = rate_limit_scope(result.ratelimit, body, cost)
    if scope is None or not scope.never_fits:
        return replace(result, scope=scope)
    message = (f"the upstream answered 429 because this request {scope.describe_too_large()} "
               f"({scope.reason}); waiting cannot make it fit, so it is not retried: make the request smaller")
    return replace(result, kind=OutcomeKind.BAD_REQUEST, scope=scope, code=ErrorCode.REQUEST_TOO_LARGE, error=message)
