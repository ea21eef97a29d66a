"""Pipelined JetStream publishes: many in flight, one reply subscription, a future per publish.

Why not nats-py's `publish_async`: in nats-py 2.16 a refusal with a 503 code (e.g. "maximum
messages exceeded", err_code 10077, which is how a full RATEFLEET_JOBS refuses) makes
`APIError.from_error` raise inside the reply callback, so the publish's future never
resolves. Here every reply resolves its future: a PubAck, an `APIError` carrying the
server's code, or `NoStreamResponseError` when no stream takes the subject. The reply
subjects and their futures are runtime/replies.py's `ReplyInbox`.
"""

from __future__ import annotations

import asyncio
import json
from typing import Any

from nats.aio.client import Client as NatsClient
from nats.js.api import PubAck
from nats.js.errors import APIError, NoStreamResponseError

from ratefleet.runtime.replies import ReplyInbox


def settle_pub_ack(msg: Any, future: asyncio.Future[Any]) -> None:
    """JetStream's answer to a publish as the future's outcome: its PubAck, or the refusal
    (`NoStreamResponseError` for a bare 503 status: no stream takes the subject)."""
    if msg.headers and msg.headers.get("Status") == "503" and not msg.data:
        future.set_exception(NoStreamResponseError())
        return
    try:
        answer = json.loads(msg.data)
    except ValueError as exc:
        future.set_exception(exc)
        return
    if "error" in answer:
        error = answer["error"]
        future.set_exception(APIError(code=error.get("code"), description=error.get("description"),
                                      err_code=error.get("err_code")))
    else:
        future.set_result(PubAck.from_response(answer))


class PublishPipe:
    """Publish to JetStream without waiting; `publish()` returns a future of the PubAck.

    Use `async with PublishPipe(nc) as pipe`. Futures still open at exit are cancelled.
    """

    def __init__(self, nc: NatsClient) -> None:
        self.nc = nc
        self._replies = ReplyInbox(nc, settle_pub_ack)

    async def __aenter__(self) -> PublishPipe:
        await self._replies.open()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self._replies.close()

    def abandon(self) -> None:
        """Cancel the futures of every publish still waiting for its PubAck (the owner closing)."""
        self._replies.abandon()

    async def publish(self, subject: str, payload: bytes, headers: dict[str, str] | None = None) -> asyncio.Future:
        """Send one message; the returned future resolves with its PubAck or the server's refusal.
        Once `abandon`ed, nothing is sent and the future comes cancelled."""
        reply, future = await self._replies.expect()
        if future.cancelled():  # abandoned (the owner closing): nothing more is sent
            return future
        try:
            await self.nc.publish(subject, payload, reply=reply, headers=headers)
        except BaseException:
            self._replies.discard(reply)
            raise
        return future
