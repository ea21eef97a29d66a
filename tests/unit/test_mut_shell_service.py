"""The dispatcher process's pure pieces (dispatcher/shell/service.py) over recording fakes of
nats-py's client and JetStream and of the lease and the leader session: its id and peer
memory, the status answer of a leader and of a standby, each tier's backlog from its
consumer, /readyz, the lease news told to the session, the scaling signal read at scrape
time and the jobs it counts. The loops (campaign, beat, backlog watch) run in the e2e tests."""

from __future__ import annotations

import json
import re
import time
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Any

import pytest

from ratefleet.dispatcher.core.scaling import ScalingMeter
from ratefleet.dispatcher.shell.rpc import RpcResponder
from ratefleet.dispatcher.shell.service import Dispatcher
from ratefleet.runtime.metrics import new_registry
from ratefleet.schemas import Config, Result, Subjects

pytestmark = pytest.mark.anyio
SUBJECTS = Subjects()


def config() -> Config:
    return Config.model_validate({
        "upstreams": {"u": {"base_url": "http://127.0.0.1:9"}},
        "pools": {"p": {"keys": [{"id": "k1", "rps": 100, "secret": "env:UNUSED"}]}},
        "tiers": {"vip": {"weight": 4}, "normal": {"weight": 1}},
        "workers": {"slots": 4, "heartbeat_s": 2},
    })


@dataclass
class FakeJS:
    """`consumer_info` answers from `infos` (consumer name -> (pending, ack pending)); others fail."""

    infos: dict[str, tuple[int, int]] = field(default_factory=dict)
    asked: list[tuple[str, str]] = field(default_factory=list)

    async def consumer_info(self, stream: str, consumer: str) -> Any:
        self.asked.append((stream, consumer))
        if consumer not in self.infos:
            raise TimeoutError("stream busy")
        pending, unacked = self.infos[consumer]
        return SimpleNamespace(num_pending=pending, num_ack_pending=unacked)


@dataclass
class FakeNC:
    js: FakeJS = field(default_factory=FakeJS)
    leader_answer: dict | None = None
    requests: list[tuple[str, bytes, float]] = field(default_factory=list)
    max_payload: int = 1 << 20

    def jetstream(self) -> FakeJS:
        return self.js

    async def request(self, subject: str, payload: bytes, timeout: float) -> Any:
        self.requests.append((subject, payload, timeout))
        if self.leader_answer is None:
            raise TimeoutError("no responders")
        return SimpleNamespace(data=json.dumps(self.leader_answer).encode())


class FakeLease:
    def __init__(self, holder: str | None = "d-lead", *, opened: bool = True, held: bool = True,
                 renews: bool = True) -> None:
        self.kv = object() if opened else None
        self.holder, self.held, self.held_until, self.renews = holder, held, 123.5, renews

    async def current_holder(self) -> str | None:
        return self.holder

    async def renew(self) -> bool:
        return self.renews


class FakeSession:
    def __init__(self, status: dict) -> None:
        self._status = status
        self.machine = SimpleNamespace(scaling=ScalingMeter(default_latency_s=1.0))
        self.told: list[Any] = []

    def status(self) -> dict:
        return json.loads(json.dumps(self._status))

    def lease_renewed(self, until: float) -> None:
        self.told.append(("renewed", until))

    def lease_lost(self) -> None:
        self.told.append("lost")


class Msg:
    def __init__(self) -> None:
        self.answers: list[dict] = []

    async def respond(self, data: bytes) -> None:
        self.answers.append(json.loads(data))


def dispatcher(nc: FakeNC | None = None, **kwargs: Any) -> Dispatcher:
    return Dispatcher(config(), nc or FakeNC(), **kwargs)  # type: ignore[arg-type]


def test_a_dispatcher_gets_a_short_random_id_unless_given_one_and_forgets_peers_after_three_beats():
    first, second = dispatcher(), dispatcher()
    assert re.fullmatch(r"d-[0-9a-f]{6}", first.id) and first.id != second.id
    assert dispatcher(dispatcher_id="d-7").id == "d-7"
    assert first.peers.forget_after_s == 3 * 2 + 1
    assert first.lease.holder == first.id and first.lease.ttl_s == config().dispatcher.lease_ttl_s
    assert first.lease.bucket == SUBJECTS.leader_bucket


