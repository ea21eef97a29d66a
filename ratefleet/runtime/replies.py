"""One reply subscription for many requests: a wildcard inbox and a future per request.

`Client.request` used to subscribe to a fresh inbox per request and unsubscribe after the
answer: two more protocol messages per request, and a subscription added to and removed
from the server's interest graph each time. Here a client subscribes once to
`<inbox>.*` (its connection's inbox prefix, so `[nats] inbox_prefix` permissions hold) and
each request waits on `<inbox>.<n>`; the reply's last token names the waiting future. This
is what nats-py does for its own `request()` (the "new style" response mux), kept separate
because a job's reply comes from a worker long after the JetStream publish that carried
the reply subject, and only the first reply counts (a redelivered job may answer again).

A reply nobody waits for any more (timed out, or a second answer) is dropped. A streamed
answer's chunks go to `<reply subject>.s` (workers/relay.py), one token deeper than the
wildcard, so they never reach this subscription.
"""

from __future__ import annotations

import asyncio
from typing import Any

from nats.aio.client import Client as NatsClient


class ReplyInbox:
    """Reply subjects for one connection. `expect()` gives a subject and the future its
    first message resolves (the nats-py `Msg`); `discard(subject)` forgets it."""

    def __init__(self, nc: NatsClient) -> None:
        self.nc = nc
        self.prefix = ""
        self._waiting: dict[str, asyncio.Future[Any]] = {}
        self._next = 0
        self._sub: Any = None
        self._opening: asyncio.Lock | None = None

    async def expect(self) -> tuple[str, asyncio.Future[Any]]:
        """A fresh reply subject and the future of its first message. Subscribes on first
        use; nats-py renews the subscription after a reconnect. Raises what nats-py raises
        when the subscription cannot be made (e.g. the connection is closed)."""
        if self._sub is None:
            await self._open()
        self._next += 1
        token = str(self._next)
        future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
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

    async def _open(self) -> None:
        if self._opening is None:
            self._opening = asyncio.Lock()
        async with self._opening:
            if self._sub is None:
                prefix = self.nc.new_inbox()
                self._sub = await self.nc.subscribe(prefix + ".*", cb=self._on_reply)
                self.prefix = prefix

    async def _on_reply(self, msg: Any) -> None:
        future = self._waiting.pop(msg.subject.rsplit(".", 1)[-1], None)
        if future is not None and not future.done():
            future.set_result(msg)
