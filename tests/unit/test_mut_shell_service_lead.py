"""The dispatcher process's leadership and its whole run (dispatcher/shell/service.py `_lead`,
`run`) over recording fakes: a new leader starts empty after a leader seen within 65 s, builds
its session with the lease's epoch and renewal and ends the leadership when the lease is lost or
the session fails; `run` opens the topology, lease, config follower, presence, service and loops
in order and undoes them at stop.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Any

import anyio
import anyio.lowlevel
import pytest
from structlog.testing import capture_logs
from test_mut_shell_service import FakeLease, FakeNC
from test_mut_shell_service_loops import SUBJECTS, config, until

from ratefleet.dispatcher.shell import service
from ratefleet.dispatcher.shell.service import Dispatcher
from ratefleet.schemas import Config

pytestmark = [pytest.mark.anyio, pytest.mark.timeout(30)]


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


NOW = 1_700_000_000.0  # the dispatcher's wall clock in these tests (epoch seconds)


@pytest.mark.parametrize(("ago", "conservative"),
                         [(None, False), (10.0, True), (64.0, True), (64.999, True), (65.0, False), (66.0, False)])
async def test_a_new_leader_starts_empty_after_a_recent_leader_and_leads_until_the_lease_is_kept_no_more(
        monkeypatch, ago, conservative):
    monkeypatch.setattr(service, "time", SimpleNamespace(time=lambda: NOW, monotonic=time.monotonic))
    monkeypatch.setattr(service, "LeaderSession", RecordedSession)
    RecordedSession.made.clear()
    nc = FakeNC()
    d = Dispatcher(config(), nc, dispatcher_id="d-3", config_revision=6)  # type: ignore[arg-type]
    d.lease = LeadLease(None if ago is None else NOW - ago)
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

    async def flush(self, timeout: float = 10) -> None:  # (nats-py's signature: runtime/connect.py flush passes it)
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
