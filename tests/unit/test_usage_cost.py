"""The actual cost the worker reports (`usage_path`): JSON answers, streamed answers (OpenAI's
usage chunk, Anthropic's message_start / message_delta) and summed paths, over httpx.MockTransport."""

from __future__ import annotations

import json

import httpx
import pytest
from pydantic import ValidationError

from ratefleet.schemas import Job, UpstreamConfig
from ratefleet.workers.executor import UpstreamExecutor
from ratefleet.workers.usage import stream_cost

SECRET = "sk-test-SECRET-123456"
OPENAI = UpstreamConfig(base_url="https://api.example.test", usage_path="usage.total_tokens")
ANTHROPIC = UpstreamConfig(base_url="https://api.example.test", usage_path="usage.input_tokens+usage.output_tokens")


def sse(*events: tuple[str | None, object]) -> bytes:
    """A server-sent-events body: each (event name or None, data) as one event."""
    parts = []
    for name, data in events:
        head = f"event: {name}\n" if name else ""
        parts.append(f"{head}data: {data if isinstance(data, str) else json.dumps(data)}\n\n")
    return "".join(parts).encode()


OPENAI_STREAM = sse(
    (None, {"object": "chat.completion.chunk", "choices": [{"delta": {"content": "hi"}}], "usage": None}),
    (None, {"object": "chat.completion.chunk", "choices": [{"delta": {"content": "!"}}], "usage": None}),
    (None, {"object": "chat.completion.chunk", "choices": [],
            "usage": {"prompt_tokens": 900, "completion_tokens": 600, "total_tokens": 1500}}),
    (None, "[DONE]"),
)
ANTHROPIC_STREAM = sse(
    ("message_start", {"type": "message_start",
                       "message": {"id": "msg_1", "usage": {"input_tokens": 900, "output_tokens": 1}}}),
    ("ping", {"type": "ping"}),
    ("content_block_delta", {"type": "content_block_delta", "delta": {"type": "text_delta", "text": "hi"}}),
    ("message_delta", {"type": "message_delta", "delta": {"stop_reason": "end_turn"}, "usage": {"output_tokens": 600}}),
    ("message_stop", {"type": "message_stop"}),
)


async def call(body: bytes, content_type: str, upstream: UpstreamConfig) -> float | None:
    def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(200, headers={"content-type": content_type}, content=body)

    executor = UpstreamExecutor(httpx.AsyncClient(transport=httpx.MockTransport(handler)))
    job = Job.model_validate({"request": {"path": "/v1/chat/completions", "json": {"stream": True}}})
    result = await executor.call(job, upstream, SECRET)
    assert result.kind == "ok"
    return result.actual_cost


@pytest.mark.anyio
async def test_a_streamed_answer_reports_the_usage_of_its_last_chunk():
    """OpenAI's `stream_options.include_usage`: 1,500 tokens in the last chunk (before: no cost
    was reported for a stream, so the key's cost bucket kept a low estimate and overspent)."""
    assert await call(OPENAI_STREAM, "text/event-stream; charset=utf-8", OPENAI) == 1500.0


@pytest.mark.anyio
async def test_anthropic_usage_is_the_sum_of_input_and_output_tokens_streamed_or_not():
    answer = json.dumps({"type": "message", "usage": {"input_tokens": 900, "output_tokens": 600}}).encode()
    assert await call(answer, "application/json", ANTHROPIC) == 1500.0
    assert await call(ANTHROPIC_STREAM, "text/event-stream", ANTHROPIC) == 1500.0


@pytest.mark.anyio
async def test_an_answer_without_usage_reports_no_cost():
    assert await call(sse((None, {"choices": []}), (None, "[DONE]")), "text/event-stream", OPENAI) is None
    assert await call(b'{"usage": {"total_tokens": true}}', "application/json", OPENAI) is None
    assert await call(b'{"usage": {"total_tokens": 7}}', "application/json", OPENAI) == 7.0


def test_stream_events_split_over_lines_and_crlf_are_read():
    body = b'data: {"usage":\r\ndata:  {"total_tokens": 42}}\r\n\r\n: comment\r\n\r\ndata: [DONE]\r\n\r\n'
    assert stream_cost(body, "usage.total_tokens") == 42.0


