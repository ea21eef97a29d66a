"""Streamed answers through the gateway: `"stream": true` relayed as server-sent events.

The job goes out with reply subject `<inbox>.r`; one subscription on `<inbox>.>` receives the
chunks the worker relays to `<inbox>.r.s` while it reads the upstream's answer
(workers/relay.py) and then the Result on `<inbox>.r`, in that order (one publisher, one
subscription). If the Result comes first (the upstream answered an error, or not as a stream),
the caller gets it as a normal answer; otherwise the answer starts with the first chunk and
ends with the Result, which also holds the complete body for later (`ratefleet result ID`).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field

import nats.errors
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription

from ratefleet.client import Client
from ratefleet.runtime.logs import get_logger
from ratefleet.schemas import Job, Result
from ratefleet.schemas.errors import RatefleetError, RequestTimeout
from ratefleet.workers.relay import ANSWER_HEADER_PREFIX, ATTEMPT_HEADER  # the names the worker's relay sets

__all__ = ["ATTEMPT_HEADER", "ChunkStream", "StreamStopped", "next_part", "start_stream"]

log = get_logger("ratefleet.gateway")
STOP_CHECK_S = 1.0  # a stream waiting for its next part looks at the gateway's stop this often (seconds)
STOP_GRACE_S = 5.0  # a stopping gateway's open streams may end by themselves this long, then end early (seconds)


@dataclass
class ChunkStream:
    """A streamed answer under way: its first chunk, then the rest as they come until the Result.
    `idle_timeout_s`: the longest wait for the next chunk (seconds). `headers`: the upstream's
    answer headers the worker relayed with the first chunk (lower-case names: `x-request-id`,
    `openai-processing-ms`, `content-type`; workers/relay.py)."""

    sub: Subscription
    reply_to: str
    first: bytes
    attempt: str | None
    idle_timeout_s: float
    job_id: str
    result: Result | None = None
    headers: dict[str, str] = field(default_factory=dict)
    # the monotonic time by which the gateway, stopping, ends its open streams (None while it runs)
    stop_at: Callable[[], float | None] = lambda: None

    async def chunks(self) -> AsyncIterator[bytes]:
        """The upstream's server-sent events as they come, whole: a chunk is relayed up to its
        last event boundary (a blank line) and the rest held until the event is complete, so a
        stream that stops early never ends inside an event (the SDKs would parse the half event
        and raise a bare JSON error). Ends at the Result (after an error event when the Result
        has an error: the answer stopped short of its end); early when the job's call is retried
        (a new attempt would repeat what the caller already has: the call failed mid-answer) or
        nothing comes for `idle_timeout_s`. An early end is never a clean end: the stream's last
        event is then an OpenAI-style error (`interrupted`), which the OpenAI SDKs raise as an
        APIError, rather than a stream that just stops without [DONE] (which they take for a
        complete answer). A stopping gateway (`stop_at`) ends its open streams the same way
        STOP_GRACE_S after the stop, before uvicorn's graceful shutdown gives up on them. What an
        answer that ended well holds back (a last event without its blank line, or a body that
        is not event-stream at all) goes out at the Result."""
        try:
            held = bytearray()  # grows in place: a long event in small parts is not copied per part
            part = self.first
            while True:
                seen = max(len(held) - 2, 0)  # a blank line may begin in the last 2 bytes held
                held += part
                end = event_end(held, seen)
                if end:
                    yield bytes(held[:end])
                    del held[:end]
                try:
                    msg = await next_part(self.sub, time.monotonic() + self.idle_timeout_s, self.stop_at)
                except StreamStopped:
                    log.warning("gateway stopping; stream ended early", job_id=self.job_id)
                    yield interrupted(self.job_id, "the gateway is stopping (a restart or a shutdown) and the job "
                                      "runs on without it")
                    return
                except TimeoutError:
                    log.warning("stream idle; ended early", job_id=self.job_id, idle_s=self.idle_timeout_s)
                    yield interrupted(self.job_id, f"no part of the answer came for {self.idle_timeout_s:g}s")
                    return
                if msg.subject == self.reply_to:
                    self.result = Result.from_json(msg.data)
                    if self.result.error is not None:  # e.g. response_too_large: the chunks stopped short
                        yield ended_badly(self.result)
                    elif held:
                        yield bytes(held)
                    return
                if (msg.headers or {}).get(ATTEMPT_HEADER) != self.attempt:
                    log.warning("streamed call retried; stream ended early", job_id=self.job_id)
                    yield interrupted(self.job_id, "the call failed mid-answer (a timeout, a dropped connection "
                                      "or a stopped worker) and is being made again")
                    return
                part = msg.data
        finally:
            with contextlib.suppress(nats.errors.Error):  # a connection draining or closed has dropped it already
                await self.sub.unsubscribe()


class StreamStopped(RatefleetError):
    """The gateway stopped (its stop deadline passed) before a stream's first part came; the job
    is stored and runs (the gateway answers 503 `gateway_stopping` naming it)."""


async def next_part(sub: Subscription, idle_until: float, stop_at: Callable[[], float | None]) -> Msg:
    """The next message of a stream (its first part, or the next one). Raises TimeoutError once
    `idle_until` (monotonic) passes, and StreamStopped once the gateway's stop deadline
    (`stop_at()`, None while it runs) passes first. Waits STOP_CHECK_S at a time, so a stop that
    comes during a long silence of the upstream is seen within a second (a gateway trial:
    SIGTERM cut a stream with a bare connection reset after uvicorn's graceful timeout, and a
    ConnectionDrainingError traceback; a review: also one still waiting for its first part)."""
    while True:
        now, deadline = time.monotonic(), stop_at()
        if deadline is not None and now >= deadline:
            raise StreamStopped
        if now >= idle_until:
            raise TimeoutError
        until = idle_until if deadline is None else min(idle_until, deadline)
        try:
            return await sub.next_msg(timeout=max(0.001, min(until - now, STOP_CHECK_S)))
        except TimeoutError:
            continue


def event_end(data: bytes | bytearray, start: int = 0) -> int:
    """Where the last whole event of `data` ends (0: none), looking at blank lines that end at
    or after `start` only (what was looked at before is not scanned again). An event ends at a
    blank line, and a line ends in CRLF, LF or CR (the WHATWG HTML standard, "Server-sent
    events"): `\n\n`, `\r\r` or `\n\r\n` (which `\r\n\r\n` ends in)."""
    lf = data.rfind(b"\n\n", start)
    cr = data.rfind(b"\r\r", start)
    crlf = data.rfind(b"\n\r\n", start)
    return max(lf + 2 if lf >= 0 else 0, cr + 2 if cr >= 0 else 0, crlf + 3 if crlf >= 0 else 0)


def ended_badly(result: Result) -> bytes:
    """The last event of a stream whose job ended with an error after its answer began (the
    answer passed `workers.max_response_bytes`, or the call broke on its last attempt): an
    OpenAI-style error event with the Result's code, so the SDKs raise instead of taking what
    came for the whole answer."""
    assert result.error is not None
    error = {"message": f"The stream was cut short: job {result.job_id} ended {result.status} "
                        f"({result.error.code}: {result.error.message}). `ratefleet result {result.job_id}` "
                        "shows its Result.", "type": "server_error", "param": None, "code": str(result.error.code)}
    return _error_event(error)


def interrupted(job_id: str, why: str) -> bytes:
    """The server-sent event that ends a stream cut short: `data: {"error": {...}}` (type
    `server_error`, code `stream_interrupted`). The message says where the whole answer will
    be: the job's stored Result (`ratefleet result <job id>`)."""
    error = {"message": f"The stream was cut short: {why}. The complete answer will be the job's stored Result: "
                        f"`ratefleet result {job_id}`.", "type": "server_error", "param": None,
             "code": "stream_interrupted"}
    return _error_event(error)


def _error_event(error: dict) -> bytes:
    """`data: {"error": ...}` as one server-sent event (the stream so far ends at an event
    boundary: `ChunkStream.chunks` relays whole events only)."""
    return b"data: " + json.dumps({"error": error}).encode() + b"\n\n"


async def start_stream(client: Client, job: Job, tier: str, timeout_s: float,
                       stop_at: Callable[[], float | None] = lambda: None) -> Result | ChunkStream:
    """Store `job` and wait up to `timeout_s` seconds for its first chunk or its Result.
    `stop_at`: the gateway's stop deadline (ChunkStream.stop_at). Raises TimeoutError (no first
    part in time), RequestTimeout (NATS did not confirm storing the job within `timeout_s`), and
    what `Client.submit_for_reply` raises (QueueFull, JobInvalid, SubmitError, NatsError)."""
    inbox = client.nc.new_inbox()
    reply_to = inbox + ".r"
    sub = await client.nc.subscribe(inbox + ".>")
    until = time.monotonic() + timeout_s  # the store's wait counts too (a paused NATS held a stream 33 s for 20)
    try:
        try:
            async with asyncio.timeout(timeout_s):
                await client.submit_for_reply(job, tier, reply_to)
        except TimeoutError:
            raise RequestTimeout(f"NATS did not confirm storing job {job.id} within {timeout_s:g}s",
                                 job_id=job.id, reason="nats_unavailable",
                                 why="NATS did not confirm storing it in time; if it was stored, its deadline (this "
                                     "timeout) has passed: it ends `expired`, unpaid, unless a worker took it "
                                     "already") from None
        msg = await next_part(sub, until, stop_at)
    except BaseException:
        with contextlib.suppress(nats.errors.Error):
            await sub.unsubscribe()
        raise
    if msg.subject == reply_to:
        await sub.unsubscribe()
        return await client.bodies.resolve(Result.from_json(msg.data))
    headers = msg.headers or {}
    return ChunkStream(sub, reply_to, msg.data, headers.get(ATTEMPT_HEADER), timeout_s, job.id or "",
                       headers=answer_headers(headers), stop_at=stop_at)


def answer_headers(chunk_headers: dict[str, str]) -> dict[str, str]:
    """The upstream's answer headers a first chunk carries (`Ratefleet-Answer-<name>`), by name."""
    size = len(ANSWER_HEADER_PREFIX)
    return {name[size:]: value for name, value in chunk_headers.items() if name.startswith(ANSWER_HEADER_PREFIX)}
