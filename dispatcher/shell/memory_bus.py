"""`MemoryBus`: an in-memory LeaderBus for fast tests of the leader shell (like httpx's
MockTransport). Publishes reach subscribers of the exact subject at once; everything the
shell asks of the job lifecycle is recorded in lists a test can read; stored Results,
delivery counts and key records are plain dicts a test can fill."""

from __future__ import annotations

import itertools
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from ratefleet.dispatcher.core.delivery import Incoming, Refused
from ratefleet.dispatcher.shell.bus import Handler, PayloadTooLarge
from ratefleet.runtime.handbacks import DeliveryCounts
from ratefleet.schemas import Subjects


@dataclass
class MemoryMessage:
    """nats-py's Msg shape, as far as the leader shell reads it."""

    subject: str
    data: bytes
    reply: str = ""
    headers: dict[str, str] | None = None
    metadata: Any = None


@dataclass
class MemorySubscription:
    bus: MemoryBus
    subject: str
    handler: Handler

    async def unsubscribe(self) -> None:
        self.bus.subs.get(self.subject, []).remove(self)

    async def drain(self) -> None:
        await self.unsubscribe()


@dataclass
class MemoryBus:
    """See the module docstring; `published`: (subject, payload, reply) in order."""

    subjects: Subjects = field(default_factory=Subjects)
    max_payload: int = 1 << 20
    subs: dict[str, list[MemorySubscription]] = field(default_factory=dict)
    published: list[tuple[str, bytes, str]] = field(default_factory=list)
    naks: list[tuple[str, float]] = field(default_factory=list)
    kept_alive: list[str] = field(default_factory=list)
    handed_back: list[tuple[int, str, float]] = field(default_factory=list)
    answered: list[tuple[bytes, str, str | None]] = field(default_factory=list)
    copies: list[Incoming] = field(default_factory=list)  # the second messages ended (cmd.EndCopy)
    ended: list[Incoming | Refused] = field(default_factory=list)
    results: dict[str, bytes] = field(default_factory=dict)
    cache: dict[str, bytes] = field(default_factory=dict)  # job id -> the cached Result a lookup stores
    counts: dict[int, DeliveryCounts] = field(default_factory=dict)
    keys: dict[str, dict[str, Any]] = field(default_factory=dict)
    forgotten_until: float = 0.0  # messages stored before this (wall-clock s) may repeat a done job
    connected: bool = True  # False: the connection is down (assignments are not sent)
    _inboxes: itertools.count[int] = field(default_factory=itertools.count)

    def new_inbox(self) -> str:
        return f"_INBOX.memory.{next(self._inboxes)}"

    async def subscribe(self, subject: str, handler: Handler) -> MemorySubscription:
        sub = MemorySubscription(self, subject, handler)
        self.subs.setdefault(subject, []).append(sub)
        return sub

    async def publish(self, subject: str, payload: bytes, reply: str = "",
                      headers: Mapping[str, str] | None = None) -> None:
        if len(payload) > self.max_payload:
            raise PayloadTooLarge(f"{len(payload)} bytes")
        self.published.append((subject, payload, reply))
        await self.deliver(MemoryMessage(subject, payload, reply, dict(headers) if headers else None))

    async def deliver(self, msg: MemoryMessage) -> None:
        """Hand a message to the subscribers of its subject (a test's way in)."""
        for sub in list(self.subs.get(msg.subject, [])):
            await sub.handler(msg)

    def sent_to(self, subject: str) -> list[bytes]:
        return [payload for s, payload, _ in self.published if s == subject]

    async def flush(self, timeout: float) -> None:
        return None

    async def nak(self, ack: str, delay_s: float = 0.0) -> None:
        self.naks.append((ack, delay_s))

    async def in_progress(self, ack: str) -> None:
        self.kept_alive.append(ack)

    async def hand_back(self, seq: int, ack: str, delay_s: float) -> None:
        self.handed_back.append((seq, ack, delay_s))

    async def delivery_counts(self, seq: int) -> DeliveryCounts:
        return self.counts.get(seq, DeliveryCounts())

    async def stored_result(self, job_id: str, batch: str | None) -> bytes | None:
        return self.results.get(job_id)

    async def may_repeat(self, stored_at: float) -> bool:
        return stored_at < self.forgotten_until

    async def answer_stored(self, stored: bytes, ack: str, reply_to: str | None) -> None:
        self.answered.append((stored, ack, reply_to))

    async def end_copy(self, incoming: Incoming) -> None:
        self.copies.append(incoming)

    async def cached_result(self, incoming: Incoming) -> bytes | None:
        hit = self.cache.get(incoming.job_id)
        if hit is not None:
            self.results.setdefault(incoming.job_id, hit)
        return hit

    def cache_stats(self) -> dict[str, int]:
        return {}

    async def end_refused(self, refused: Refused) -> None:
        self.ended.append(refused)

    async def end_job(self, incoming: Incoming, code: str, message: str, status: str) -> None:
        self.ended.append(incoming)

    async def load_keys(self) -> dict[str, dict[str, Any]]:
        return dict(self.keys)

    async def save_key(self, key_id: str, record: Mapping[str, Any] | None) -> bool:
        if record is None:
            self.keys.pop(key_id, None)
        else:
            self.keys[key_id] = dict(record)
        return True
