"""Relaying a streamed answer to the caller waiting for it, chunk by chunk, over core NATS.

A job asked over request/reply (its `reply_to` subject) whose request says `"stream": true`
gets each chunk of a successful server-sent-events answer published to `<reply_to>.s` as the
worker reads it, with header `Ratefleet-Attempt: <n>` (a retried call starts again: the
receiver drops a stream whose attempt changes). The Result, published to `<reply_to>` after
the last chunk and from the same connection, still holds the whole answer and ends the stream:
NATS delivers one publisher's messages in order, so a receiver whose reply subject is
`<inbox>.r` and that subscribes once to `<inbox>.>` sees every chunk before the Result.
Nothing is sent for other jobs.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable

from nats.aio.client import Client as NatsClient

from ratefleet.runtime.logs import get_logger
from ratefleet.schemas import Job

log = get_logger("ratefleet.worker")

CHUNK_SUFFIX = ".s"
ATTEMPT_HEADER = "Ratefleet-Attempt"


def wants_stream(job: Job) -> bool:
    """True when the job's JSON body asks the upstream for a streamed answer (`"stream": true`)."""
    body = job.request.json_body
    return isinstance(body, dict) and body.get("stream") is True


def chunk_relay(nc: NatsClient, reply_to: str | None, attempt: int, job: Job) -> Callable[[bytes], Awaitable[None]] | None:
    """The callback that publishes each chunk to `<reply_to>.s`, or None when nobody waits for chunks."""
    if not reply_to or not wants_stream(job):
        return None
    subject, headers = reply_to + CHUNK_SUFFIX, {ATTEMPT_HEADER: str(attempt)}

    async def relay(chunk: bytes) -> None:
        try:
            await nc.publish(subject, chunk, headers=headers)
        except Exception as exc:  # noqa: BLE001 - a lost chunk must not fail a paid call; the Result has it all
            log.warning("streamed chunk not relayed", error=type(exc).__name__)

    return relay
