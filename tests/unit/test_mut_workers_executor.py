"""What one upstream call reports (workers/executor.py), checked exactly: the latency of
failed and cut-off calls in milliseconds (on a fake clock), the answer's headers and body kept
for a Result with the key's secret masked, the rate-limit headers of an answer past
`max_response_bytes`, and the message naming its content type. Over httpx.MockTransport;
deterministic, no network.
"""

from __future__ import annotations

import json
import time
from types import SimpleNamespace

import anyio
import httpx
import pytest

from ratefleet.schemas import ErrorCode, Job, UpstreamConfig
from ratefleet.workers import executor as executor_module
from ratefleet.workers.executor import UpstreamExecutor

pytestmark = pytest.mark.anyio
SECRET = "sk-mut-exec-0123456789"
UPSTREAM = UpstreamConfig(base_url="https://api.example.test")
NOW = 1_700_000_000.0  # the fake wall clock (Unix seconds)


def job(**request) -> Job:
    return Job.model_validate({"request": {"path": "/v1/x", "json": {"m": 1}, **request}})


def executor(handler, cap: int = 64 << 20) -> UpstreamExecutor:
    return UpstreamExecutor(httpx.AsyncClient(transport=httpx.MockTransport(handler)), cap)


@pytest.fixture
def clock(monkeypatch):
    """The executor's clock: perf_counter steps 0.25 s per reading from 100.0; time() is NOW."""
    readings = iter(100.0 + 0.25 * n for n in range(1000))
    monkeypatch.setattr(executor_module, "time", SimpleNamespace(perf_counter=lambda: next(readings),
                                                                 time=lambda: NOW))


@pytest.mark.parametrize("error", [httpx.ConnectError, httpx.ReadTimeout])
async def test_a_failed_call_reports_its_latency_in_milliseconds(clock, error):
    def handler(request):
        raise error("no", request=request)

    result = await executor(handler).call(job(), UPSTREAM, SECRET)
    assert result.kind == "upstream_error" and result.response is None
    assert result.latency_ms == 250.0  # started at 100.0 s, failed at 100.25 s


async def test_an_answer_past_the_cap_reports_latency_headers_and_content_type(clock):
    headers = {"content-type": "application/json", "x-ratelimit-reset": str(int(NOW) + 30),
               "x-ratelimit-remaining": "0", "x-request-id": f"req-{SECRET}"}
    result = await executor(lambda r: httpx.Response(200, content=b"x" * 100, headers=headers), cap=10).call(
        job(), UPSTREAM, SECRET)
    assert result.code == ErrorCode.RESPONSE_TOO_LARGE and result.latency_ms == 250.0
    assert result.ratelimit.remaining_requests == 0.0 and result.ratelimit.reset_requests_s == 30.0
    assert result.response.headers["x-request-id"] == "req-***"  # the echoed key is masked here too
    assert "(HTTP 200, application/json)" in result.error and "10 bytes" in result.error


async def test_an_answer_past_the_cap_without_a_content_type_says_so(clock):
    result = await executor(lambda r: httpx.Response(200, content=b"x" * 100), cap=10).call(job(), UPSTREAM, SECRET)
    assert result.code == ErrorCode.RESPONSE_TOO_LARGE
    assert "(HTTP 200, no content-type)" in result.error


async def test_a_successful_call_reports_latency_and_absolute_resets(clock):
    headers = {"x-ratelimit-reset": str(int(NOW) + 30), "x-ratelimit-remaining": "4", "retry-after": "7"}
    result = await executor(lambda r: httpx.Response(200, json={"ok": 1}, headers=headers)).call(
        job(), UPSTREAM, SECRET)
    assert result.kind == "ok" and result.latency_ms == 250.0
    assert result.ratelimit.reset_requests_s == 30.0 and result.retry_after_s == 7.0
    assert result.response.json_body == {"ok": 1}


def test_the_real_clock_is_the_default():
    assert executor_module.time is time


# -- usage cost, streamed answers, kept headers, 429s that can never fit -----------------------


@pytest.mark.parametrize("usage, cost", [
    ({"total_tokens": 42}, 42.0), ({"total_tokens": 2.5}, 2.5),
    ({"total_tokens": True}, None),    # a flag is not a count
    ({"total_tokens": "42"}, None),    # nor is text
    ({"total_tokens": {"n": 1}}, None), ({}, None), (7, None),
])
async def test_the_actual_cost_is_a_number_read_at_usage_path(usage, cost):
    upstream = UpstreamConfig(base_url="https://api.example.test", usage_path="usage.total_tokens")
    result = await executor(lambda r: httpx.Response(200, json={"usage": usage})).call(job(), upstream, SECRET)
    assert result.actual_cost == cost


