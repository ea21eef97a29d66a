"""The worker's direct aiohttp path (workers/direct.py) against its httpx path, over a real
socket: every kind of job puts the same bytes on the wire, and every kind of answer (codings,
repeated and non-ASCII headers, server-sent events, caps, broken bodies, broken HTTP) comes back
as the same CallResult. The httpx path is the reference: it is what httpx over httpx-aiohttp did
before the direct path existed, and what still runs while a span records."""

from __future__ import annotations

import asyncio
import dataclasses
import gzip
import zlib

import pytest
from opentelemetry import context, trace
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.trace import NonRecordingSpan, SpanContext, TraceFlags

from ratefleet.schemas import Job, UpstreamConfig
from ratefleet.schemas.errors import InvalidRequest
from ratefleet.workers.executor import UpstreamExecutor, build_client

pytestmark = pytest.mark.anyio
OK = b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 11\r\n\r\n{\"ok\":true}"


class RawServer:
    """Records each request's bytes (head and body) and answers every connection with `answer`,
    then closes it (so no request rides on another's connection)."""

    def __init__(self, answer: bytes = OK) -> None:
        self.answer, self.seen = answer, []

    async def __aenter__(self) -> RawServer:
        async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            data = b""
            while b"\r\n\r\n" not in data:
                more = await reader.read(65536)
                if not more:
                    break
                data += more
            head, _, rest = data.partition(b"\r\n\r\n")
            length = [int(line.split(b":")[1]) for line in head.split(b"\r\n") if line.lower().startswith(b"content-length")]
            while length and len(rest) < length[0]:
                rest += await reader.read(65536)
            self.seen.append(head + b"\r\n\r\n" + rest)
            writer.write(self.answer)
            await writer.drain()
            writer.close()

        self.server = await asyncio.start_server(handle, "127.0.0.1", 0)
        self.port = self.server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.server.close()


async def both_paths(job: Job, upstream: UpstreamConfig, secret: str = "sk-secret", *, validated: bool = True,
                     cap: int = 64 << 20):
    """(direct, httpx): the CallResult or the InvalidRequest message of each path, and the
    chunks each relayed."""
    outcomes = []
    for direct in (True, False):
        client = build_client("aiohttp", 2, [upstream.auth_header])
        relayed: list[bytes] = []

        async def relay(chunk: bytes, relayed: list[bytes] = relayed) -> None:
            relayed.append(chunk)

        try:
            executor = UpstreamExecutor(client, cap, validated=validated, direct=direct)
            assert (executor._direct is not None) is direct
            try:
                result = await executor.call(job, upstream, secret, relay)
                outcome = dataclasses.replace(result, latency_ms=0.0)
            except InvalidRequest as exc:
                outcome = f"InvalidRequest: {exc}"
        finally:
            await client.aclose()
        outcomes.append((outcome, b"".join(relayed)))
    return outcomes


JOBS = [
    {"request": {"path": "/v1/chat/completions", "json": {"model": "m", "messages": [{"role": "user", "content": "café 😀"}]}}},
    {"request": {"method": "GET", "path": "/v1/models"}},
    {"request": {"method": "POST", "path": "/v1/empty"}},
    {"request": {"method": "PUT", "path": "/v1/put", "body": ""}},
    {"request": {"method": "PATCH", "path": "/v1/text", "body": "plain tëxt", "headers": {"Content-Type": "text/plain"}}},
    {"request": {"method": "DELETE", "path": "/v1/files/f1"}},
    {"request": {"method": "HEAD", "path": "/v1/head"}},
    {"request": {"method": "OPTIONS", "path": "/v1/options"}},
    {"request": {"path": "/v1/x", "json": {"a": 1},
                 "headers": {"Accept": "text/event-stream", "User-Agent": "mine/1.0", "accept-encoding": "identity",
                             "Content-Type": "application/json; charset=utf-8", "X-Title": "Café"}}},
    {"request": {"path": "/v1/x", "json": [1, 2.5, None], "headers": {"X-A": "1", "x-a": "2", "traceparent": "junk"}}},
    {"request": {"method": "GET", "path": "/v1/search?x=1",
                 "query": {"q": "a b&c=d", "ü": "ß", "n": 3, "f": 0.5, "t": True, "many": ["x", "y"]}}},
    {"request": {"path": "/v1/x", "json": "just a string", "query": {"empty": ""}}},
    {"request": {"path": "/v1/x", "json": {"big": 10 ** 30, "neg": -0.0, "tiny": 1e-7}}},
]


@pytest.mark.parametrize("validated", [True, False])
@pytest.mark.parametrize("spec", JOBS, ids=lambda spec: spec["request"].get("method", "POST") + spec["request"]["path"])
async def test_every_kind_of_job_puts_the_same_bytes_on_the_wire(spec, validated):
    job = Job.model_validate(spec)
    async with RawServer() as server:
        for base in (f"http://127.0.0.1:{server.port}", f"http://localhost:{server.port}/prefix"):
            outcomes = await both_paths(job, UpstreamConfig(base_url=base, timeout_s=5), validated=validated)
            assert outcomes[0] == outcomes[1]
    direct, httpx_path = server.seen[0::2], server.seen[1::2]
    assert len(direct) == len(httpx_path) == 2
    assert direct == httpx_path
    if spec["request"].get("query") and "?" in spec["request"]["path"]:  # the path's own query is kept
        assert direct[0].startswith(b"GET /v1/search?x=1&q=a+b%26c%3Dd&%C3%BC=%C3%9F&n=3&f=0.5&t=true&many=x&many=y ")


@pytest.mark.parametrize("header, scheme", [("Authorization", "Bearer"), ("x-api-key", ""), ("X-Goog-Api-Key", "")])
async def test_the_key_and_the_trace_go_on_the_wire_as_httpx_writes_them(header, scheme):
    job = Job.model_validate(JOBS[0])
    parent = SpanContext(trace_id=0x0AF7651916CD43DD8448EB211C80319C, span_id=0xB7AD6B7169203331, is_remote=True,
                         trace_flags=TraceFlags(1))
    token = context.attach(trace.set_span_in_context(NonRecordingSpan(parent)))
    try:
        async with RawServer() as server:
            upstream = UpstreamConfig(base_url=f"http://127.0.0.1:{server.port}", auth_header=header, auth_scheme=scheme)
            outcomes = await both_paths(job, upstream, "sk-é-latin")
    finally:
        context.detach(token)
    assert outcomes[0] == outcomes[1]
    assert server.seen[0] == server.seen[1]
    assert b"traceparent: 00-0af7651916cd43dd8448eb211c80319c-" in server.seen[0]
    assert f"{header.lower()}: {scheme + ' ' if scheme else ''}sk-é-latin".encode() in server.seen[0]


@pytest.mark.parametrize("validated", [True, False])
async def test_a_job_that_cannot_go_on_the_wire_is_refused_alike(validated):
    bad = []
    for headers in ({"X-€": "1"}, {"X-Title": "€uro"}, {"Authorization": "Bearer sk-other"}, {"Bad Name": "1"}):
        job = Job.model_validate(JOBS[0])
        job.request.headers.update(headers)  # (past the model's own checks, which refuse these first)
        bad.append(job)
    nan = Job.model_validate(JOBS[0])
    nan.request.json_body = {"x": float("nan")}
    async with RawServer() as server:
        for job in bad + ([] if validated else [nan]):
            outcomes = await both_paths(job, UpstreamConfig(base_url=f"http://127.0.0.1:{server.port}"),
                                        validated=validated)
            assert outcomes[0] == outcomes[1]
            assert isinstance(outcomes[0][0], str) and outcomes[0][0].startswith("InvalidRequest")
    assert server.seen == []


def _chunked(*parts: bytes) -> bytes:
    return b"".join(b"%x\r\n%s\r\n" % (len(part), part) for part in parts) + b"0\r\n\r\n"


GZIPPED = gzip.compress(b'{"answer":"zipped"}')
DEFLATED = zlib.compress(b'{"answer":"deflated"}')
SSE = b'data: {"choices":[{"delta":{"content":"a"}}]}\n\ndata: {"usage":{"total_tokens":7}}\n\ndata: [DONE]\n\n'
ANSWERS = {
    "gzip": b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Encoding: gzip\r\nContent-Length: %d\r\n\r\n"
            % len(GZIPPED) + GZIPPED,
    "deflate-chunked": b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Encoding: deflate\r\n"
                       b"Transfer-Encoding: chunked\r\n\r\n" + _chunked(DEFLATED[:5], DEFLATED[5:]),
    "gzip-then-unknown": b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Encoding: gzip, x-custom\r\n"
                         b"Content-Length: %d\r\n\r\n" % len(GZIPPED) + GZIPPED,
    "identity": b"HTTP/1.1 200 OK\r\nContent-Encoding: identity\r\nContent-Length: 2\r\n\r\n{}",
    "bad-gzip": b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Encoding: gzip\r\nContent-Length: 9\r\n\r\n"
                b"not gzip!",
    "repeated-and-utf8-headers": "HTTP/1.1 429 Too Many Requests\r\nRetry-After: 2\r\nX-RateLimit-Remaining-Requests: 0\r\n"
                                 "X-Request-Id: r1\r\nX-Request-Id: naïve ✓\r\nContent-Type: application/json\r\n"
                                 "Content-Length: 41\r\n\r\n{\"error\":{\"code\":\"rate_limit_exceeded\"}}\r\n".encode(),
    "latin1-header": b"HTTP/1.1 401 Unauthorized\r\nX-Request-Id: caf\xe9\r\nContent-Type: text/plain; charset=latin-1\r\n"
                     b"Content-Length: 24\r\n\r\nbad key sk-secret here \xe9",
    "sse": b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n\r\n"
           + _chunked(SSE[:30], SSE[30:]),
    "sse-gzip": b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nContent-Encoding: gzip\r\nContent-Length: %d\r\n\r\n"
                % len(gzip.compress(SSE)) + gzip.compress(SSE),
    # (declared past the cap, then cut short: reading would end in a ReadError, so the cap is seen first)
    "declared-too-large": b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 5000\r\n\r\n" + b" " * 50,
    "chunked-too-large": b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n"
                         + _chunked(b"[" + b" " * 600, b" " * 600 + b"]"),
    "gzip-grows-too-large": b"HTTP/1.1 200 OK\r\nContent-Encoding: gzip\r\nContent-Length: %d\r\n\r\n"
                            % len(gzip.compress(b" " * 5000)) + gzip.compress(b" " * 5000),
    "cut-short": b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 100\r\n\r\n{\"partial\":",
    "no-answer": b"",
    "not-http": b"SSH-2.0-OpenSSH_9.6\r\n\r\n",
    "204": b"HTTP/1.1 204 No Content\r\n\r\n",
}


@pytest.mark.parametrize("name", list(ANSWERS))
async def test_every_kind_of_answer_comes_back_as_the_same_call_result(name):
    job = Job.model_validate({**JOBS[0], "cost": 10})
    async with RawServer(ANSWERS[name]) as server:
        upstream = UpstreamConfig(base_url=f"http://127.0.0.1:{server.port}", timeout_s=5,
                                  usage_path="usage.total_tokens")
        (direct, relayed), (reference, reference_relayed) = await both_paths(job, upstream, cap=1024)
    assert direct == reference
    assert relayed == reference_relayed
    if name.startswith("sse"):
        assert relayed == SSE and direct.actual_cost == 7


async def test_a_recording_span_takes_the_httpx_path(monkeypatch):
    """The HTTP client span comes from httpx's instrumentation: while the job's span records,
    the call goes through httpx, not the aiohttp session."""
    taken: list[str] = []
    from ratefleet.workers import direct as direct_module

    real_send = direct_module.DirectRequest.send

    async def send(self, transport):
        taken.append("direct")
        return await real_send(self, transport)

    monkeypatch.setattr(direct_module.DirectRequest, "send", send)
    job = Job.model_validate(JOBS[0])
    async with RawServer(OK.replace(b"\r\n\r\n", b"\r\nConnection: close\r\n\r\n")) as server:
        client = build_client("aiohttp", 2)
        try:
            executor = UpstreamExecutor(client, validated=True)
            upstream = UpstreamConfig(base_url=f"http://127.0.0.1:{server.port}")
            assert (await executor.call(job, upstream, "sk")).kind == "ok"
            with TracerProvider().get_tracer("test").start_as_current_span("ratefleet.run") as span:
                assert span.is_recording()
                assert (await executor.call(job, upstream, "sk")).kind == "ok"
        finally:
            await client.aclose()
    assert taken == ["direct"]
    assert len(server.seen) == 2


async def test_a_reason_phrase_that_is_not_utf8_is_an_answer_directly_and_an_upstream_error_through_httpx():
    """httpx-aiohttp encodes aiohttp's reason phrase outside its error mapping: through httpx the
    UnicodeEncodeError escaped `call()`, and the worker took it for its own fault (nak, not an
    attempt) after a paid call. The direct path reads the answer; the httpx path (while a span
    records) ends the call as an upstream error that says why."""
    job = Job.model_validate(JOBS[0])
    async with RawServer(OK.replace(b"200 OK", b"200 Caf\xe9")) as server:
        (direct, _), (through_httpx, _) = await both_paths(job, UpstreamConfig(base_url=f"http://127.0.0.1:{server.port}"))
    assert direct.kind == "ok" and direct.response.json_body == {"ok": True}
    assert through_httpx.kind == "upstream_error" and "reason phrase is not UTF-8" in through_httpx.error


async def _immediate_server(answer: bytes):
    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(answer)
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    return server, server.sockets[0].getsockname()[1]


@pytest.mark.parametrize("scheme, answer, expected", [
    ("https", OK, "ClientConnectorSSLError calling the upstream: the TLS handshake failed"),
    ("http", b"", "ServerDisconnectedError calling the upstream: it closed the connection"),
])
async def test_what_the_error_mapping_calls_a_timeout_is_named_for_what_it_was(scheme, answer, expected):
    """httpx-aiohttp maps every aiohttp connection error to ConnectTimeout; the Result said "no
    answer from the upstream within 60.0s" for a TLS handshake that failed at once, or an upstream
    that closed the connection without answering."""
    server, port = await _immediate_server(answer)
    try:
        outcomes = await both_paths(Job.model_validate(JOBS[0]), UpstreamConfig(base_url=f"{scheme}://127.0.0.1:{port}"))
    finally:
        server.close()
    assert outcomes[0] == outcomes[1]
    assert outcomes[0][0].kind == "upstream_error" and outcomes[0][0].error.startswith(expected)


@pytest.mark.parametrize("direct", [True, False])
async def test_a_secret_beyond_latin1_is_not_blamed_on_the_job(direct):
    """A key's secret httpx cannot write (latin-1) raises UnicodeEncodeError on both paths, never
    InvalidRequest, which would end the job as invalid (workers/secrets.py refuses such a secret first)."""
    async with RawServer() as server:
        client = build_client("aiohttp", 2)
        try:
            with pytest.raises(UnicodeEncodeError):
                await UpstreamExecutor(client, direct=direct).call(
                    Job.model_validate(JOBS[0]), UpstreamConfig(base_url=f"http://127.0.0.1:{server.port}"), "sk-€")
        finally:
            await client.aclose()
    assert server.seen == []


@pytest.mark.parametrize("direct", [True, False])
async def test_a_closed_client_sends_nothing(direct):
    async with RawServer() as server:
        client = build_client("aiohttp", 2)
        executor = UpstreamExecutor(client, direct=direct)
        await client.aclose()
        with pytest.raises(RuntimeError, match="client has been closed"):
            await executor.call(Job.model_validate(JOBS[0]), UpstreamConfig(base_url=f"http://127.0.0.1:{server.port}"),
                                "sk")
    assert server.seen == []


ANTHROPIC_CUT = (b'event: message_start\ndata: {"type":"message_start","message":{"usage":{"input_tokens":5}}}\n\n'
                 b'event: content_block_delta\ndata: {"type":"content_block_delta","delta":{"text":"Hello, the"}}\n\n'
                 b'event: error\ndata: {"type":"error","error":{"type":"overloaded_error","message":"Overloaded"}}\n\n')
OPENAI_CUT = (b'data: {"choices":[{"delta":{"content":"the word \\"error\\": {}"}}]}\n\n'
              b'data: {"error":{"message":"The server had an error","type":"server_error","code":null}}\n\n'
              b'data: [DONE]\n\n')


CHAT_CHUNKS = (b'data: {"id":"c1","object":"chat.completion.chunk","choices":[{"index":0,"delta":{"content":"Hello"},'
               b'"finish_reason":null}]}\n\n'
               b'data: {"id":"c1","object":"chat.completion.chunk","choices":[{"index":0,"delta":{"content":" wor"},'
               b'"finish_reason":null}]}\n\n')


def _chunk(*choices: bytes) -> bytes:
    return b'data: {"id":"c2","object":"chat.completion.chunk","choices":[' + b",".join(choices) + b"]}\n\n"


TWO_CHOICES = (_chunk(b'{"index":0,"delta":{"content":"Hi"},"finish_reason":null}',
                      b'{"index":1,"delta":{"content":"Hello"},"finish_reason":null}')
               + _chunk(b'{"index":0,"delta":{},"finish_reason":"stop"}')
               + _chunk(b'{"index":1,"delta":{"content":" there"},"finish_reason":null}'))
RESPONSES = (b'event: response.created\ndata: {"type":"response.created","response":{"status":"in_progress"}}\n\n'
             b'event: response.output_text.delta\ndata: {"type":"response.output_text.delta","delta":"Hi"}\n\n')


def _sse(body: bytes) -> bytes:
    return b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n\r\n" + _chunked(body)


@pytest.mark.parametrize("body, kind, code", [
    (ANTHROPIC_CUT, "upstream_error", "overloaded_error"),
    (OPENAI_CUT, "upstream_error", "server_error"),
    (ANTHROPIC_CUT.replace(b"overloaded_error", b"rate_limit_error"), "rate_limited", "rate_limit_error"),
    (OPENAI_CUT.replace(b'"server_error","code":null', b'"insufficient_quota","code":"insufficient_quota"'),
     "key_error", "insufficient_quota"),
    (SSE.replace(b'"a"', b'"{\\"error\\": {\\"x\\": 1}}"'), "ok", None),  # the model's text naming an error
    # a re-run of the trial: the Responses API's error event and response.failed, an Anthropic
    # stream cut off (no message_stop), an error event followed by pings
    (RESPONSES + b'event: error\ndata: {"type":"error","code":"server_error","message":"boom"}\n\n',
     "upstream_error", "server_error"),
    (RESPONSES + b'event: response.failed\ndata: {"type":"response.failed","response":{"status":"failed",'
     b'"error":{"code":"rate_limit_exceeded","message":"slow down"}}}\n\n', "rate_limited", "rate_limit_exceeded"),
    (RESPONSES + b'event: response.completed\ndata: {"type":"response.completed","response":{"status":"completed"}}\n\n',
     "ok", None),
    (ANTHROPIC_CUT.rsplit(b"event: error", 1)[0], "upstream_error", "stream_cut_off"),
    (ANTHROPIC_CUT + b'event: ping\ndata: {"type": "ping"}\n\n' * 3, "upstream_error", "overloaded_error"),
    # OpenAI Chat Completions (and legacy Completions) cut off: no `data: [DONE]`, no finish_reason
    (CHAT_CHUNKS, "upstream_error", "stream_cut_off"),
    (CHAT_CHUNKS.replace(b"chat.completion.chunk", b"text_completion"), "upstream_error", "stream_cut_off"),
    (CHAT_CHUNKS + b"data: [DONE]\n\n", "ok", None),
    (CHAT_CHUNKS.replace(b"\n\n", b"\r\n\r\n") + b"data:[DONE]\r\n\r\n", "ok", None),
    # a review: other spellings of the same end (each was cut off, retried and paid again)
    (CHAT_CHUNKS + b"data: [DONE] \n\n", "ok", None),
    (CHAT_CHUNKS + b"data:  [DONE]\n\n", "ok", None),
    (CHAT_CHUNKS.replace(b"\n\n", b"\r\r") + b"data: [DONE]\r\r", "ok", None),
    (CHAT_CHUNKS + b"data: [DONE]", "ok", None),
    (CHAT_CHUNKS.replace(b'"finish_reason":null}]}\n\n', b'"finish_reason":\t"stop"}]}\n\n', 1), "ok", None),
    (CHAT_CHUNKS + CHAT_CHUNKS.split(b"\n\n")[0].replace(b'"finish_reason":null', b'"finish_reason": "stop"')
     + b"\n\n", "ok", None),  # a server that leaves out [DONE]: its last choice still ends
    (CHAT_CHUNKS.replace(b'"Hello"', b'"data: [DONE] and \\"finish_reason\\": \\"stop\\""'),
     "upstream_error", "stream_cut_off"),  # the model's text saying both
    # n = 2 choices and no [DONE]: cut off after one choice's finish_reason, ended once both have one
    (TWO_CHOICES, "upstream_error", "stream_cut_off"),
    (TWO_CHOICES + _chunk(b'{"index":1,"delta":{},"finish_reason":"length"}'), "ok", None),
    (TWO_CHOICES + b"data: [DONE]\n\n", "ok", None),
])
async def test_a_stream_begun_with_200_and_ended_by_an_error_event_is_no_success(body, kind, code):
    """A provider trial: Anthropic's `event: error` (overloaded_error) after its 200 was stored
    `succeeded`, the answer cut off. Now classified by the error's code, on both paths."""
    async with RawServer(_sse(body)) as server:
        upstream = UpstreamConfig(base_url=f"http://127.0.0.1:{server.port}", timeout_s=5)
        (direct, relayed), (reference, _) = await both_paths(Job.model_validate(JOBS[0]), upstream)
    assert direct == reference and relayed == body
    assert (direct.kind, direct.provider_code) == (kind, code)
    if kind != "ok":
        assert "ended with an error event" in direct.error or "stopped before its end event" in direct.error


async def test_a_body_not_in_its_content_encoding_is_final_not_a_connection_error_paid_five_times():
    """A provider trial: plain JSON labelled `Content-Encoding: gzip` (a proxy) was a "connection"
    error ("DecodingError calling the upstream"), retried to max_attempts: five paid 200s."""
    async with RawServer(ANSWERS["bad-gzip"]) as server:
        upstream = UpstreamConfig(base_url=f"http://127.0.0.1:{server.port}", timeout_s=5)
        (direct, _), (reference, _) = await both_paths(Job.model_validate(JOBS[0]), upstream)
    assert direct == reference
    assert (direct.kind, direct.code, direct.response.status) == ("bad_request", "upstream_error", 200)
    assert "answered HTTP 200" in direct.error and "Content-Encoding (gzip)" in direct.error


@pytest.mark.parametrize("size", [10_000, 40_000])
async def test_a_header_line_longer_than_aiohttps_default_is_read_on_both_paths(size):
    """A provider trial: a 200 with a 10,000-byte header (a proxy's cookie or debug trace) passed
    aiohttp's 8,190-byte limit: an unreadable answer, retried and paid max_attempts times."""
    head = b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nX-Debug-Trace: " + b"t" * size
    body = b'{"choices":[{"message":{"content":"hi"}}]}'
    async with RawServer(head + b"\r\nContent-Length: %d\r\n\r\n" % len(body) + body) as server:
        upstream = UpstreamConfig(base_url=f"http://127.0.0.1:{server.port}", timeout_s=5)
        (direct, _), (through_httpx, _) = await both_paths(Job.model_validate(JOBS[0]), upstream)
    assert direct.kind == through_httpx.kind == "ok", (direct.error, through_httpx.error)
    assert direct.response.json_body == through_httpx.response.json_body == {"choices": [{"message": {"content": "hi"}}]}


def _json200(body: bytes) -> bytes:
    return b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n" % len(body) + body


@pytest.mark.parametrize("body, kind, code", [
    (b'{"error":{"type":"rate_limit_error","code":"rate_limit_exceeded","message":"Rate limit reached. '
     b'Please try again in 2s."}}', "rate_limited", "rate_limit_exceeded"),
    (b'{"error":{"message":"You exceeded your current quota","type":"insufficient_quota","code":"insufficient_quota"}}',
     "upstream_error", "insufficient_quota"),  # never the key out from a 200 (a job could word it)
    (b'{"type":"error","error":{"type":"overloaded_error","message":"Overloaded"}}', "upstream_error",
     "overloaded_error"),
    (b'{"error":{"message":"upstream connect error","type":"new_api_error"},"success":false}', "upstream_error",
     "new_api_error"),
    # a re-run: other shapes of the same kind
    (b'{"error":"upstream overloaded, retry later"}', "upstream_error", None),
    (b'{"error_code":18,"error_msg":"Open api qps request limit reached","log_id":"123"}', "upstream_error", "18"),
    (b'{"error":{"type":"rate_limit_error","code":"rate_limit_exceeded","message":"slow down, try again in 2s"},'
     b'"model":"m","created":1}', "rate_limited", "rate_limit_exceeded"),
    # a request's own error wrapped in a 200 is a bad request (no retry, no breaker), as its 400 would be
    (b'{"error":{"message":"This model\'s maximum context length is 8192 tokens","type":"invalid_request_error",'
     b'"code":"context_length_exceeded"}}', "bad_request", "context_length_exceeded"),
    (b'{"type":"error","error":{"type":"invalid_request_error","message":"max_tokens: too large"}}', "bad_request",
     "invalid_request_error"),
    # a second review: the key's errors (an invalid_request_error type) stay upstream errors, tried on other keys
    (b'{"error":{"message":"Incorrect API key provided","type":"invalid_request_error","code":"invalid_api_key"}}',
     "upstream_error", "invalid_api_key"),
    (b'{"error":{"message":"The model `gpt-4o` does not exist","type":"invalid_request_error",'
     b'"code":"model_not_found"}}', "upstream_error", "model_not_found"),
    (b'{"type":"error","error":{"type":"invalid_request_error","message":"Your credit balance is too low to access '
     b'the Anthropic API."}}', "upstream_error", "credit_balance_too_low"),
    # answers that are not only an error stand
    (b'{"choices":[{"message":{"content":"hi"}}],"error":{"message":"a partial warning"}}', "ok", None),
    (b'{"error":null,"data":[1]}', "ok", None),
    (b'{"error":{}}', "ok", None),
    (b'{"error":""}', "ok", None),
    (b'{"error_code":0,"error_msg":"","result":"hi"}', "ok", None),
    (b'{"type":"message","error":{"message":"x"},"content":[]}', "ok", None),
])
async def test_a_200_whose_body_is_only_an_error_is_that_error(body, kind, code):
    """A provider trial: a proxy passing a rate limit on as 200 {"error": {...}}: 40 of 40 jobs
    stored `succeeded` with no answer, and the key never slowed."""
    async with RawServer(_json200(body)) as server:
        upstream = UpstreamConfig(base_url=f"http://127.0.0.1:{server.port}", timeout_s=5)
        (direct, _), (reference, _) = await both_paths(Job.model_validate(JOBS[0]), upstream)
    assert direct == reference
    assert (direct.kind, direct.provider_code) == (kind, code)
    if kind == "rate_limited":
        assert direct.retry_after_s == 2.0  # named in its message
    if kind != "ok":
        assert "answered HTTP 200 with an error body" in direct.error