@pytest.mark.parametrize("path", ["usage..total_tokens", "usage.total_tokens+", "+usage.input_tokens",
                                  "usage.input_tokens++usage.output_tokens", ".usage", " "])
def test_a_misspelt_usage_path_is_refused_in_the_config(path):
    # it would count nothing on every call, silently: the cost bucket kept each job's estimate
    with pytest.raises(ValidationError, match="dotted paths"):
        UpstreamConfig(base_url="https://api.example.test", usage_path=path)


@pytest.mark.anyio
async def test_an_event_too_deeply_nested_to_parse_counts_nothing_and_the_answer_stands():
    """A streamed answer whose usage event nests deeper than json.loads goes (RecursionError, not
    a ValueError) made executor.call raise after the upstream had answered 200: the worker took
    it for its own fault and handed the job back, to be called (and paid) again each delivery.
    Such an event counts nothing, as a JSON body that deep does (workers/body.py); the last
    well-formed usage event still counts."""
    deep = '{"usage": ' + "[" * 100_000 + "]" * 100_000 + "}"
    assert await call(sse((None, deep)), "text/event-stream", OPENAI) is None
    assert await call(OPENAI_STREAM + sse((None, deep)), "text/event-stream", OPENAI) == 1500


def test_a_long_stream_is_read_from_its_end_not_parsed_event_by_event(monkeypatch):
    """With `stream_options.include_usage` every OpenAI chunk carries `"usage": null`, so every
    one of a long answer's chunks was parsed as JSON to find the last one's usage, on the
    worker's event loop (100,000 chunks, 13 MB: 0.6 s of CPU per answer). The events are read
    from the end now, and reading stops once every path has its last value: 2 parses here."""
    import types

    from ratefleet.workers import usage

    parsed = []

    def counting_loads(data, **kw):
        parsed.append(data)
        return json.loads(data, **kw)

    monkeypatch.setattr(usage, "json", types.SimpleNamespace(loads=counting_loads))
    chunk = (None, {"object": "chat.completion.chunk", "choices": [{"delta": {"content": "tok "}}], "usage": None})
    early = (None, {"choices": [], "usage": {"total_tokens": 7}})  # a later usage event wins over it
    body = sse(early, *[chunk] * 2_000) + OPENAI_STREAM
    assert stream_cost(body, "usage.total_tokens") == 1500
    assert len(parsed) <= 2, len(parsed)
    assert stream_cost(ANTHROPIC_STREAM, ANTHROPIC.usage_path) == 1500


@pytest.mark.anyio
@pytest.mark.parametrize("path", ["usage. total_tokens", "usage .total_tokens", " usage . total_tokens "])
async def test_a_usage_path_the_config_accepts_with_spaces_around_a_dot_counts(path):
    """The config accepts spaces around a `+` and around a dot (it checks each part stripped), but
    the reader stripped only around `+`: `usage. total_tokens` looked for the key ' total_tokens'
    and counted nothing on every call, silently, the slip c69daeb set out to stop. Each part is
    read stripped now, as the config checks it."""
    upstream = UpstreamConfig(base_url="https://api.example.test", usage_path=path)
    assert await call(b'{"usage": {"total_tokens": 7}}', "application/json", upstream) == 7.0
    assert await call(OPENAI_STREAM, "text/event-stream", upstream) == 1500.0


RESPONSES_STREAM = sse(  # OpenAI's Responses API: usage only in response.completed, under `response`
    ("response.created", {"type": "response.created", "response": {"id": "resp_1", "usage": None}}),
    ("response.output_text.delta", {"type": "response.output_text.delta", "delta": "hi"}),
    ("response.completed", {"type": "response.completed", "response": {
        "id": "resp_1", "usage": {"input_tokens": 900, "output_tokens": 600, "total_tokens": 1500}}}),
)


@pytest.mark.anyio
async def test_a_responses_api_stream_reports_the_usage_of_its_completed_event():
    # the usage sits under `response` in response.completed: usage.total_tokens found nothing
    assert await call(RESPONSES_STREAM, "text/event-stream", OPENAI) == 1500.0
    answer = json.dumps({"id": "resp_1", "object": "response", "usage": {"total_tokens": 1500}}).encode()
    assert await call(answer, "application/json", OPENAI) == 1500.0
