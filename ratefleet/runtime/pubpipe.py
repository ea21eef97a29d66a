"""Pipelined JetStream publishes: many in flight, one reply subscription, a future per publish.

Why not nats-py's `publish_async`: in nats-py 2.16 a refusal with a 503 code (e.g. "maximum
messages exceeded", err_code 10077, which is how a full RATEFLEET_JOBS refuses) makes
`APIError.from_error` raise inside the reply callback, so the publish's future never
resolves. Here every reply resolves its future: a PubAck, an `APIError` carrying the
server's code, or `NoStreamResponseError` when no stream takes the subject.
"""

from __future__ import annotations

import asyncio
import json

from nats.aio.client import Client as NatsClient
from nats.aio.msg import Msg
from nats.js.api import PubAck
from nats.js.errors import APIError, NoStreamResponseError


class PublishPipe:
    """Publish to JetStream without waiting; `publish()` returns a future of the PubAck.

    Use `async with PublishPipe(nc) as pipe`. Futures still open at exit are cancelled.
    """

    def __init__(self, nc: NatsClient) -> None:
        self.nc = nc
        self._prefix = nc.new_inbox()
        self._futures: dict[str, asyncio.Future] = {}
        self._next = 0
        self._sub = None

    async def __aenter__(self) -> PublishPipe:
        self._sub = await self.nc.subscribe(self._prefix + ".*", cb=self._on_reply)
        return self

    async def __aexit__(self, *exc: object) -> None:
        for future in self._futures.values():
            future.cancel()
        self._futures.clear()
        if self._sub is not None and not self.nc.is_closed:
            try:
                await self._sub.unsubscribe()
            except Exception:  # noqa: BLE001 - the connection is going away: nothing to undo
                pass

    async def publish(self, subject: str, payload: bytes, headers: dict[str, str] | None = None) -> asyncio.Future:
        """Send one message; the returned future resolves with its PubAck or the server's refusal."""
        self._next += 1
        token = str(self._next)
        future = asyncio.get_running_loop().create_future()
        self._futures[token] = future
        try:
            await self.nc.publish(subject, payload, reply=f"{self._prefix}.{token}", headers=headers)
        except BaseException:
            self._futures.pop(token, None)
            raise
        return future

    async def _on_reply(self, msg: Msg) -> None:
        future = self._futures.pop(msg.subject.rsplit(".", 1)[-1], None)
        if future is None or future.done():
            return
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
