"""The dispatcher process's loops and live config (dispatcher/shell/service.py) over recording
fakes, each run until it has done what a test waits for (bounded waits, asserting on what
was done, not on timing): a new config revision, the presence beat, the backlog watch, the
lease keeping of a leader and the campaign for the lease."""

from __future__ import annotations

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
