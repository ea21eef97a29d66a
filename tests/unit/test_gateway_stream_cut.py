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


async def test_a_lone_cr_stream_is_relayed_event_by_event():
    """Lines may end in CR alone (WHATWG "Server-sent events"): such a stream's events go out as
    they come, and a stream cut short ends after its last whole event, not inside one."""
    sub = FakeSub([Msg("inbox.r.s", b'data: {"b": 1}\r\rdata: {"c"', {ATTEMPT_HEADER: "1"})])
    stream = ChunkStream(sub, "inbox.r", b'data: {"a": 1}\r\r', "1", 0.01, "job-10")
    parts = [part async for part in stream.chunks()]
    assert parts[0] == b'data: {"a": 1}\r\r' and parts[1] == b'data: {"b": 1}\r\r'
    assert json.loads(parts[2][len(b"data: "):])["error"]["code"] == "stream_interrupted"


async def test_a_long_event_in_small_parts_is_held_in_linear_time():
    """A 2 MB event (or a stream with no blank line the relay knows) arriving in 100-byte parts:
    each part used to copy and scan all that was held (quadratic: the gateway's loop blocked
    for seconds to minutes); now a part costs its own size."""
    import time
    part = b"x" * 100
    result = {"job_id": "job-11", "status": "succeeded", "attempts": 1}
    msgs = [Msg("inbox.r.s", part, {ATTEMPT_HEADER: "1"}) for _ in range(20_000)]
    sub = FakeSub([*msgs, Msg("inbox.r", json.dumps(result).encode())])
    started = time.process_time()
    body = await collect(ChunkStream(sub, "inbox.r", b"data: ", "1", 5.0, "job-11"))
    assert len(body) == 6 + 2_000_000 and time.process_time() - started < 2.0
