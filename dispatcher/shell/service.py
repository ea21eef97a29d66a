"""The dispatcher process: topology, request/reply intake, leader election, status.

Every dispatcher answers `rpc.<tier>` requests (as endpoints of the NATS micro service
`ratefleet`, discovery.py). Only the lease holder runs a LeaderSession; standbys poll the
lease and take over when it lapses or is released. Metrics: dispatcher/shell/metrics.py.
"""

from __future__ import annotations

import contextlib
import json
import time
import uuid

import anyio
from nats.aio.client import Client as NatsClient
from nats.aio.msg import Msg
from prometheus_client import CollectorRegistry

from ratefleet.dispatcher.core import events as ev
from ratefleet.dispatcher.core.scaling import desired_workers, inputs_from_status
from ratefleet.dispatcher.shell.bus import NatsLeaderBus
from ratefleet.dispatcher.shell.discovery import Peers, start_service
from ratefleet.dispatcher.shell.leader import LeaderSession
from ratefleet.dispatcher.shell.lease import LeaderLease
from ratefleet.dispatcher.shell.metrics import DispatcherMetrics, LeaderView
from ratefleet.dispatcher.shell.rpc import RpcResponder
from ratefleet.runtime.cache import ResultCache
from ratefleet.runtime.cancels import CancelledBatches
from ratefleet.runtime.config_kv import ConfigFollower
from ratefleet.runtime.connect import flush
from ratefleet.runtime.logs import get_logger
from ratefleet.runtime.metrics import new_registry, register_cache
from ratefleet.runtime.streams import Rebuilder, ensure_topology, stream_gone, tier_consumer
from ratefleet.schemas import Config, Result, Subjects
from ratefleet.schemas.config_store import fleet_view
from ratefleet.schemas.internal import DispatcherBeat

log = get_logger("ratefleet.dispatcher")
# A leader active this recently may have spent tokens a provider still counts (cost buckets
# refill over a minute), so its successor starts with empty buckets.
RECENT_LEADER_S = 65.0


