"""Relaying a streamed answer to the caller waiting for it, chunk by chunk, over core NATS.

A job asked over request/reply (its `reply_to` subject) whose request says `"stream": true`
gets each chunk of a successful server-sent-events answer published to `<reply_to>.s` as the
worker reads it, with header `Ratefleet-Attempt: <n>` (a retried call starts again: the
receiver drops a stream whose attempt changes). The first chunk of an attempt also carries the
upstream's answer headers the worker keeps (executor.KEPT_HEADERS: `x-request-id`,
`openai-processing-ms`, ...), each as `Ratefleet-Answer-<name>`, so the gateway can send them
with the streamed HTTP answer, which begins before any Result exists. The Result, published to `<reply_to>` after
the last chunk and from the same connection, still holds the whole answer and ends the stream:
NATS delivers one publisher's messages in order, so a receiver whose reply subject is
`<inbox>.r` and that subscribes once to `<inbox>.>` sees every chunk before the Result.
Nothing is sent for other jobs. The key's secret is masked in the relayed bytes as in the
Result (workers/body.py `StreamMask`: an upstream echoing the key in a stream, as some quote it in
a 401, must not hand it to the caller).
"""

from __future__ import annotations

from collections.abc import Mapping

from nats.aio.client import Client as NatsClient

from ratefleet.runtime.logs import get_logger
from ratefleet.schemas import Job
from ratefleet.workers.body import StreamMask

log = get_logger("ratefleet.worker")

CHUNK_SUFFIX = ".s"
ATTEMPT_HEADER = "Ratefleet-Attempt"
ANSWER_HEADER_PREFIX = "Ratefleet-Answer-"  # + a kept header's lower-case name, on an attempt's first chunk


def wants_stream(job: Job) -> bool:
    """True when the job's JSON body asks the upstream for a streamed answer (`"stream": true`)."""
    body = job.request.json_body
    return isinstance(body, dict) and body.get("stream") is True


class ChunkRelay:
    """Publishes each chunk of one attempt's streamed answer to `<reply_to>.s` (the executor's
    `on_chunk`), and the answer's kept headers with the first (`answer`, the executor's `on_answer`).
    A chunk that cannot be published is logged and dropped: the call is paid, and the Result holds
    the whole answer."""

    def __init__(self, nc: NatsClient, reply_to: str, attempt: int, secret: str = "") -> None:
        """`secret`: the key's, masked in the chunks as in the Result (body.StreamMask)."""
        self.nc, self.subject = nc, reply_to + CHUNK_SUFFIX
        self.headers = {ATTEMPT_HEADER: str(attempt)}
        self._first: dict[str, str] | None = None  # the next chunk's headers, once the answer's are known
        self._mask = StreamMask(secret)

    def answer(self, headers: Mapping[str, str]) -> None:
        """The answer's kept headers (lower-case names, the secret masked: the executor's
        `on_answer`), before its first chunk: they ride on that chunk."""
        self._first = {**self.headers, **{ANSWER_HEADER_PREFIX + name: value for name, value in headers.items()}}

    async def __call__(self, chunk: bytes) -> None:
        chunk = self._mask.feed(chunk)
        if chunk:
            await self._publish(chunk)

    async def end(self) -> None:
        """The answer is read (or cut off): relay what the mask held back of its last chunk."""
        held = self._mask.end()
        if held:
            await self._publish(held)

    async def _publish(self, chunk: bytes) -> None:
        try:
            await self.nc.publish(self.subject, chunk, headers=self._first or self.headers)
        except Exception as exc:  # noqa: BLE001 - a lost chunk must not fail a paid call; the Result has it all
            log.warning("streamed chunk not relayed", error=type(exc).__name__)
            return
        self._first = None  # (a first chunk not published: the answer's headers go with the next one)


def chunk_relay(nc: NatsClient, reply_to: str | None, attempt: int, job: Job, secret: str = "") -> ChunkRelay | None:
    """The relay of this job's streamed answer, or None when nobody waits for chunks (no
    `reply_to`, or the job does not ask for `"stream": true`). `secret`: the key's, masked in
    the relayed bytes as in the stored Result."""
    if not reply_to or not wants_stream(job):
        return None
    return ChunkRelay(nc, reply_to, attempt, secret)