async def relayed(headers: dict[str, str], status: int = 200) -> tuple[list[bytes], object]:
    chunks: list[bytes] = []

    async def sink(chunk: bytes) -> None:
        chunks.append(chunk)

    result = await executor(lambda r: httpx.Response(status, content=b"data: 1\n\n", headers=headers)).call(
        job(json={"stream": True}), UPSTREAM, SECRET, sink)
    return chunks, result


@pytest.mark.parametrize("headers, passed_on", [
    ({"content-type": "text/event-stream"}, True),
    ({"content-type": "Text/Event-Stream; charset=utf-8; x=y"}, True),
    ({}, False),                                                      # no content type: not a stream
    ({"content-type": "text/plain"}, False),
    ({"content-type": "text/event-stream", "content-encoding": "x-unknown"}, False),  # still encoded
])
async def test_only_a_decoded_event_stream_is_passed_on_chunk_by_chunk(headers, passed_on):
    chunks, result = await relayed(headers)
    assert chunks == ([b"data: 1\n\n"] if passed_on else [])
    assert result.kind == "ok"


async def test_an_event_stream_of_a_failed_call_is_not_passed_on():
    chunks, result = await relayed({"content-type": "text/event-stream"}, status=500)
    assert chunks == [] and result.kind == "upstream_error"


async def test_a_still_encoded_answer_keeps_its_encoding_header_and_no_other():
    headers = {"content-encoding": "x-unknown", "content-type": "application/json", "x-other": "1",
               "x-ratelimit-remaining-requests": "3"}
    result = await executor(lambda r: httpx.Response(200, content=b"\x01\x02", headers=headers)).call(
        job(), UPSTREAM, SECRET)
    assert result.response.headers == {"content-encoding": "x-unknown", "content-type": "application/json",
                                       "x-ratelimit-remaining-requests": "3"}
    assert result.response.body_b64 == "AQI="


async def test_a_429_for_more_tokens_than_the_whole_limit_ends_the_job():
    headers = {"x-ratelimit-limit-tokens": "1000", "x-ratelimit-remaining-tokens": "900",
               "x-ratelimit-remaining-requests": "5"}
    result = await executor(lambda r: httpx.Response(429, json={}, headers=headers)).call(
        Job.model_validate({"request": {"path": "/v1/x", "json": {}}, "cost": 5000}), UPSTREAM, SECRET)
    assert (result.kind, result.code) == ("bad_request", ErrorCode.REQUEST_TOO_LARGE)
    assert result.scope.scope == "request" and result.scope.never_fits
    assert "5000" in result.error and "1000" in result.error and "not retried" in result.error
    assert result.response.status == 429


@pytest.mark.parametrize("coding, encoded", [
    (None, False), ("", False), ("identity", False), ("gzip", False), ("GZIP", False),
    ("gzip, deflate", False), ("gzip,deflate", False),   # a list of codings httpx decodes (RFC 9110 8.4)
    ("x-unknown", True), ("gzip, x-unknown", True),
])
def test_which_content_encodings_are_left_encoded(coding, encoded):
    assert executor_module.still_encoded(coding) is encoded


# -- the connection of an answer not read to its end is closed --------------------------------


class Dribble(httpx.AsyncByteStream):
    """An answer body sent as `chunks`, `delay` seconds apart; its `aclose` takes `close_s`."""

    def __init__(self, chunks: list[bytes], delay: float = 0.0, close_s: float = 0.0):
        self.chunks, self.delay, self.close_s, self.closed = chunks, delay, close_s, False

    async def __aiter__(self):
        for chunk in self.chunks:
            await anyio.sleep(self.delay)
            yield chunk

    async def aclose(self) -> None:
        await anyio.sleep(self.close_s)
        self.closed = True


async def test_an_answer_past_the_cap_is_closed_not_left_open():
    stream = Dribble([b"x" * 10] * 5)
    result = await executor(lambda r: httpx.Response(200, stream=stream), cap=15).call(job(), UPSTREAM, SECRET)
    assert result.code == ErrorCode.RESPONSE_TOO_LARGE
    assert stream.closed, "the connection of a cut-off answer was left open (the pool has one slot per call)"


