"""The leader's seam to NATS: `LeaderBus`, a small protocol, and its nats-py implementation.

The leader shell (leader.py) talks to NATS only through a LeaderBus: core publish and
subscribe, and the job-lifecycle operations it carries out for the state machine's commands
(end a job with its Result and dead letter, answer from a stored Result, ack/nak/in-progress,
hand-backs, delivery counts, key records). `NatsLeaderBus` is the real one; `MemoryBus`
(memory_bus.py) is an in-memory twin for fast tests, like httpx's MockTransport.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping
from typing import Any, Protocol

from nats.aio.client import Client as NatsClient
from nats.errors import MaxPayloadError

from ratefleet.dispatcher.core.delivery import Incoming, Refused
from ratefleet.dispatcher.shell.forgotten import ForgottenIds
from ratefleet.dispatcher.shell.keycontrol import KeyStore
from ratefleet.dispatcher.shell.refusals import finish_refused, refuse_incoming
from ratefleet.runtime.cache import ResultCache, cache_key, cached_result
from ratefleet.runtime.connect import flush
from ratefleet.runtime.finish import Finisher, auth_headers
from ratefleet.runtime.handbacks import DeliveryCounts, Handbacks
from ratefleet.runtime.store import read_result, store_result
from ratefleet.runtime.streams import open_kv
from ratefleet.schemas import Config, Subjects
from ratefleet.schemas.errors import RatefleetError


class PayloadTooLarge(RatefleetError):
    """The server refused a publish larger than its max_payload (the payload's fault)."""


class Subscription(Protocol):
    async def unsubscribe(self) -> None: ...

    async def drain(self) -> None: ...


Handler = Callable[[Any], Awaitable[None]]


class LeaderBus(Protocol):
    """What the leader shell needs from NATS. Messages handed to a handler have `subject`,
    `data`, `headers`, `reply` and, for JOBS deliveries, `metadata` (nats-py's Msg shape)."""

    subjects: Subjects
    max_payload: int

    @property
    def connected(self) -> bool:
        """Whether the connection is up now. While it is not, a publish is only buffered by the
        client, and sent when it reconnects: assignments are not sent then (assign_out.py)."""

    def new_inbox(self) -> str: ...

    async def subscribe(self, subject: str, handler: Handler) -> Subscription: ...

    async def publish(self, subject: str, payload: bytes, reply: str = "",
                      headers: Mapping[str, str] | None = None) -> None:
        """Raises PayloadTooLarge when the server will not take that many bytes. `headers`:
        NATS message headers (e.g. an assignment's `traceparent`)."""

    async def flush(self, timeout: float) -> None: ...

    async def nak(self, ack: str, delay_s: float = 0.0) -> None: ...

    async def in_progress(self, ack: str) -> None: ...

    async def hand_back(self, seq: int, ack: str, delay_s: float) -> None: ...

    async def delivery_counts(self, seq: int) -> DeliveryCounts: ...

    async def stored_result(self, job_id: str, batch: str | None) -> bytes | None: ...

    async def may_repeat(self, stored_at: float) -> bool:
        """Whether a first delivery stored at `stored_at` (wall-clock seconds) may be a done job
        sent again after a NATS restart made JetStream forget its id (dispatcher/shell/forgotten.py),
        so its stored Result must be looked up. Never raises."""

    async def answer_stored(self, stored: bytes, ack: str, reply_to: str | None) -> None: ...

    async def end_copy(self, incoming: Incoming) -> None:
        """Ack a second message of a job (cmd.EndCopy); its reply subject, if any, gets the
        job's Result once stored."""

    async def cached_result(self, incoming: Incoming) -> bytes | None:
        """For a job that asks for the cache: a live cache entry stored as the job's Result
        (`cached: true`) and that stored Result's JSON, or None on a miss (nothing stored)."""

    def cache_stats(self) -> dict[str, int]: ...

    async def end_refused(self, refused: Refused) -> None: ...

    async def end_job(self, incoming: Incoming, code: str, message: str, status: str) -> None: ...

    async def load_keys(self) -> dict[str, dict[str, Any]]: ...

    async def save_key(self, key_id: str, record: Mapping[str, Any] | None) -> bool: ...


class NatsLeaderBus:
    """LeaderBus over a nats-py client (see the protocol)."""

    def __init__(self, config: Config, nc: NatsClient, cache: ResultCache | None = None) -> None:
        """`cache`: the dispatcher's (its counters outlive a leadership); else a new one."""
        self.nc = nc
        self.subjects = Subjects(config.nats.prefix)
        js = nc.jetstream()
        self._js = js
        self._cache = cache or ResultCache.from_config(js, config)
        self._finisher = self.finisher = Finisher(nc, js, self.subjects, auth_headers(config))
        self._handbacks = Handbacks(js, self.subjects.handbacks_bucket)
        self._keys = KeyStore(js, self.subjects.keys_bucket)
        # (job id, reply subject): answer that subject with the job's Result once stored (the
        # dispatcher's RpcResponder.follow); None: a second message's requester is not answered
        self.follow: Callable[[str, str], Awaitable[None]] | None = None
        self._forgotten = ForgottenIds(nc, js, self.subjects.results_stream,
                                       lambda: open_kv(js, self.subjects.leader_bucket + "_seen", ttl=None),
                                       config.streams.duplicate_window_s)

    @property
    def max_payload(self) -> int:
        return self.nc.max_payload

    @property
    def connected(self) -> bool:
        return bool(self.nc.is_connected)

    def new_inbox(self) -> str:
        return self.nc.new_inbox()

    async def subscribe(self, subject: str, handler: Handler) -> Subscription:
        return await self.nc.subscribe(subject, cb=handler, pending_msgs_limit=0)

    async def publish(self, subject: str, payload: bytes, reply: str = "",
                      headers: Mapping[str, str] | None = None) -> None:
        try:
            await self.nc.publish(subject, payload, reply=reply, headers=dict(headers) if headers else None)
        except MaxPayloadError as exc:
            raise PayloadTooLarge(str(exc)) from None

    async def flush(self, timeout: float) -> None:
        await flush(self.nc, timeout)  # (not nc.flush: its timeout breaks the connection, see there)

    async def nak(self, ack: str, delay_s: float = 0.0) -> None:
        await self._finisher.nak(ack, delay_s)

    async def in_progress(self, ack: str) -> None:
        await self._finisher.in_progress(ack)

    async def hand_back(self, seq: int, ack: str, delay_s: float) -> None:
        await self._handbacks.hand_back(seq, self._finisher, ack, delay_s)

    async def delivery_counts(self, seq: int) -> DeliveryCounts:
        return await self._handbacks.counts(seq)

    async def stored_result(self, job_id: str, batch: str | None) -> bytes | None:
        return await read_result(self._js, self.subjects, job_id, batch)

    async def may_repeat(self, stored_at: float) -> bool:
        return await self._forgotten.may_repeat(stored_at)

    async def answer_stored(self, stored: bytes, ack: str, reply_to: str | None) -> None:
        await self._finisher.finish_stored(stored, ack=ack, reply_to=reply_to)

    async def end_copy(self, incoming: Incoming) -> None:
        await self.nc.publish(incoming.ack, b"+ACK")
        if incoming.reply_to and self.follow is not None:
            await self.follow(incoming.job_id, incoming.reply_to)

    async def cached_result(self, incoming: Incoming) -> bytes | None:
        entry = await self._cache.lookup(cache_key(incoming.upstream, incoming.job))
        if entry is None:
            return None
        result = cached_result(incoming.job, incoming.job_id, incoming.tier, entry, submitted_at=incoming.submitted_at)
        payload = result.to_json()
        if await store_result(self._js, self.subjects, result, payload=payload):
            return payload
        return await read_result(self._js, self.subjects, incoming.job_id, incoming.job.batch)  # it had one already

    def cache_stats(self) -> dict[str, int]:
        return self._cache.stats.as_dict()

    async def end_refused(self, refused: Refused) -> None:
        await finish_refused(self._finisher, refused)

    async def end_job(self, incoming: Incoming, code: str, message: str, status: str) -> None:
        await refuse_incoming(self._finisher, incoming, code, message, status)

    async def load_keys(self) -> dict[str, dict[str, Any]]:
        return await self._keys.load()

    async def save_key(self, key_id: str, record: Mapping[str, Any] | None) -> bool:
        return await self._keys.save(key_id, record)