def test_the_lease_cache_and_request_reply_use_the_dispatchers_own_connection():
    nc = FakeNC()
    d = dispatcher(nc)
    assert d.lease.js is nc.js and d.cache.js is nc.js
    assert isinstance(d.rpc, RpcResponder) and d.rpc.nc is nc and d.rpc.js is nc.js


def test_its_metrics_go_to_the_registry_given_and_count_each_stored_result():
    registry = new_registry()
    d = dispatcher(registry=registry)
    d._count(Result(job_id="j1", status="invalid", tier="vip"))
    d._count(Result(job_id="j2", status="invalid", tier="vip"))
    assert registry.get_sample_value("ratefleet_jobs_total", {"tier": "vip", "status": "invalid"}) == 2
    assert registry.get_sample_value("ratefleet_is_leader", {}) == 0  # a standby
    assert registry.get_sample_value("ratefleet_cache_requests_total", {"result": "hit"}) == 0


async def test_each_configured_tier_gets_its_backlog_from_its_consumer_beside_the_leaders_view():
    nc = FakeNC(FakeJS({"tier-vip": (5, 2)}))
    d = dispatcher(nc)
    got = await d._tier_backlog({"vip": {"pending": 1}, "normal": {"pending": 3}, "gone": {"pending": 9}})
    assert got == {"vip": {"pending": 1, "queued": 5, "unacked": 2}, "normal": {"pending": 3}}
    assert nc.js.asked == [(SUBJECTS.jobs_stream, "tier-vip"), (SUBJECTS.jobs_stream, "tier-normal")]


async def test_a_standby_answers_status_with_the_leaders_view_and_its_own():
    nc = FakeNC(FakeJS({"tier-normal": (7, 0)}), leader_answer={"leader": "d-lead", "keys": {"k1": {}},
                                                                 "tiers": {"normal": {"pending": 2}}})
    d = dispatcher(nc, dispatcher_id="d-2", http="http://d2:9100", config_revision=4)
    d.lease = FakeLease("d-lead")
    msg = Msg()
    await d._on_status(msg)
    [answer] = msg.answers
    assert nc.requests == [(SUBJECTS.leader_status, b"", 1.0)]
    assert (answer["dispatcher"], answer["http"], answer["leader"], answer["dispatcher_config_revision"]) == \
        ("d-2", "http://d2:9100", "d-lead", 4)
    assert answer["keys"] == {"k1": {}} and answer["dispatchers"] == []
    assert answer["tiers"] == {"vip": {}, "normal": {"pending": 2, "queued": 7, "unacked": 0}}
    assert isinstance(answer["at"], float)
    assert set(answer) == {"dispatcher", "http", "leader", "tiers", "dispatcher_config_revision", "keys",
                           "dispatchers", "at"}


async def test_a_standby_that_cannot_reach_a_leader_says_there_is_none():
    d = dispatcher(FakeNC())
    d.lease = FakeLease("d-gone")
    msg = Msg()
    await d._on_status(msg)
    assert msg.answers[0]["leader"] is None and msg.answers[0]["tiers"] == {"vip": {}, "normal": {}}
    assert set(msg.answers[0]) == {"dispatcher", "http", "leader", "tiers", "dispatcher_config_revision",
                                   "dispatchers", "at", "silent_lease_holder"}
    assert msg.answers[0]["silent_lease_holder"] == "d-gone"


async def test_the_leader_answers_status_from_its_session_without_asking_anyone():
    nc = FakeNC()
    d = dispatcher(nc, dispatcher_id="d-lead")
    d.lease = FakeLease("d-lead")
    d.session = FakeSession({"state": "leading", "tiers": {"vip": {"pending": 1}}})
    msg = Msg()
    await d._on_status(msg)
    assert nc.requests == [] and msg.answers[0]["state"] == "leading" and msg.answers[0]["leader"] == "d-lead"
    assert msg.answers[0]["tiers"] == {"vip": {"pending": 1}, "normal": {}}


