"""The dispatcher process's loops and live config (dispatcher/shell/service.py) over recording
fakes, each run until it has done what a test waits for (bounded waits, asserting on what
was done, not on timing): a new config revision, the presence beat, the backlog watch, the
lease keeping of a leader and the campaign for the lease."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import anyio
import anyio.lowlevel
import pytest
from structlog.testing import capture_logs
from test_mut_shell_service import FakeJS, FakeLease, FakeNC, FakeSession

from ratefleet.dispatcher.shell import service
from ratefleet.dispatcher.shell.service import Dispatcher
from ratefleet.schemas import Config, Subjects
from ratefleet.schemas.internal import DispatcherBeat

pytestmark = [pytest.mark.anyio, pytest.mark.timeout(30)]
SUBJECTS = Subjects()


def config(**fields: Any) -> Config:
    return Config.model_validate({
        "upstreams": {"u": {"base_url": "http://127.0.0.1:9"}},
        "pools": {"p": {"keys": [{"id": "k1", "rps": 100, "secret": "env:UNUSED"}]}},
        "tiers": {"vip": {"weight": 4}, "normal": {"weight": 1}},
        "workers": {"slots": 4, "heartbeat_s": 0.05},
        "dispatcher": {"lease_ttl_s": 0.5},
        **fields,
    })


@dataclass
class BeatNC(FakeNC):
    published: list[tuple[str, bytes]] = field(default_factory=list)
    failures: int = 0

    async def publish(self, subject: str, payload: bytes) -> None:
        if self.failures:
            self.failures -= 1
            raise ConnectionError("disconnected")
        self.published.append((subject, payload))


class Session(FakeSession):
    def __init__(self) -> None:
        super().__init__({})
        self.reconfigured: list[tuple[Config, int]] = []

    async def reconfigure(self, config: Config, revision: int) -> None:
        self.reconfigured.append((config, revision))


async def until(check, timeout: float = 10.0) -> None:
    with anyio.fail_after(timeout):
        while not check():
            await anyio.sleep(0.01)


async def running(loop, check) -> None:
    """Run `loop` until `check()` holds, then cancel it."""
    async with anyio.create_task_group() as tg:
        tg.start_soon(loop)
        await until(check)
        tg.cancel_scope.cancel()


async def test_a_new_revision_with_a_new_tier_makes_its_consumer_first_then_applies_everywhere(monkeypatch):
    made: list[tuple[Any, list[str]]] = []

    async def ensure_topology(js, conf: Config) -> None:
        made.append((js, list(conf.tiers)))

    monkeypatch.setattr(service, "ensure_topology", ensure_topology)
    d = Dispatcher(config(), FakeNC(), config_revision=1)  # type: ignore[arg-type]
    d.session = Session()
    stored = config(tiers={"normal": {"weight": 1}, "batch": {"weight": 1}},
                    pools={"p": {"keys": [{"id": "k1", "rps": 100, "secret": "env:UNUSED"},
                                          {"id": "k2", "rps": 5, "secret": "env:UNUSED"}]}})
    with capture_logs() as logs:
        await d._apply_config(2, stored)
    assert made == [(d.js, ["vip", "normal", "batch"])]  # a removed tier's consumer is kept: its jobs wait
    assert list(d.config.tiers) == ["normal", "batch"] and d.config_revision == 2
    assert [k.id for k in d.config.pools["p"].keys] == ["k1", "k2"]
    assert d.rpc.config is d.config and d.session.reconfigured == [(d.config, 2)]
    assert [line for line in logs if line["event"] == "config revision applied"] == [
        {"event": "config revision applied", "log_level": "info", "dispatcher": d.id, "revision": 2, "leader": True,
         "keys": 2, "tiers": ["normal", "batch"]}]


async def test_a_revision_with_the_same_tiers_touches_no_consumer_and_a_standby_has_no_session(monkeypatch):
    made: list = []

    async def ensure_topology(js, conf: Config) -> None:
        made.append(conf)

    monkeypatch.setattr(service, "ensure_topology", ensure_topology)
    d = Dispatcher(config(), FakeNC())  # type: ignore[arg-type]
    with capture_logs() as logs:
        await d._apply_config(3, config(workers={"slots": 9}))
    assert made == [] and d.config_revision == 3
    assert d.config.workers.slots == 4  # the local sections stay the process's own
    assert [line["leader"] for line in logs if line["event"] == "config revision applied"] == [False]


async def test_the_beat_tells_the_other_dispatchers_who_this_is_and_survives_a_disconnect():
    nc = BeatNC(failures=1)
    d = Dispatcher(config(), nc, dispatcher_id="d-9", http="http://d9:9100")  # type: ignore[arg-type]
    with capture_logs() as logs:
        await running(d._beat, lambda: len(nc.published) >= 1)
    d.session = FakeSession({})
    await running(d._beat, lambda: len(nc.published) >= 2)
    subjects = {subject for subject, _ in nc.published}
    beats = [DispatcherBeat.model_validate_json(payload) for _, payload in nc.published[:2]]
    assert subjects == {SUBJECTS.dispatcher_beat}
    assert [(b.dispatcher, b.leader, b.http) for b in beats] == [("d-9", False, "http://d9:9100"),
                                                                 ("d-9", True, "http://d9:9100")]
    assert {"event": "dispatcher beat not sent", "log_level": "debug", "error": "ConnectionError"} in logs


async def test_the_backlog_is_watched_once_a_second_while_leading_and_forgotten_after(monkeypatch):
    sleeps = Sleeps()
    monkeypatch.setattr(service, "anyio", sleeps)
    js = FakeJS({"tier-vip": (5, 0), "tier-normal": (0, 0)})
    d = Dispatcher(config(), FakeNC(js))  # type: ignore[arg-type]
    d.session = FakeSession({})
    d.backlog = {"normal": 3}
    await running(d._watch_backlog, lambda: d.backlog == {"vip": 5, "normal": 0})
    assert {stream for stream, _ in js.asked} == {SUBJECTS.jobs_stream}
    del js.infos["tier-vip"]  # NATS busy for one tier: its last value stays
    js.infos["tier-normal"] = (None, 0)  # type: ignore[assignment]  # no count read: 0
    js.asked.clear()
    with capture_logs() as logs:
        await running(d._watch_backlog, lambda: len(js.asked) >= 2)
    assert d.backlog == {"vip": 5, "normal": 0}
    assert {"event": "backlog not read", "log_level": "debug", "tier": "vip", "error": "TimeoutError"} in logs
    js.infos["tier-vip"] = (8, 0)

    async def lead_again() -> None:  # a standby forgets the backlog, and reads it again once it leads
        await until(lambda: d.backlog == {})
        d.session = FakeSession({})

    async with anyio.create_task_group() as tg:
        d.session = None
        tg.start_soon(d._watch_backlog)
        await lead_again()
        await until(lambda: d.backlog.get("vip") == 8)
        tg.cancel_scope.cancel()
    assert set(sleeps.slept) == {1.0}


class KeptLease(FakeLease):
    """Renews `renewals` times, then reports the lease lost (or raises `failure`)."""

    def __init__(self, renewals: int, failure: Exception | None = None, held: bool = True) -> None:
        super().__init__(held=held)
        self.renewals, self.failure, self.seen, self.attempts = renewals, failure, 0, 0

    async def renew(self) -> bool:
        self.attempts += 1
        if self.renewals:
            self.renewals -= 1
            return True
        if self.failure is not None:
            raise self.failure
        self.held = False
        return False

    async def mark_seen(self) -> None:
        self.seen += 1


async def test_a_leader_renews_its_lease_tells_its_session_and_stops_when_it_is_lost():
    d = Dispatcher(config(), FakeNC())  # type: ignore[arg-type]
    d.session = FakeSession({})
    d.lease = KeptLease(renewals=2)
    with anyio.fail_after(10):
        await d._keep_lease()
    assert d.session.told == [("renewed", 123.5), ("renewed", 123.5), "lost"]
    assert d.lease.seen == 2  # a leader was seen at each renewal, not after the loss


async def test_a_failing_renewal_steps_down_only_once_the_lease_may_have_lapsed():
    d = Dispatcher(config(), FakeNC())  # type: ignore[arg-type]
    lease = d.lease = KeptLease(renewals=0, failure=ConnectionError("away"), held=True)
    stepped_down = anyio.Event()

    async def keep() -> None:
        await d._keep_lease()
        stepped_down.set()

    with capture_logs() as logs:
        async with anyio.create_task_group() as tg:
            tg.start_soon(keep)
            await until(lambda: lease.attempts >= 2)  # failed twice while still held: keeps trying
            assert not stepped_down.is_set()
            lease.held = False
            await until(stepped_down.is_set)
    assert [line for line in logs if line["log_level"] == "warning"] == [
        {"event": "lease renewal failing; stepping down", "log_level": "warning", "error": "ConnectionError"}]


async def test_the_campaign_leads_only_when_it_wins_and_campaigns_again_after_a_failed_session():
    d = Dispatcher(config(), FakeNC())  # type: ignore[arg-type]
    answers: list[Any] = [ConnectionError("away"), False, True, True]
    events: list[str] = []

    class Lease(FakeLease):
        async def try_acquire(self) -> bool:
            answer = answers.pop(0) if answers else False
            events.append(type(answer).__name__ if isinstance(answer, Exception) else f"won={answer}")
            if isinstance(answer, Exception):
                raise answer
            return answer

    async def lead() -> None:
        events.append("lead")
        if events.count("lead") == 1:
            raise RuntimeError("session failed")

    d.lease, d._lead = Lease(), lead  # type: ignore[method-assign]
    with capture_logs() as logs:
        await running(d._campaign, lambda: events.count("lead") == 2)
    assert events[:6] == ["ConnectionError", "won=False", "won=True", "lead", "won=True", "lead"]
    assert {"event": "lease attempt failed", "log_level": "debug", "error": "ConnectionError"} in logs
    assert [line["event"] for line in logs if line["log_level"] == "error"] == [
        "leader session failed; campaigning again"]


class Sleeps:
    """Stands in for `anyio` inside service.py: records each `sleep` (seconds) and yields at once."""

    def __init__(self) -> None:
        self.slept: list[float] = []
        self.fail_after, self.create_task_group, self.CancelScope = anyio.fail_after, anyio.create_task_group, \
            anyio.CancelScope

    async def sleep(self, delay: float) -> None:
        self.slept.append(delay)
        await anyio.sleep(0.001)


@pytest.mark.parametrize(("ttl", "poll"), [(3.0, 0.25), (0.6, 0.1)])
async def test_a_standby_polls_the_lease_four_times_a_second_or_six_times_a_ttl_if_shorter(monkeypatch, ttl, poll):
    sleeps = Sleeps()
    monkeypatch.setattr(service, "anyio", sleeps)
    d = Dispatcher(config(dispatcher={"lease_ttl_s": ttl}), FakeNC())  # type: ignore[arg-type]

    class Lost(FakeLease):
        async def try_acquire(self) -> bool:
            return False

    d.lease = Lost()
    await running(d._campaign, lambda: len(sleeps.slept) >= 3)
    assert sleeps.slept[:3] == pytest.approx([poll] * 3)


async def test_a_leader_renews_four_times_a_ttl(monkeypatch):
    sleeps = Sleeps()
    monkeypatch.setattr(service, "anyio", sleeps)
    d = Dispatcher(config(dispatcher={"lease_ttl_s": 2.0}), FakeNC())  # type: ignore[arg-type]
    d.lease = KeptLease(renewals=3)
    with anyio.fail_after(10):
        await d._keep_lease()
    assert sleeps.slept == pytest.approx([0.5] * 4)


async def test_a_renewal_that_hangs_is_given_up_after_one_interval():
    d = Dispatcher(config(), FakeNC())  # type: ignore[arg-type]

    class Hanging(FakeLease):
        async def renew(self) -> bool:
            await anyio.Event().wait()
            return True

    d.lease = Hanging(held=False)
    with capture_logs() as logs, anyio.fail_after(10):
        await d._keep_lease()
    assert [line for line in logs if line["log_level"] == "warning"] == [
        {"event": "lease renewal failing; stepping down", "log_level": "warning", "error": "TimeoutError"}]


class LeadLease(FakeLease):
    """A lease just won: `last_seen` is when a leader was last seen (epoch seconds, None: never)."""

    def __init__(self, last_seen: float | None) -> None:
        super().__init__()
        self.last_seen, self.marked, self.epoch = last_seen, 0, (4, 17)

    async def last_leader_seen(self) -> float | None:
        return self.last_seen

    async def mark_seen(self) -> None:
        self.marked += 1


class RecordedSession:
    """Stands in for LeaderSession: keeps how it was built and runs until cancelled."""

    made: list[RecordedSession] = []

    def __init__(self, config: Config, bus: Any, dispatcher_id: str, **kwargs: Any) -> None:
        self.config, self.bus, self.dispatcher_id, self.kwargs = config, bus, dispatcher_id, kwargs
        self.running = anyio.Event()
        RecordedSession.made.append(self)

    async def run(self) -> None:
        self.running.set()
        await anyio.Event().wait()


@pytest.mark.parametrize(("ago", "conservative"), [(None, False), (10.0, True), (64.0, True), (66.0, False)])
async def test_a_new_leader_starts_empty_after_a_recent_leader_and_leads_until_the_lease_is_kept_no_more(
        monkeypatch, ago, conservative):
    monkeypatch.setattr(service, "LeaderSession", RecordedSession)
    RecordedSession.made.clear()
    nc = FakeNC()
    d = Dispatcher(config(), nc, dispatcher_id="d-3", config_revision=6)  # type: ignore[arg-type]
    d.lease = LeadLease(None if ago is None else time.time() - ago)
    seen_during: list[Any] = []

    async def keep_lease() -> None:  # the lease is lost once the session runs
        await RecordedSession.made[0].running.wait()
        seen_during.append(d.session)

    d._keep_lease = keep_lease  # type: ignore[method-assign]
    with capture_logs() as logs, anyio.fail_after(10):
        await d._lead()
    [session] = RecordedSession.made
    assert seen_during == [session] and d.session is None and d.lease.marked == 1
    assert (session.config, session.dispatcher_id) == (d.config, "d-3")
    assert session.kwargs == {"conservative": conservative, "epoch": (4, 17), "lease_until": 123.5,
                              "renew": d._renew_for_session, "config_revision": 6}
    assert session.bus.nc is nc and session.bus._cache is d.cache
    assert session.bus.finisher.on_stored == d._count
    assert [(line["event"], line.get("buckets"), line.get("epoch")) for line in logs if line["log_level"] == "info"] == [
        ("became leader", "empty" if conservative else "full", [4, 17]), ("leadership ended", None, None)]
    assert all(line["dispatcher"] == "d-3" for line in logs if line["log_level"] == "info")


async def test_a_failed_session_still_ends_the_leadership():
    d = Dispatcher(config(), FakeNC())  # type: ignore[arg-type]
    d.lease = LeadLease(None)

    async def keep_lease() -> None:
        raise RuntimeError("lease bucket gone")

    d._keep_lease = keep_lease  # type: ignore[method-assign]
    with capture_logs() as logs, pytest.raises(ExceptionGroup) as failed, anyio.fail_after(10):
        await d._lead()
    assert failed.group_contains(RuntimeError, match="lease bucket gone")
    assert d.session is None and [line["event"] for line in logs][-1] == "leadership ended"


@dataclass
class RunNC(FakeNC):
    events: list[Any] = field(default_factory=list)

    async def subscribe(self, subject: str, cb: Any) -> Any:
        self.events.append(("subscribe", subject, cb))
        events = self.events

        class Sub:
            async def unsubscribe(self) -> None:
                await anyio.lowlevel.checkpoint()  # where a cancelled, unshielded stop would end
                events.append("unsubscribed")

        return Sub()

    async def flush(self) -> None:
        await anyio.lowlevel.checkpoint()
        self.events.append("flushed")


@pytest.mark.parametrize(("http", "cancelled"), [(None, False), ("http://d1:9100", False), (None, True)])
async def test_run_starts_topology_lease_presence_service_and_loops_and_undoes_them_at_stop(monkeypatch, http,
                                                                                            cancelled):
    """Stopped by its event or cancelled from outside (the process shutting down): the service,
    the presence subscription and the lease are given up either way (the lease at once, not
    after its TTL)."""
    nc = RunNC()
    events = nc.events
    d = Dispatcher(config(), nc, dispatcher_id="d-1", http=http, config_revision=2)  # type: ignore[arg-type]

    async def ensure_topology(js, conf: Config) -> None:
        events.append(("topology", js, conf))

    class Follower:
        def __init__(self, js, subjects, apply, *, role: str, revision: int | None) -> None:
            events.append(("follower", js, subjects, apply, role, revision))

        async def run(self) -> None:
            events.append("following")
            await anyio.Event().wait()

    class Service:
        async def stop(self) -> None:
            await anyio.lowlevel.checkpoint()
            events.append("service stopped")

    async def start_service(nc_, subjects, dispatcher_id, http_, rpc, status) -> Service:
        events.append(("service", nc_, subjects, dispatcher_id, http_, rpc, status))
        return Service()

    class Lease(FakeLease):
        async def open(self) -> None:
            events.append("lease opened")

        async def release(self) -> None:
            await anyio.lowlevel.checkpoint()
            events.append("lease released")

    def loop(name: str):
        async def run() -> None:
            events.append(name)
            await anyio.Event().wait()
        return run

    monkeypatch.setattr(service, "ensure_topology", ensure_topology)
    monkeypatch.setattr(service, "ConfigFollower", Follower)
    monkeypatch.setattr(service, "start_service", start_service)
    d.lease = Lease()
    d._campaign, d._beat, d._watch_backlog = loop("campaigning"), loop("beating"), loop("watching")  # type: ignore
    loops = {"following", "campaigning", "beating"} | ({"watching"} if http else set())
    stop = anyio.Event()
    with capture_logs() as logs, anyio.fail_after(10):
        async with anyio.create_task_group() as tg:
            tg.start_soon(d.run, stop)
            await until(lambda: loops <= {e for e in events if isinstance(e, str)})
            started = list(events)
            if cancelled:
                tg.cancel_scope.cancel()
            else:
                stop.set()
    assert started[:5] == [("topology", d.js, d.config), "lease opened",
                           ("follower", d.js, d.subjects, d._apply_config, "dispatcher", 2),
                           ("subscribe", SUBJECTS.dispatcher_beat, d.peers.on_beat),
                           ("service", nc, d.subjects, "d-1", http, d.rpc.handle, d._on_status)]
    assert set(started[5:]) == loops and "watching" not in events[len(started):]
    assert events[len(started):] == ["service stopped", "unsubscribed", "lease released", "flushed"]
    assert d.rpc.finisher.on_stored == d._count
    assert [(line["event"], line.get("tiers")) for line in logs if line["log_level"] == "info"] == [
        ("dispatcher started", ["vip", "normal"]), ("dispatcher stopped", None)]
    assert all(line["dispatcher"] == "d-1" for line in logs if line["log_level"] == "info")
