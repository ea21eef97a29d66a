"""Ending a job, for workers and the dispatcher alike: store its one Result, answer the
reply subject, then ack the JOBS message.

The order is the invariant: the ack comes only after the Result is stored, so a crash
anywhere before the ack means redelivery, and a second Result is refused by the stream.
A Result too large for one message has its body moved to the Object Store first (see
ratefleet/runtime/bodies.py): the stored Result, the reply and the dead letter then carry
a reference and stay under the server's max_payload.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable
from typing import Any

from nats.aio.client import Client as NatsClient
from nats.js import JetStreamContext

from ratefleet.runtime.bodies import BodyStore, body_bytes, inline_limit, letter_response
from ratefleet.runtime.logs import get_logger
from ratefleet.runtime.store import dead_letter, read_result, store_result
from ratefleet.schemas import Config, Result, Subjects

log = get_logger("ratefleet.finish")

UNKNOWN_LETTER_CODE = "unknown"  # the reason code of a dead letter whose Result carries no error



def _may_be_large(result: Result, limit: int) -> bool:
    """False when the body cannot pass `limit` bytes (a text of n characters is at most 4n
    UTF-8 bytes): a small text or binary Result is then serialised once. A JSON body is
    sized by serialising it (microseconds for a usual answer), so a large one is serialised
    once, not once whole and again for the upload."""
    response = result.response
    if response is None:
        return False
    text = response.body if response.body is not None else response.body_b64
    return 4 * len(text) > limit if text is not None else response.json_body is not None


class Finisher:
    """Stores results, sends replies, acks and naks JOBS messages for any role."""

    def __init__(self, nc: NatsClient, js: JetStreamContext, subjects: Subjects,
                 mask_headers: frozenset[str] = frozenset()):
        """`mask_headers`: lower-case header names whose values dead letters mask besides
        FORBIDDEN_HEADERS (the upstreams' auth headers, see `auth_headers`)."""
        self.nc, self.js, self.subjects = nc, js, subjects
        self.mask_headers = mask_headers
        self.bodies = BodyStore(js, subjects.bodies_bucket)
        # called with each Result this finisher newly stored (e.g. to count it in
        # ratefleet_jobs_total); never with one that was stored before
        self.on_stored: Callable[[Result], None] | None = None
        # awaited when the stream or bucket a Result goes to is missing (NATS lost RATEFLEET_RESULTS
        # or the bodies' Object Store): e.g. a Rebuilder's rebuild; the store is retried meanwhile
        self.gone: Callable[[], Awaitable[Any]] | None = None

    async def finish(self, result: Result, *, ack: str | None, reply_to: str | None,
                     then: Callable[[], Awaitable[None]] | None = None,
                     before_answer: Callable[[], Awaitable[None]] | None = None) -> bool:
        """Store, reply, ack; shielded so cancellation cannot lose the ack. True if newly stored.
        `then` is awaited right after the ack, inside the shield (an error it raises is logged:
        the job is stored and acked by then): what it publishes
        (a worker's outcome report) joins the reply's and the ack's socket write. Awaited after
        `finish` returned instead, it came several loop iterations later (the shield's task hand-off),
        after that write, and cost a write of its own: one of a worker's three per request.
        `before_answer` is awaited once the Result is stored, before the reply and the ack (the
        answer cache's write, bounded by its caller)."""
        return await asyncio.shield(self._finish(result, ack, reply_to, then, before_answer))

    async def _finish(self, result: Result, ack: str | None, reply_to: str | None,
                      then: Callable[[], Awaitable[None]] | None = None,
                      before_answer: Callable[[], Awaitable[None]] | None = None) -> bool:
        limit = inline_limit(self.nc.max_payload)
        inline = body_bytes(result.response) if _may_be_large(result, limit) else None
        if inline is not None and len(inline[0]) > limit:  # too large whatever else the Result holds
            result = await self.bodies.offload(result, inline, gone=self.gone)  # before the Result that names it
        payload = result.to_json()  # once: stored, and sent as the reply
        if len(payload) > limit and body_bytes(result.response) is not None:  # a body near the limit
            result = await self.bodies.offload(result, gone=self.gone)
            payload = result.to_json()
        stored = await store_result(self.js, self.subjects, result, payload=payload, gone=self.gone)
        if stored and self.on_stored is not None:
            self.on_stored(result)
        if reply_to and not stored:  # the stored Result is the answer, also when it was an earlier one
            try:
                payload = await read_result(self.js, self.subjects, result.job_id, result.batch) or payload
            except Exception as exc:  # noqa: BLE001 - NATS not answering: the caller waits, so this one goes
                log.warning("the job's stored Result could not be read; its caller gets this worker's",
                            job_id=result.job_id, error=type(exc).__name__)
        if before_answer is not None:
            await before_answer()
        await self._answer(payload, ack, reply_to)
        if then is not None:
            try:
                await then()
            except Exception as exc:  # noqa: BLE001 - the job is stored and acked: nothing to undo or retry
                log.error("after the ack", job_id=result.job_id, error=type(exc).__name__)
        return stored

    async def finish_stored(self, stored: bytes, *, ack: str | None, reply_to: str | None) -> None:
        """A job whose Result is stored already (its finisher died before the ack): send
        that Result to the reply subject, then ack. No call, no second Result."""
        await asyncio.shield(self._answer(stored, ack, reply_to))

    async def _answer(self, payload: bytes | None, ack: str | None, reply_to: str | None) -> None:
        """Reply, then ack: the ack ends the job, so it goes last."""
        if reply_to and payload is not None:
            await self.nc.publish(reply_to, payload)
        if ack:
            await self.nc.publish(ack, b"+ACK")

    async def dead(self, tier: str, result: Result, *, job: dict | None = None, raw: bytes | None = None,
                   last_error: dict | None = None) -> None:
        """A dead letter for `result`. `last_error`: what went wrong last (default: the last
        upstream answer or, when no call was made, the error that ended the job)."""
        error = result.error
        if last_error is None:
            last_error = _last_error(result)
        await dead_letter(self.js, self.subjects, tier, code=error.code if error else UNKNOWN_LETTER_CODE,
                          message=error.message if error else "", job=job, raw=raw, job_id=result.job_id,
                          attempts=result.attempts, last_error=last_error, mask_headers=self.mask_headers,
                          max_payload=self.nc.max_payload)

    async def nak(self, ack: str, delay_s: float = 0.0) -> None:
        payload = b"-NAK" if delay_s <= 0 else b"-NAK " + json.dumps({"delay": int(delay_s * 1e9)}).encode()
        await asyncio.shield(self.nc.publish(ack, payload))

    async def in_progress(self, ack: str) -> None:
        await self.nc.publish(ack, b"+WPI")


def auth_headers(config: Config) -> frozenset[str]:
    """The lower-case auth header names of every configured upstream (e.g. `x-custom-token`)."""
    return frozenset(upstream.auth_header.lower() for upstream in config.upstreams.values())


def _last_error(result: Result) -> dict | None:
    """The last upstream answer, or (no call made) the error that ended the job: a dead
    letter always says why."""
    if result.response is not None:
        return letter_response(result.response)
    return result.error.model_dump() if result.error is not None else None
