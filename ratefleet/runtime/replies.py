"""One reply subscription for many requests: a wildcard inbox and a future per request.

A subscriber subscribes once to `<inbox>.*` (its connection's inbox prefix, so `[nats]
inbox_prefix` permissions hold) and each request waits on `<inbox>.<n>`; the reply's last
token names the waiting future. This is what nats-py does for its own `request()` (the "new
style" response mux), kept separate because the replies here come long after the publish
that carried the reply subject (a job's Result from a worker: `Client.request`), or need
their own reading (JetStream's PubAcks: runtime/pubpipe.py); only the first reply counts (a
redelivered job may answer again). Before, `Client.request` subscribed and unsubscribed per
request: two more protocol messages each, and the server's interest graph changed each time.

A reply nobody waits for any more (timed out, discarded, or a second answer) is dropped. A
streamed answer's chunks go to `<reply subject>.s` (workers/relay.py), one token deeper than
the wildcard, so they never reach this subscription.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

from nats.aio.client import Client as NatsClient

Settle = Callable[[Any, "asyncio.Future[Any]"], None]


def _as_message(msg: Any, future: asyncio.Future[Any]) -> None:
    future.set_result(msg)


class ReplyInbox:
    """Reply subjects for one connection. `expect()` gives a subject and the future its
    first message resolves; `discard(subject)` forgets it. `settle(msg, future)` turns a
    reply into the future's outcome (default: the nats-py `Msg` itself). `status_replies`
    False: the server's bare status messages are not replies (`Client.request`, whose inbox
    also gets the 503 "no responders" of its best-effort publish to the dispatchers' rpc
    endpoint when no dispatcher runs; a PubAck reader needs them: a 503 there is "no stream")."""

    def __init__(self, nc: NatsClient, settle: Settle = _as_message, *, status_replies: bool = True) -> None:
        self.nc = nc
        self.prefix = ""
        self._settle = settle
        # False: a bare status message (a `Status` header, no data: the server's 503 "no responders"
        # to a publish nobody subscribed to) is no reply, and its waiter goes on waiting
        self._status_replies = status_replies
        self._waiting: dict[str, asyncio.Future[Any]] = {}
        self._next = 0
        self._sub: Any = None
        self._opening: asyncio.Lock | None = None
        self._abandoned = False

    async def expect(self) -> tuple[str, asyncio.Future[Any]]:
        """A fresh reply subject and the future of its first message. Subscribes on first
        use (`open`); nats-py renews the subscription after a reconnect. Raises what nats-py
        raises when the subscription cannot be made (e.g. the connection is closed). Once
        `abandon`ed (the owner closing), the future comes cancelled: a caller that was between
        two steps as its owner closed would else wait for a reply that cannot come (a
        `submit_many` under way at a Client's close waited its 10 s ack_timeout)."""
        if self._sub is None and not self._abandoned:
            await self.open()
        self._next += 1
        token = str(self._next)
        future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        if self._abandoned:
            future.cancel()
        else:
            self._waiting[token] = future
        return f"{self.prefix}.{token}", future

    def discard(self, subject: str) -> None:
        """Stop waiting on `subject`; a late reply to it is dropped."""
        future = self._waiting.pop(subject.rsplit(".", 1)[-1], None)
        if future is not None and not future.done():
            future.cancel()

    @property
    def waiting(self) -> int:
        """Requests still waiting for their reply."""
        return len(self._waiting)

    async def open(self) -> None:
        """Subscribe now (once; `expect` does it on first use otherwise)."""
        if self._opening is None:
            self._opening = asyncio.Lock()
        async with self._opening:
            if self._sub is None:
                prefix = self.nc.new_inbox()
                self._sub = await self.nc.subscribe(prefix + ".*", cb=self._on_reply)
                self.prefix = prefix

    def abandon(self) -> None:
        """Cancel every future still waiting and every one `expect` gives from now on (their
        awaiters see CancelledError without being cancelled themselves: the owner closing);
        the subscription stays until `close`."""
        self._abandoned = True
        waiting, self._waiting = self._waiting, {}
        for future in waiting.values():
            future.cancel()

    async def close(self) -> None:
        """Cancel every future still waiting and unsubscribe (nothing to undo when the
        connection is closed already)."""
        for future in self._waiting.values():
            future.cancel()
        self._waiting.clear()
        sub, self._sub = self._sub, None
        if sub is not None and not self.nc.is_closed:
            try:
                await sub.unsubscribe()
            except Exception:  # noqa: BLE001 - the connection is going away: nothing to undo
                pass

    async def _on_reply(self, msg: Any) -> None:
        if not self._status_replies and not msg.data and msg.headers and msg.headers.get("Status"):
            return
        future = self._waiting.pop(msg.subject.rsplit(".", 1)[-1], None)
        if future is not None and not future.done():
            self._settle(msg, future)