async def test_a_call_cut_by_its_deadline_still_closes_its_answer():
    stream = Dribble([b"x"] * 100, delay=0.05, close_s=0.01)  # the close itself awaits: shielded from the cancel
    upstream = UpstreamConfig(base_url="https://api.example.test", timeout_s=0.3)
    result = await executor(lambda r: httpx.Response(200, stream=stream)).call(job(), upstream, SECRET)
    assert result.kind == "upstream_error" and "timeout_s = 0.3s" in result.error
    assert stream.closed


async def test_a_close_that_hangs_does_not_hold_the_call():
    stream = Dribble([b"x"] * 100, delay=0.05, close_s=60.0)
    upstream = UpstreamConfig(base_url="https://api.example.test", timeout_s=0.3)
    with anyio.fail_after(20):  # the close is given 1 s, not forever
        result = await executor(lambda r: httpx.Response(200, stream=stream)).call(job(), upstream, SECRET)
    assert result.kind == "upstream_error" and not stream.closed


@pytest.mark.parametrize("error, says", [(httpx.ConnectError, "ConnectError calling the upstream"),
                                         (httpx.ReadTimeout, "no answer from the upstream within 60.0s")])
async def test_a_failed_call_says_what_failed(error, says):
    def handler(request):
        raise error("no", request=request)

    result = await executor(handler).call(job(), UPSTREAM, SECRET)
    assert result.error == says


# -- the request on the wire: the job's headers, the call's timeout, httpx's own headers ------


@pytest.mark.parametrize("query", [None, {"a": "1"}], ids=["own-path", "httpx-path"])
async def test_the_request_carries_the_jobs_headers_the_timeout_and_the_clients_headers(query):
    seen: list[httpx.Request] = []

    def handler(request):
        seen.append(request)
        return httpx.Response(200, json={})

    upstream = UpstreamConfig(base_url="https://api.example.test", timeout_s=7.5)
    request = {"headers": {"x-custom": "1"}, **({"query": query} if query else {})}
    await executor(handler).call(job(**request), upstream, SECRET)
    await executor(handler).call(job(**request), upstream, SECRET)  # the second from the parsed-URL cache
    for sent in seen:
        assert sent.headers["x-custom"] == "1" and sent.headers["authorization"] == f"Bearer {SECRET}"
        assert sent.extensions["timeout"] == {"connect": 7.5, "read": 7.5, "write": 7.5, "pool": 7.5}
        assert sent.headers["user-agent"].startswith("python-httpx/") and "gzip" in sent.headers["accept-encoding"]
        assert str(sent.url) == "https://api.example.test/v1/x" + ("?a=1" if query else "")


async def test_a_retry_after_date_is_read_against_the_wall_clock(clock):
    from email.utils import formatdate

    headers = {"retry-after": formatdate(NOW + 30, usegmt=True)}
    result = await executor(lambda r: httpx.Response(503, json={}, headers=headers)).call(job(), UPSTREAM, SECRET)
    assert result.kind == "upstream_error" and result.retry_after_s == 30.0


async def test_a_successful_answer_has_no_provider_code_even_if_its_body_looks_like_an_error():
    body = {"choices": [{"message": {"content": "hi"}}], "error": {"type": "insufficient_quota",
                                                                    "code": "insufficient_quota"}}
    result = await executor(lambda r: httpx.Response(200, json=body)).call(job(), UPSTREAM, SECRET)
    assert (result.kind, result.provider_code) == ("ok", None)


async def test_a_2xx_body_that_is_only_a_key_scoped_error_is_an_upstream_error_not_a_key_error():
    """usage.error_body: a proxy's 200 carrying only an error is that error, but never takes the
    key out (an upstream echoing its request would let a job word it)."""
    body = {"error": {"type": "insufficient_quota", "code": "insufficient_quota"}}
    result = await executor(lambda r: httpx.Response(200, json=body)).call(job(), UPSTREAM, SECRET)
    assert (result.kind, result.provider_code) == ("upstream_error", "insufficient_quota")