class Dispatcher:
    def __init__(self, config: Config, nc: NatsClient, *, dispatcher_id: str | None = None,
                 registry: CollectorRegistry | None = None, http: str | None = None, config_revision: int | None = None):
        """`registry`: where its metrics go (default: its own); `http`: the URL of its
        /metrics and probes, told to the other dispatchers and to `status`; `config_revision`:
        the fleet config revision `config` comes from (None: the local file)."""
        self.config, self.nc = config, nc
        self.id = dispatcher_id or f"d-{uuid.uuid4().hex[:6]}"
        self.subjects = Subjects(config.nats.prefix)
        self.js = nc.jetstream()
        self.lease = LeaderLease(self.js, self.subjects.leader_bucket, self.id, config.dispatcher.lease_ttl_s)
        self.session: LeaderSession | None = None
        self.http = http
        self.backlog: dict[str, int] = {}  # tier -> jobs JetStream has not delivered (leader, with --http)
        registry = registry or new_registry()
        self.metrics = DispatcherMetrics(registry, self._leader_view)
        self.peers = Peers(forget_after_s=3 * config.workers.heartbeat_s + 1)
        self.cache = ResultCache.from_config(self.js, config)  # intake's lookups; counters kept across leaderships
        register_cache(registry, lambda: self.cache.stats)
        self.config_revision = config_revision  # the fleet config revision applied (None: the local file)
        self.rpc = RpcResponder(config, nc)
        self.rebuilder = Rebuilder(self.js, lambda: self.config)  # NATS lost the streams: create them anew
        # `ratefleet cancel`: batches not to call (the leader also ends those it holds)
        self.cancels = CancelledBatches(self.js, self.subjects, on_cancel=self._cancelled)
        self._tg: anyio.abc.TaskGroup | None = None  # run()'s, for work that outlives a leadership

    def _cancelled(self, batch: str) -> None:
        if self.session is not None:
            self.session.post(ev.BatchCancelled(batch))

    def _count(self, result: Result) -> None:
        self.metrics.job_ended(result.tier, result.status)

    async def run(self, stop: anyio.Event) -> None:
        await ensure_topology(self.js, self.config)
        await self.lease.open()
        responder = self.rpc
        responder.finisher.on_stored = self._count
        follower = ConfigFollower(self.js, self.subjects, self._apply_config, role="dispatcher",
                                  revision=self.config_revision)
        peers_sub = await self.nc.subscribe(self.subjects.dispatcher_beat, cb=self.peers.on_beat)
        service = await start_service(self.nc, self.subjects, self.id, self.http, responder.handle, self._on_status)
        log.info("dispatcher started", dispatcher=self.id, tiers=list(self.config.tiers))
        try:
            async with anyio.create_task_group() as tg:
                self._tg = tg
                tg.start_soon(follower.run)
                tg.start_soon(self.cancels.run)
                tg.start_soon(self._campaign)
                tg.start_soon(self._beat)
                if self.http:
                    tg.start_soon(self._watch_backlog)
                await stop.wait()
                tg.cancel_scope.cancel()
        finally:
            self._tg = None  # (closed: a late ask must not start a task in it)
            with anyio.CancelScope(shield=True):
                await service.stop()
                await peers_sub.unsubscribe()
                await self.lease.release()
                with contextlib.suppress(Exception):  # NATS away: nothing more to push out
                    await flush(self.nc, 5.0)
            log.info("dispatcher stopped", dispatcher=self.id)

    async def _campaign(self) -> None:
        poll = min(0.25, self.config.dispatcher.lease_ttl_s / 6)
        while True:
            try:
                acquired = await self.lease.try_acquire()
            except Exception as exc:  # noqa: BLE001 - NATS away: keep trying
                if stream_gone(exc):  # the lease bucket went with the server's store
                    await self._rebuild("the lease bucket")
                else:
                    log.debug("lease attempt failed", error=type(exc).__name__)
                acquired = False
            if acquired:
                try:
                    await self._lead()
                except Exception:  # noqa: BLE001 - a failed session must not end the dispatcher
                    log.exception("leader session failed; campaigning again")
            await anyio.sleep(poll)

    async def _lead(self) -> None:
        last = await self.lease.last_leader_seen()
        conservative = last is not None and time.time() - last < RECENT_LEADER_S
        await self.lease.mark_seen()
        log.info("became leader", dispatcher=self.id, buckets="empty" if conservative else "full",
                 epoch=list(self.lease.epoch))
        bus = NatsLeaderBus(self.config, self.nc, self.cache)
        bus.finisher.on_stored = self._count
        bus.finisher.gone = lambda: self._rebuild("the Results stream")
        bus.follow = self.rpc.follow  # a second message's requester gets the job's Result once stored
        self.session = LeaderSession(self.config, bus, self.id,
                                     conservative=conservative, epoch=self.lease.epoch,
                                     lease_until=self.lease.held_until, renew=self._renew_for_session,
                                     config_revision=self.config_revision)
        try:
            async with anyio.create_task_group() as tg:
                self.session.gone = self._rebuild_soon
                self.session.cancelled = self.cancels
                tg.start_soon(self.session.run)
                await self._keep_lease()
                tg.cancel_scope.cancel()
        finally:
            self.session = None
            log.info("leadership ended", dispatcher=self.id)

    async def _rebuild(self, what: str) -> None:
        """Create the lost topology anew (runtime/streams.py `Rebuilder`); then mark a leader as
        seen now: the one before the loss may have spent its keys' tokens, and the mark it left
        went with the store, so the next leader starts with empty buckets (see `_lead`)."""
        if await self.rebuilder.rebuild(what):
            await self.lease.mark_seen()

    def _rebuild_soon(self, what: str) -> None:
        """`_rebuild` in the dispatcher's own task group (it outlives a leadership), unless an
        attempt was made within the last REBUILD_EVERY_S (a 503 comes with every pull request)."""
        if self._tg is not None and self.rebuilder.due():
            self._tg.start_soon(self._rebuild, what)

    async def _apply_config(self, revision: int, stored: Config) -> None:
        """A new fleet config revision (runtime/config_kv.py): consumers for new tiers (and
        new delivery limits) first, then intake, request/reply and the leader session. A
        tier's consumer is never deleted here: a removed tier's jobs wait in JetStream."""
        config = fleet_view(self.config, stored)
        if config.tiers != self.config.tiers:
            both = config.model_copy(update={"tiers": {**self.config.tiers, **config.tiers}})
            await ensure_topology(self.js, both)
        self.config, self.config_revision = config, revision
        self.rpc.config = config
        if self.session is not None:
            await self.session.reconfigure(config, revision)
        log.info("config revision applied", dispatcher=self.id, revision=revision,
                 leader=self.session is not None, keys=len(config.keys()), tiers=list(config.tiers))

    async def _renew_for_session(self) -> float | None:
        """Renew now (the session steps down): the lease's new end, or None when it was lost."""
        return self.lease.held_until if await self.lease.renew() else None

    def _tell_session(self) -> None:
        if self.session is not None:
            if self.lease.held:
                self.session.lease_renewed(self.lease.held_until)
            else:
                self.session.lease_lost()

    async def _keep_lease(self) -> None:
        """Renew the lease; return (ending the session) as soon as it may have lapsed."""
        interval = self.config.dispatcher.lease_ttl_s / 4
        while True:
            await anyio.sleep(interval)
            try:
                with anyio.fail_after(interval):
                    renewed = await self.lease.renew()
                    self._tell_session()
                    if not renewed:
                        return
                    await self.lease.mark_seen()
            except Exception as exc:  # noqa: BLE001 - timeout or disconnect
                if not self.lease.held:
                    log.warning("lease renewal failing; stepping down", error=type(exc).__name__)
                    return

    async def _on_status(self, msg: Msg) -> None:
        """Any dispatcher answers; the leader's answer carries key and worker state."""
        answer = {"dispatcher": self.id, "http": self.http, "leader": await self.lease.current_holder(), "tiers": {},
                  "dispatcher_config_revision": self.config_revision}
        if self.session is not None:
            answer.update(self.session.status())
        else:
            try:
                reply = await self.nc.request(self.subjects.leader_status, b"", timeout=1.0)
                answer.update(json.loads(reply.data))
            except Exception:  # noqa: BLE001 - no leader right now; say so
                if answer["leader"] == self.id:  # its own lease, its session not running (yet, or again after a
                    answer["starting"] = True    # NATS restart: it read "held by <itself>, which did not answer")
                elif answer["leader"] is not None:  # the lease is held, but its holder did not answer
                    answer["silent_lease_holder"], answer["leader"] = answer["leader"], None
        answer["tiers"] = await self._tier_backlog(answer.get("tiers", {}))
        answer["dispatchers"] = self.peers.listing()
        answer["at"] = time.time()
        await msg.respond(json.dumps(answer).encode())

    async def _tier_backlog(self, tiers: dict) -> dict:
        out = {}
        for tier in self.config.tiers:
            entry = dict(tiers.get(tier, {}))
            try:
                info = await self.js.consumer_info(self.subjects.jobs_stream, tier_consumer(tier))
                entry["queued"] = info.num_pending
                entry["unacked"] = info.num_ack_pending
            except Exception:  # noqa: BLE001 - stream busy; the leader's view is still useful
                pass
            out[tier] = entry
        for tier, (queued, unacked) in (await self._unconfigured_backlog()).items():
            out[tier] = {"queued": queued, "unacked": unacked, "configured": False}
        return out

    async def _unconfigured_backlog(self) -> dict[str, tuple[int, int]]:
        """{tier: (queued, unacked)} for tiers the live config no longer has whose consumer still
        holds jobs: a removed tier's jobs wait in JetStream until it returns, and `status` and the
        queue gauge must show them (before: they vanished from both while still queued)."""
        found: dict[str, tuple[int, int]] = {}
        try:
            consumers = await self.js.consumers_info(self.subjects.jobs_stream)
        except Exception:  # noqa: BLE001 - stream busy or gone: nothing to add
            return found
        for info in consumers:
            name = getattr(info, "name", None) or ""
            tier = name[len(tier_consumer("")):] if name.startswith(tier_consumer("")) else None
            if not tier or tier in self.config.tiers:
                continue
            if (info.num_pending or 0) or (info.num_ack_pending or 0):
                found[tier] = (info.num_pending or 0, info.num_ack_pending or 0)
        return found

    # -- probes and metrics -----------------------------------------------------------------

    async def not_ready(self) -> str | None:
        """/readyz: None when this dispatcher leads or knows who does (a standby), else why not."""
        if self.session is not None:
            return None
        if self.lease.kv is None:
            return "starting: leader lease not opened yet"
        if await self.lease.current_holder() is None:
            return "no leader elected yet"
        return None

    def _leader_view(self) -> LeaderView:
        """Read at scrape time (dispatcher/shell/metrics.py): the leader's state and scaling
        signal, or None on a standby."""
        session = self.session
        if session is None:
            return LeaderView(status=None)
        now = time.monotonic()
        status = session.status()
        waiting = sum(self.backlog.values()) + sum(t.get("pending", 0) for t in status.get("tiers", {}).values())
        inputs = inputs_from_status(status, session.machine.scaling, now, backlog=waiting,
                                    default_slots=self.config.workers.slots, pools=self._pools_with_work(status))
        return LeaderView(status=status, backlog=dict(self.backlog), desired_workers=desired_workers(inputs))

    def _pools_with_work(self, status: dict) -> set[str] | None:
        """The pools the tiers with jobs (queued in JetStream, held, or in flight) may use, their
        A/B split's included; None when no tier has any (then no key's capacity is excluded)."""
        tiers = status.get("tiers", {})
        busy = [tier for tier in self.config.tiers
                if self.backlog.get(tier) or tiers.get(tier, {}).get("pending") or tiers.get(tier, {}).get("in_flight")]
        if not busy:
            return None
        pools = {pool for tier in busy for pool in self.config.tier_pools(tier)}
        return pools | {pool for tier in busy if (split := self.config.tiers[tier].split) for pool in split.pools}

    async def _watch_backlog(self) -> None:
        """While leading, read each tier's undelivered backlog once a second for the queue gauge."""
        while True:
            await anyio.sleep(1.0)
            if self.session is None:
                self.backlog.clear()
                continue
            for tier in self.config.tiers:
                try:
                    info = await self.js.consumer_info(self.subjects.jobs_stream, tier_consumer(tier))
                    self.backlog[tier] = info.num_pending or 0
                except Exception as exc:  # noqa: BLE001 - NATS away: the last value stays
                    log.debug("backlog not read", tier=tier, error=type(exc).__name__)
            removed = await self._unconfigured_backlog()
            for tier in {*removed, *(t for t in self.backlog if t not in self.config.tiers)}:
                self.backlog[tier] = removed.get(tier, (0, 0))[0]  # a removed tier: what still waits, else 0

    async def _beat(self) -> None:
        """Presence for the other dispatchers and `status` (discovery.py)."""
        while True:
            beat = DispatcherBeat(dispatcher=self.id, leader=self.session is not None, http=self.http)
            try:
                await self.nc.publish(self.subjects.dispatcher_beat, beat.model_dump_json().encode())
            except Exception as exc:  # noqa: BLE001 - disconnected: the next beat retries
                log.debug("dispatcher beat not sent", error=type(exc).__name__)
            await anyio.sleep(self.config.workers.heartbeat_s)