@pytest.mark.parametrize(("lease", "session", "why"), [
    (FakeLease(opened=False), None, "starting: leader lease not opened yet"),
    (FakeLease(holder=None), None, "no leader elected yet"),
    (FakeLease(holder="d-other"), None, None),
    (FakeLease(opened=False), FakeSession({}), None),  # leading: ready whatever the lease read says
])
async def test_readiness_needs_a_known_leader(lease, session, why):
    d = dispatcher()
    d.lease, d.session = lease, session
    assert await d.not_ready() == why


async def test_a_renewal_for_the_stepping_down_session_gives_the_new_end_or_none():
    d = dispatcher()
    d.lease = FakeLease(renews=True)
    assert await d._renew_for_session() == 123.5
    d.lease = FakeLease(renews=False)
    assert await d._renew_for_session() is None


def test_the_session_hears_whether_the_lease_is_still_held():
    d = dispatcher()
    d._tell_session()  # no session: nothing to tell
    d.session = FakeSession({})
    d.lease = FakeLease(held=True)
    d._tell_session()
    d.lease = FakeLease(held=False)
    d._tell_session()
    assert d.session.told == [("renewed", 123.5), "lost"]


def test_a_standby_exports_no_leader_view():
    view = dispatcher()._leader_view()
    assert view.status is None


@pytest.mark.parametrize(("backlog", "pending", "workers"), [
    ({"vip": 240, "normal": 240}, 240, 3),  # (480 queued + 240 held) / 60 s = 12 calls/s of 1 s, 4 slots each
    ({"vip": 240, "normal": 240}, 0, 2),
    ({}, 240, 1),
])
def test_the_leader_wants_workers_for_the_queued_and_the_held_jobs(backlog, pending, workers):
    d = dispatcher()
    if backlog:  # else: no backlog read yet
        d.backlog = dict(backlog)
    d.session = FakeSession({"keys": {"k1": {"effective_rps": 100.0}},
                             "tiers": {"vip": {"pending": pending, "in_flight": 0}, "normal": {}}})
    view = d._leader_view()
    assert view.desired_workers == workers
    assert view.backlog == backlog and view.backlog is not d.backlog
    assert view.status["keys"] == {"k1": {"effective_rps": 100.0}}


def test_a_leader_still_starting_wants_workers_for_the_queued_jobs():
    d = dispatcher()
    d.backlog = {"normal": 480}
    d.session = FakeSession({"leader": "d-1", "state": "starting"})  # no tiers, keys or workers yet
    assert d._leader_view().desired_workers == 0  # no key capacity known yet
    d.session = FakeSession({"keys": {"k1": {"effective_rps": 100.0}}})
    assert d._leader_view().desired_workers == 2  # 480 / 60 s = 8 calls/s of 1 s, 4 slots each


def test_the_arrival_rate_is_read_at_scrape_time():
    d = dispatcher()
    d.session = FakeSession({"keys": {"k1": {"effective_rps": 100.0}}, "tiers": {"vip": {"pending": 240}}})
    d.session.machine.scaling.arrived(time.monotonic(), 600)  # about 14 jobs/s arriving
    # (240 held / 60 s = 4) + 14 arriving = 18 calls/s of 1 s, 4 slots each
    assert d._leader_view().desired_workers == 5


@dataclass
class ListingJS(FakeJS):
    """FakeJS that also lists the JOBS stream's consumers (a removed tier's consumer stays)."""

    async def consumers_info(self, stream: str) -> list[Any]:
        return [SimpleNamespace(name=name, num_pending=p, num_ack_pending=u) for name, (p, u) in self.infos.items()]


