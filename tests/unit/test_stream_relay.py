"""Streamed answers: the executor hands each chunk of a successful server-sent-events answer
to the relay as it reads it (over httpx.MockTransport), the relay publishes only for jobs that
asked for a stream over request/reply, and the mock upstream streams OpenAI chunks."""

from __future__ import annotations

import json

import httpx
import pytest

from ratefleet.mock import MockKey, MockSettings, running_mock
from ratefleet.schemas import Job, UpstreamConfig
from ratefleet.workers.executor import UpstreamExecutor
from ratefleet.workers.relay import chunk_relay

UPSTREAM = UpstreamConfig(base_url="https://api.example.test")
EVENTS = [b'data: {"n": 1}\n\n', b'data: {"n": 2}\n\n', b"data: [DONE]\n\n"]


class Chunks(httpx.AsyncByteStream):
    async def __aiter__(self):
        for event in EVENTS:
            yield event


def job(stream: bool = True) -> Job:
    return Job.model_validate({"request": {"path": "/v1/chat/completions", "json": {"model": "m", "stream": stream}}})


async def call(status: int, content_type: str) -> tuple[list[bytes], object]:
    def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(status, headers={"content-type": content_type}, stream=Chunks())

    seen: list[bytes] = []

    async def on_chunk(chunk: bytes) -> None:
        seen.append(chunk)

    executor = UpstreamExecutor(httpx.AsyncClient(transport=httpx.MockTransport(handler)))
    return seen, await executor.call(job(), UPSTREAM, "sk-x", on_chunk)


@pytest.mark.anyio
async def test_each_chunk_of_an_event_stream_is_relayed_and_the_result_keeps_the_whole_body():
    seen, result = await call(200, "text/event-stream; charset=utf-8")
    assert seen == EVENTS
    assert result.kind == "ok" and result.response.body == b"".join(EVENTS).decode()


@pytest.mark.anyio
@pytest.mark.parametrize(("status", "content_type"), [(200, "application/json"), (400, "text/event-stream"),
                                                      (429, "text/event-stream")])
async def test_errors_and_answers_that_are_not_event_streams_are_not_relayed(status, content_type):
    seen, result = await call(status, content_type)
    assert seen == [] and result.response.status == status


class Recorder:
    def __init__(self) -> None:
        self.sent: list[tuple[str, bytes, dict]] = []

    async def publish(self, subject: str, payload: bytes, headers: dict) -> None:
        self.sent.append((subject, payload, headers))


@pytest.mark.anyio
async def test_the_relay_publishes_to_the_reply_subjects_chunk_subject_with_the_attempt():
    nc = Recorder()
    relay = chunk_relay(nc, "_INBOX.abc.r", 2, job())
    await relay(b"data: 1\n\n")
    assert nc.sent == [("_INBOX.abc.r.s", b"data: 1\n\n", {"Ratefleet-Attempt": "2"})]
    assert chunk_relay(nc, None, 1, job()) is None  # nobody waits for a reply
    assert chunk_relay(nc, "_INBOX.abc.r", 1, job(stream=False)) is None


def test_the_mock_streams_openai_chat_completion_chunks():
    key = MockKey(id="k1", secret="sk-mock-1", rps=100, burst=10)
    with running_mock(MockSettings(keys=(key,), accept_unknown=False)) as mock:
        answer = httpx.post(mock.url + "/v1/chat/completions", headers={"authorization": "Bearer sk-mock-1"},
                            json={"model": "m", "stream": True, "messages": [{"role": "user", "content": "a b"}]},
                            trust_env=False)
        with pytest.raises(httpx.HTTPStatusError):
            httpx.post(mock.url + "/v1/chat/completions", headers={"authorization": "Bearer sk-mock-1"},
                       json={"model": "m", "stream": True, "messages": [], "mock": {"chunk_ms": -1}},
                       trust_env=False).raise_for_status()
    assert answer.headers["content-type"].startswith("text/event-stream")
    events = [block.removeprefix("data: ") for block in answer.text.split("\n\n") if block]
    assert events[-1] == "[DONE]"
    chunks = [json.loads(event) for event in events[:-1]]
    assert {c["object"] for c in chunks} == {"chat.completion.chunk"} and len({c["id"] for c in chunks}) == 1
    assert "".join(c["choices"][0]["delta"].get("content", "") for c in chunks) == "echo: a b"
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant" and chunks[-1]["choices"][0]["finish_reason"] == "stop"


@pytest.mark.anyio
async def test_a_streams_kept_headers_reach_the_relay_before_its_first_chunk_with_the_secret_masked():
    def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(200, headers={"content-type": "text/event-stream", "x-request-id": "req_7",
                                            "openai-processing-ms": "echo sk-x", "x-ratelimit-remaining-requests": "9",
                                            "set-cookie": "a=b"}, stream=Chunks())

    nc = Recorder()
    relay = chunk_relay(nc, "_INBOX.abc.r", 3, job())
    result = await UpstreamExecutor(httpx.AsyncClient(transport=httpx.MockTransport(handler))).call(
        job(), UPSTREAM, "sk-x", relay, relay.answer)
    assert result.kind == "ok"
    assert [payload for _, payload, _ in nc.sent] == EVENTS
    first, *rest = [headers for _, _, headers in nc.sent]
    # the answer's kept headers (a Result's, without the fleet key's x-ratelimit-*) ride on the first chunk only
    assert first == {"Ratefleet-Attempt": "3", "Ratefleet-Answer-content-type": "text/event-stream",
                     "Ratefleet-Answer-x-request-id": "req_7", "Ratefleet-Answer-openai-processing-ms": "echo ***"}
    assert rest == [{"Ratefleet-Attempt": "3"}] * (len(EVENTS) - 1)


@pytest.mark.anyio
async def test_an_answer_that_is_no_stream_tells_the_relay_nothing():
    def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(200, headers={"content-type": "application/json", "x-request-id": "req_8"}, json={})

    told: list[dict] = []
    await UpstreamExecutor(httpx.AsyncClient(transport=httpx.MockTransport(handler))).call(
        job(), UPSTREAM, "sk-x", None, told.append)
    assert told == []


@pytest.mark.anyio
async def test_the_answers_headers_wait_for_a_first_chunk_that_was_published():
    class Flaky(Recorder):
        def __init__(self) -> None:
            super().__init__()
            self.fail_next = True

        async def publish(self, subject: str, payload: bytes, headers: dict) -> None:
            if self.fail_next:
                self.fail_next = False
                raise ConnectionError("NATS away")
            await super().publish(subject, payload, headers)

    nc = Flaky()
    relay = chunk_relay(nc, "_INBOX.abc.r", 1, job())
    relay.answer({"x-request-id": "req_9"})
    await relay(b"data: 1\n\n")  # lost (logged): the call is paid, the Result has it all
    await relay(b"data: 2\n\n")
    await relay(b"data: 3\n\n")
    assert [headers for _, _, headers in nc.sent] == [
        {"Ratefleet-Attempt": "1", "Ratefleet-Answer-x-request-id": "req_9"}, {"Ratefleet-Attempt": "1"}]
