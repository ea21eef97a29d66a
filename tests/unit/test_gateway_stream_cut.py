"""A gateway stream cut short ends with an error event, not as if complete: a worker killed
mid-answer used to leave curl (exit 0) and the OpenAI SDK (no exception) with half an answer
that looked whole (a break-it trial). The event is parsed the way the `openai` SDK does."""

from __future__ import annotations

import json
from dataclasses import dataclass, field

import pytest

from ratefleet.gateway.streaming import ATTEMPT_HEADER, ChunkStream

pytestmark = pytest.mark.anyio


@dataclass
class Msg:
    subject: str
    data: bytes
    headers: dict | None = None


@dataclass
class FakeSub:
    """Hands out `msgs` in order, then times out."""

    msgs: list[Msg]
    unsubscribed: bool = False
    waited: list[float] = field(default_factory=list)

    async def next_msg(self, timeout: float):
        self.waited.append(timeout)
        if not self.msgs:
            raise TimeoutError
        return self.msgs.pop(0)

    async def unsubscribe(self) -> None:
        self.unsubscribed = True


def events(body: bytes) -> list[str]:
    """The `data:` payloads of a server-sent event stream, as SSE clients split it."""
    return [line[len("data: "):] for block in body.decode().split("\n\n") for line in block.splitlines()
            if line.startswith("data: ")]


async def collect(stream: ChunkStream) -> bytes:
    return b"".join([chunk async for chunk in stream.chunks()])


def chunk(text: str, attempt: str = "1") -> Msg:
    return Msg("inbox.r.s", f'data: {{"choices":[{{"delta":{{"content":"{text}"}}}}]}}\n\n'.encode(),
               {ATTEMPT_HEADER: attempt})


async def test_a_call_retried_mid_stream_ends_with_an_error_event():
    sub = FakeSub([chunk("b"), chunk("a", attempt="2")])  # the second attempt's first chunk: cut
    body = await collect(ChunkStream(sub, "inbox.r", chunk("a").data, "1", 5.0, "job-7"))
    last = json.loads(events(body)[-1])
    assert last["error"]["code"] == "stream_interrupted" and last["error"]["type"] == "server_error"
    assert "ratefleet result job-7" in last["error"]["message"] and "[DONE]" not in body.decode()
    assert [json.loads(e)["choices"][0]["delta"]["content"] for e in events(body)[:-1]] == ["a", "b"]
    assert sub.unsubscribed


async def test_an_idle_stream_cut_inside_an_event_still_ends_with_a_whole_error_event():
    sub = FakeSub([Msg("inbox.r.s", b'data: {"choices":[{"del', {ATTEMPT_HEADER: "1"})])
    body = await collect(ChunkStream(sub, "inbox.r", chunk("a").data, "1", 0.01, "job-8"))
    assert json.loads(events(body)[-1])["error"]["code"] == "stream_interrupted"
    assert body.endswith(b"\n\n")


async def test_a_stream_that_reaches_its_result_ends_cleanly():
    result = {"job_id": "job-9", "status": "succeeded", "attempts": 1}
    sub = FakeSub([chunk("b"), Msg("inbox.r", json.dumps(result).encode())])
    stream = ChunkStream(sub, "inbox.r", chunk("a").data, "1", 5.0, "job-9")
    body = await collect(stream)
    assert "error" not in body.decode() and stream.result is not None and stream.result.job_id == "job-9"