async def test_a_removed_tier_whose_jobs_still_wait_shows_in_status_and_in_the_queue_gauge(monkeypatch):
    """A config push that removes a tier leaves its queued jobs in JetStream until the tier returns;
    `status` and ratefleet_queue_depth must still count them (before: the tier vanished from status
    and the gauge kept its last value, 0, while 100 jobs waited)."""
    nc = FakeNC(ListingJS({"tier-vip": (5, 2), "tier-normal": (0, 0), "tier-guest": (100, 0), "tier-old": (0, 0)}))
    d = dispatcher(nc)
    got = await d._tier_backlog({"vip": {"pending": 1}})
    assert got["guest"] == {"queued": 100, "unacked": 0, "configured": False}
    assert "old" not in got  # nothing waits there: not shown
    assert got["vip"] == {"pending": 1, "queued": 5, "unacked": 2}
    from io import StringIO

    from rich.console import Console

    from ratefleet.status_view import render_status
    out = StringIO()
    render_status({"leader": "d1", "tiers": got, "keys": {}, "workers": []}, Console(file=out, width=200))
    assert "tier guest: 100 jobs wait in JetStream, but the live config has no tier guest" in out.getvalue()


async def test_status_while_the_lease_holder_does_not_answer_names_it_instead_of_saying_no_one_holds_it():
    """A frozen or partitioned leader still holds the lease for up to lease_ttl_s: status said
    'none (no dispatcher holds the lease)' and 'config revision: leader local file', both untrue."""
    nc = FakeNC(FakeJS({}), leader_answer=None)
    d = dispatcher(nc, dispatcher_id="d-2")
    d.lease = FakeLease("d-lead")
    msg = Msg()
    await d._on_status(msg)
    [answer] = msg.answers
    assert answer["leader"] is None and answer["silent_lease_holder"] == "d-lead"
    from io import StringIO

    from rich.console import Console

    from ratefleet.status_view import render_status
    out = StringIO()
    render_status(answer, Console(file=out, width=200))
    text = out.getvalue()
    assert "the lease is held by d-lead, which did not answer" in text
    assert "no dispatcher holds the lease" not in text
    assert "leader -," in text and "leader local file" not in text


def test_only_the_keys_of_pools_a_busy_tier_may_use_feed_the_signal():
    """An operator's trial: a backlog of normal jobs on pool `shared`, beside an idle vip-only pool:
    the vip pool's key counted as capacity (3 workers wanted instead of 1)."""
    d = dispatcher()
    d.config = Config.model_validate({
        "upstreams": {"u": {"base_url": "http://127.0.0.1:9"}},
        "pools": {"shared": {"keys": [{"id": "k1", "rps": 4, "secret": "env:UNUSED"}]},
                  "vip": {"keys": [{"id": "k3", "rps": 100, "secret": "env:UNUSED"}]}},
        "tiers": {"vip": {"weight": 4, "pools": ["vip"]}, "normal": {"weight": 1, "pools": ["shared"]}},
        "workers": {"slots": 4, "heartbeat_s": 2}})
    d.backlog = {"normal": 1500}
    keys = {"k1": {"pool": "shared", "effective_rps": 4.0}, "k3": {"pool": "vip", "effective_rps": 100.0}}
    d.session = FakeSession({"keys": keys, "tiers": {"vip": {}, "normal": {"pending": 64}}})
    assert d._leader_view().desired_workers == 1  # 4 calls/s of 1 s: one worker of 4 slots
    d.backlog = {"normal": 1500, "vip": 1500}
    assert d._leader_view().desired_workers == 13  # the vip pool's 100 calls/s feed the vip backlog: 52 / 4 slots


async def test_a_dispatcher_holding_the_lease_while_its_session_restarts_says_it_is_taking_over():
    """An operations trial: for ~4 s after a NATS restart, status read "none answering (the lease
    is held by d-1, which did not answer)" while d-1 itself answered, between its sessions."""
    d = dispatcher(FakeNC(FakeJS({}), leader_answer=None), dispatcher_id="d-1")
    d.lease = FakeLease("d-1")
    msg = Msg()
    await d._on_status(msg)
    [answer] = msg.answers
    assert (answer["leader"], answer.get("starting")) == ("d-1", True) and "silent_lease_holder" not in answer
    from io import StringIO

    from rich.console import Console

    from ratefleet.status_view import render_status
    out = StringIO()
    render_status(answer, Console(file=out, width=200))
    assert "leader: d-1 (taking over: loading key states; ask again in a moment)" in out.getvalue()
