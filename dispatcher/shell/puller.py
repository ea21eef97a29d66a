"""Per-tier pull inbox of the JOBS stream, with our own pull requests (invariant 8).

nats-py's `fetch()` costs a round trip per batch and caps throughput (measurements.md:
~20k/s vs 75-82k/s). Here each tier has one inbox subscription; the leader's state machine
decides how many messages to ask for (core/pulls.py) and this module sends the requests and
turns what arrives into events: a delivery (read by intake, with the lookups a redelivery
needs) or a pull status (408/409/404: how much of a request went unfilled).
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Callable, Container
from typing import Any

import anyio

from ratefleet.dispatcher.core.delivery import Incoming, cancelled_job
from ratefleet.dispatcher.core.events import Event, JobDelivered, PullStatus
from ratefleet.dispatcher.core.pulls import HANDBACK_MARGIN_S, PULL_EXPIRES_S
from ratefleet.dispatcher.shell.bus import LeaderBus, Subscription
from ratefleet.dispatcher.shell.intake import read_message, unreadable
from ratefleet.runtime.cache import wants_lookup
from ratefleet.runtime.handbacks import DeliveryCounts
from ratefleet.runtime.logs import get_logger
from ratefleet.runtime.store import REPEAT_HEADER
from ratefleet.schemas import Config

__all__ = ["DRAIN_S", "HANDBACK_MARGIN_S", "PULL_EXPIRES_S", "TierInbox"]
log = get_logger("ratefleet.puller")
DRAIN_S = 5.0  # longest wait for intake to finish at step-down (its lookups time out sooner)
LOOKUPS_IN_FLIGHT = 128  # deliveries whose Result lookup runs beside intake; more wait for one to end
STORED_LOOKUP_S = 2.0  # seconds: a slow store must not stall intake; then the job is handed back (not called)


class TierInbox:
    """One tier's pull inbox. `post` puts an event on the session's stream (never blocks);
    nothing here changes the leader's state."""

    def __init__(self, bus: LeaderBus, config: Config, tier: str, stream: str, consumer: str,
                 max_deliver: int, post: Callable[[Event], None], gone: Callable[[str], None] = lambda what: None,
                 cancelled: Container[str] = frozenset()) -> None:
        """`gone(what)`: told when a pull request finds no consumer to serve it (status 503: NATS
        has lost the stream or the consumer), so the topology is created anew. `cancelled`: the
        names of cancelled batches (ratefleet/runtime/cancels.py): their jobs end here."""
        self.bus, self.config, self.tier, self.max_deliver, self.post = bus, config, tier, max_deliver, post
        self.gone, self.cancelled = gone, cancelled
        self.next_subject = f"$JS.API.CONSUMER.MSG.NEXT.{stream}.{consumer}"
        self.inbox = ""
        self.reading = True  # False once stepping down: then only the last delivery is read
        self._sub: Subscription | None = None
        self._lookups: set[asyncio.Task] = set()  # deliveries read beside intake (their Result looked up)

    async def start(self) -> None:
        # meet the NATS server's incarnation before any job is read (bus.may_repeat): met first at a
        # later delivery, the Results stored by then (a repeat-marked job's, an rpc refusal's) opened a
        # window of lookups on a fresh server, as if it had restarted and forgotten their ids
        await self.bus.may_repeat(time.time())
        self.inbox = self.bus.new_inbox()
        self._sub = await self.bus.subscribe(self.inbox, self._on_msg)

    async def pull(self, batch: int, expires_s: float) -> None:
        request = {"batch": batch, "expires": int(expires_s * 1e9)}
        await self.bus.publish(self.next_subject, json.dumps(request).encode(), reply=self.inbox)

    async def stop(self) -> None:
        """Unsubscribe, after the open pull requests expired (or their messages wait out
        ack_wait on a dead inbox). Drains: deliveries still queued become events."""
        sub, self._sub = self._sub, None
        if sub is None:
            return
        try:
            with anyio.fail_after(DRAIN_S):
                await sub.drain()
                while self._lookups:
                    await asyncio.wait(set(self._lookups))
        except Exception as exc:  # noqa: BLE001 - slow or gone: what is left returns after ack_wait
            log.warning("pull inbox not drained", tier=self.tier, error=type(exc).__name__)

    async def _on_msg(self, msg: Any) -> None:
        status = msg.headers.get("Status") if msg.headers else None
        if status is not None and not msg.data:
            if status == "503":  # no responders: the consumer (or its stream) is not there
                self.gone(f"the consumer of tier {self.tier}")
            unfilled = int(msg.headers.get("Nats-Pending-Messages", 0) or 0)
            self.post(PullStatus(self.tier, status, unfilled, msg.headers.get("Description")))
            return
        lookup = await self._needs_lookup(msg)
        if not lookup or len(self._lookups) >= LOOKUPS_IN_FLIGHT:
            self.post(await self.delivery(msg, lookup))
            return
        # a redelivery or a repeat: its Result lookup (a JetStream round trip) runs beside intake, so a
        # batch run again (every message a repeat) is read at the tier's pace, not one round trip each:
        # 420-460 jobs/s one after the other, against 1,180-1,570 for unmarked jobs (bench/throughput.py)
        task = asyncio.create_task(self._deliver(msg))
        self._lookups.add(task)
        task.add_done_callback(self._lookups.discard)

    async def _needs_lookup(self, msg: Any) -> bool:
        """Whether `delivery` looks up this message's Result: a redelivery, a message marked as a
        repeat, or a first delivery that may repeat a done job whose id a NATS restart made
        JetStream forget (bus.may_repeat)."""
        return (msg.metadata.num_delivered > 1 or bool(msg.headers and msg.headers.get(REPEAT_HEADER) == "1")
                or await self.bus.may_repeat(_stored_at(msg.metadata)))

    async def _deliver(self, msg: Any) -> None:
        try:
            self.post(await self.delivery(msg, True))
        except Exception:  # noqa: BLE001 - as a callback's error would be: the message comes back after ack_wait
            log.exception("a delivery could not be read; it comes back after ack_wait", tier=self.tier)

    async def delivery(self, msg: Any, lookup: bool | None = None) -> JobDelivered:
        """A JOBS message as an event: read by intake, with the hand-back and 429 counts of
        earlier deliveries and, for a redelivery, a message marked as a repeat (`Incoming.repeat`)
        or a first delivery that may repeat a done job whose id a NATS restart made JetStream
        forget (bus.may_repeat), its Result if one is stored already (`lookup`: `_needs_lookup(msg)`, when the caller has
        it). A job that asks for the cache (`cache_ttl_s`) and has no Result is looked up: a hit is
        stored as its Result (`cached: true`) and answered like a stored one, with no token
        (ratefleet/runtime/cache.py)."""
        meta = msg.metadata
        seq, delivered = meta.sequence.stream, meta.num_delivered
        final = self.max_deliver > 0 and delivered >= self.max_deliver
        if not self.reading and not final:  # stepping down: handed back unread
            return JobDelivered(self.tier, seq, delivered, msg.reply, None, wall=time.time())
        redelivered = delivered > 1
        known = await self.bus.delivery_counts(seq) if redelivered else DeliveryCounts()
        try:
            verdict = read_message(msg, self.tier, self.config, known.handbacks, known.rate_limited,
                                   max_payload=self.bus.max_payload)
        except Exception as exc:  # noqa: BLE001 - one message's content must never stop intake
            log.exception("could not read a job message; ended as invalid", tier=self.tier)
            verdict = unreadable(msg, self.tier, exc)
        if isinstance(verdict, Incoming) and verdict.job.batch in self.cancelled:
            verdict = cancelled_job(verdict)
        stored, cached, unknown, looked_up_at = None, False, False, None
        if lookup is None and isinstance(verdict, Incoming):
            lookup = await self._needs_lookup(msg)
        if isinstance(verdict, Incoming) and lookup:
            looked_up_at = time.monotonic()  # (the leader's clock)
            try:  # no answer is not "no Result": the leader hands the job back instead of calling it
                with anyio.fail_after(STORED_LOOKUP_S):
                    stored = await self.bus.stored_result(verdict.job_id, verdict.job.batch)
            except Exception as exc:  # noqa: BLE001 - TimeoutError, or NATS errors after read_result's retries
                log.warning("a job's Result lookup got no answer", tier=self.tier,
                            job_id=verdict.job_id, error=type(exc).__name__)
                unknown = True
        if stored is None and not unknown and isinstance(verdict, Incoming) and wants_lookup(verdict.job):
            try:
                with anyio.move_on_after(STORED_LOOKUP_S):  # a slow cache is a miss: the job is called
                    stored = await self.bus.cached_result(verdict)
            except Exception as exc:  # noqa: BLE001 - a failing cache is a miss too
                log.warning("answer cache lookup failed; the job is called", tier=self.tier,
                            job_id=verdict.job_id, error=type(exc).__name__)
            cached = stored is not None
        if stored is None and isinstance(verdict, Incoming) and verdict.job.batch in self.cancelled:
            verdict = cancelled_job(verdict)  # cancelled while its lookups ran: the leader's sweep is over
        return JobDelivered(self.tier, seq, delivered, msg.reply, verdict, stored, time.time(), cached, unknown,
                            looked_up_at)


def _stored_at(meta: Any) -> float:
    """When JetStream stored the message (wall-clock seconds); now when the metadata lacks it."""
    stamp = getattr(meta, "timestamp", None)
    return stamp.timestamp() if stamp is not None else time.time()