async def test_a_text_body_goes_as_utf8_bytes():
    seen: list[bytes] = []

    def handler(request):
        seen.append(request.content)
        return httpx.Response(200, json={})

    result = await executor(handler).call(
        Job.model_validate({"request": {"path": "/v1/x", "body": "a=1&é=2", "headers": {"content-type": "text/plain"}}}),
        UPSTREAM, SECRET)
    assert result.kind == "ok" and seen == ["a=1&é=2".encode()]


async def test_a_header_the_wire_cannot_carry_is_refused_with_the_checks_own_words():
    from ratefleet.schemas.errors import InvalidRequest

    with pytest.raises(InvalidRequest) as refused:
        await executor(lambda r: httpx.Response(200)).call(
            job(headers={"X-Fleet-Auth": "x"}), UpstreamConfig(base_url="https://a.test", auth_header="x-fleet-auth"), SECRET)
    message = str(refused.value)
    assert message.startswith("the job's HTTP request cannot be built: ") and "x-fleet-auth" in message.lower()
    assert "PydanticCustomError" not in message


@pytest.mark.parametrize("scheme, sent", [("", SECRET), ("Bearer", f"Bearer {SECRET}"), ("Token", f"Token {SECRET}")])
async def test_the_key_goes_in_the_auth_header_with_or_without_a_scheme(scheme, sent):
    seen: list[httpx.Request] = []
    upstream = UpstreamConfig(base_url="https://api.example.test", auth_header="x-api-key", auth_scheme=scheme)
    await executor(lambda r: seen.append(r) or httpx.Response(200, json={})).call(job(), upstream, SECRET)
    assert seen[0].headers["x-api-key"] == sent and "authorization" not in seen[0].headers


async def test_the_whole_call_is_bounded_by_timeout_s():
    stream = Dribble([b"x"] * 100, delay=0.05)  # 5 s of body, each read well inside httpx's own timeouts
    upstream = UpstreamConfig(base_url="https://api.example.test", timeout_s=0.3)
    with anyio.fail_after(20):
        result = await executor(lambda r: httpx.Response(200, stream=stream)).call(job(), upstream, SECRET)
    assert result.kind == "upstream_error" and result.response is None
    assert result.error.startswith("the call did not finish within timeout_s = 0.3s")
    assert 250 <= result.latency_ms < 20_000


@pytest.mark.parametrize("status", [200, 400, 413])
async def test_only_a_429_is_given_a_scope(status):
    body = {"error": {"message": "Request too large: Limit 30000, Requested 50000"}}
    result = await executor(lambda r: httpx.Response(status, json=body)).call(job(), UPSTREAM, SECRET)
    assert result.scope is None and result.code is None
    assert result.kind == ("upstream_error" if status == 200 else "bad_request")  # a 200 only an error: usage.error_body


async def test_the_jobs_trace_context_goes_on_to_the_upstream():
    from opentelemetry import context as otel_context

    from ratefleet.runtime.tracing import parent_context

    traceparent = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
    seen: list[httpx.Request] = []
    token = otel_context.attach(parent_context(traceparent, None))
    try:
        await executor(lambda r: seen.append(r) or httpx.Response(200, json={})).call(job(), UPSTREAM, SECRET)
    finally:
        otel_context.detach(token)
    assert seen[0].headers["traceparent"] == traceparent


@pytest.mark.parametrize("transport", ["aiohttp", "httpcore"])
async def test_the_workers_client_ignores_proxies_from_the_environment(monkeypatch, transport):
    from test_executor import _Http

    from ratefleet.workers.executor import build_client

    async with _Http(lambda path: (200, {})) as proxy, _Http(lambda path: (200, {})) as upstream:
        for name in ("HTTP_PROXY", "http_proxy", "HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy"):
            monkeypatch.setenv(name, proxy.url)
        for name in ("NO_PROXY", "no_proxy"):
            monkeypatch.delenv(name, raising=False)
        client = build_client(transport, 2)
        try:
            result = await UpstreamExecutor(client).call(job(), UpstreamConfig(base_url=upstream.url), SECRET)
        finally:
            await client.aclose()
    assert result.response.status == 200
    assert proxy.seen == [], "the key went through a proxy named by the environment"
    assert upstream.seen == [("/v1/x", f"Bearer {SECRET}")]


def test_the_pool_holds_one_connection_per_slot():
    from ratefleet.workers.executor import build_client

    inner = build_client("httpcore", 3)._transport.inner
    assert (inner._pool._max_connections, inner._pool._max_keepalive_connections) == (3, 3)
    limits = build_client("aiohttp", 5)._transport.inner.limits
    assert (limits.max_connections, limits.max_keepalive_connections) == (5, 5)


def test_the_upstreams_auth_headers_are_redacted_on_http_spans():
    import re

    from ratefleet.workers.executor import build_client

    traced = build_client("httpcore", 1, ["X-Fleet-Auth"])._transport.traced
    patterns = [re.compile(p, re.IGNORECASE) for p in traced._sensitive_headers]
    assert any(p.fullmatch("x-fleet-auth") for p in patterns) and any(p.fullmatch("authorization") for p in patterns)


BODIES = [
    {"model": "m", "messages": [{"role": "user", "content": "café 😀 \"quoted\" \\ back\nline\u2028"}], "n": 2},
    {"temperature": 0.7, "top_p": 1.0, "big": 10 ** 30, "neg": -0.0, "none": None, "t": True, "nested": [[{}], []]},
    ["a", 1, 2.5, {"k": "v"}],
    "just a string",
]


@pytest.mark.parametrize("body", BODIES)
async def test_a_validated_executor_sends_the_json_body_httpx_would(body):
    """pydantic-core writes a validated job's body: the same bytes and Content-Type as httpx's json=."""
    sent = {}

    def handler(request):
        sent.setdefault("requests", []).append(request)
        return httpx.Response(200, json={})

    client = httpx.AsyncClient(transport=httpx.MockTransport(handler))
    for validated in (False, True):
        await UpstreamExecutor(client, validated=validated).call(job(json=body), UPSTREAM, SECRET)
    plain, fast = sent["requests"]
    assert fast.content == plain.content and json.loads(fast.content) == body
    assert fast.headers["content-type"] == plain.headers["content-type"] == "application/json"
    assert fast.headers["content-length"] == str(len(fast.content))


async def test_a_validated_executor_keeps_the_jobs_own_content_type():
    sent = []
    client = httpx.AsyncClient(transport=httpx.MockTransport(lambda r: sent.append(r) or httpx.Response(200)))
    await UpstreamExecutor(client, validated=True).call(
        job(json={"a": 1}, headers={"content-TYPE": "application/vnd.api+json"}), UPSTREAM, SECRET)
    assert sent[0].headers.get_list("content-type") == ["application/vnd.api+json"]
    assert sent[0].content == b'{"a":1}'


async def test_an_executor_not_told_its_jobs_are_validated_still_refuses_a_body_that_is_not_json():
    """(a job built without validation: NaN would go out as `NaN`, a set as an array, with pydantic-core)"""
    from ratefleet.schemas.errors import InvalidRequest

    calls = []
    client = httpx.AsyncClient(transport=httpx.MockTransport(lambda r: calls.append(r) or httpx.Response(200)))
    for body in ({"t": float("nan")}, {"s": {1, 2}}):
        unvalidated = Job.model_construct(request=job().request.model_copy(update={"json_body": body}))
        with pytest.raises(InvalidRequest):
            await UpstreamExecutor(client).call(unvalidated, UPSTREAM, SECRET)
    assert calls == []


async def test_a_validated_executors_body_is_written_by_pydantic_core():
    """The one byte-level difference, documented: a float's exponent without a leading zero."""
    sent = []
    client = httpx.AsyncClient(transport=httpx.MockTransport(lambda r: sent.append(r) or httpx.Response(200)))
    for validated in (False, True):
        await UpstreamExecutor(client, validated=validated).call(job(json={"x": 1e-7}), UPSTREAM, SECRET)
    assert [r.content for r in sent] == [b'{"x":1e-07}', b'{"x":1e-7}']


async def test_a_validated_executor_sends_the_same_body_with_query_parameters():
    """(query parameters take httpx's own build_request: the body and its Content-Type go there too)"""
    sent = []
    client = httpx.AsyncClient(transport=httpx.MockTransport(lambda r: sent.append(r) or httpx.Response(200)))
    for validated in (False, True):
        await UpstreamExecutor(client, validated=validated).call(job(json={"a": [1, "é"]}, query={"v": "2"}),
                                                                 UPSTREAM, SECRET)
    plain, fast = sent
    assert fast.url == plain.url and fast.url.params["v"] == "2"
    assert fast.content == plain.content == '{"a":[1,"é"]}'.encode()
    assert fast.headers.get_list("content-type") == plain.headers.get_list("content-type") == ["application/json"]
