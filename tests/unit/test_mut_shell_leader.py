"""The leader shell's translations (dispatcher/shell/leader.py), each checked on its own:
the config -> the machine's settings, every command -> its bus call, NATS messages -> events,
the lease renewal at step-down. Over the in-memory bus (memory_bus.py); no nats-server."""

from __future__ import annotations

import json
import math
import time

import anyio
import pytest

from ratefleet.dispatcher.core import OutcomeKind
from ratefleet.dispatcher.core import commands as cmd
from ratefleet.dispatcher.core import events as ev
from ratefleet.dispatcher.core.delivery import Incoming, Refused
from ratefleet.dispatcher.core.leader_fleet import LOST
from ratefleet.dispatcher.shell.bus import PayloadTooLarge
from ratefleet.dispatcher.shell.leader import BURST, LeaderSession, _outcome, leader_settings
from ratefleet.dispatcher.shell.memory_bus import MemoryBus, MemoryMessage
from ratefleet.schemas import Config, ErrorCode, Job, Subjects
from ratefleet.schemas.internal import Heartbeat, OutcomeReport, read_assignments

pytestmark = [pytest.mark.timeout(30)]
SUBJECTS = Subjects()


def config(**extra) -> Config:
    return Config.model_validate({
        "upstreams": {"u": {"base_url": "http://127.0.0.1:9"}},
        "pools": {"p": {"keys": [{"id": "k1", "rps": 100, "secret": "env:UNUSED"}]}},
        **extra,
    })


def incoming(job_id: str = "j1") -> Incoming:
    return Incoming(job=Job.model_validate({"id": job_id, "request": {"path": "/x"}}), job_id=job_id, tier="normal",
                    upstream="u", ack=f"ack.{job_id}", reply_to=None, attempt=1, max_attempts=3, submitted_at=1.0,
                    stream_seq=7)


def refused(job_id: str = "j2") -> Refused:
    return Refused("invalid", ErrorCode.INVALID_JOB, "bad", job_id, None, "normal", f"ack.{job_id}", None, 1, b"{}")


# -- the config -> the machine's settings ---------------------------------------------------------

@pytest.mark.parametrize(("heartbeat_s", "housekeeping_s"), [(0.1, 0.2), (1.0, 0.5), (1.6, 0.8), (4.0, 1.0)])
def test_leader_settings_take_every_value_from_the_config(heartbeat_s, housekeeping_s):
    c = config(workers={"heartbeat_s": heartbeat_s}, streams={"ack_wait_s": 12.0, "max_deliver": 7},
               dispatcher={"window": 33, "worker_timeout_s": 4.5})
    before = time.time()
    s = leader_settings(c, "d-1", (5, 6), 4096)
    assert (s.leader_id, s.epoch, s.max_payload) == ("d-1", (5, 6), 4096)
    assert s.windows == {tier: 33 for tier in c.tiers}
    assert s.max_deliver == {tier: 7 + c.tiers[tier].max_rate_limited for tier in c.tiers}
    assert s.ready_after_s == pytest.approx(heartbeat_s * 1.5)
    assert s.housekeeping_s == pytest.approx(housekeeping_s)
    assert s.keep_alive_after_s == pytest.approx(4.0)
    assert s.worker_timeout_s == 4.5
    assert before <= s.since <= time.time()


def test_a_session_builds_its_machine_from_its_arguments():
    bus = MemoryBus(max_payload=5000)
    session = LeaderSession(config(), bus, "d-2", conservative=False, epoch=(8, 9), lease_until=123.0,
                            config_revision=4)
    m = session.machine
    assert (m.settings.leader_id, m.settings.epoch, m.settings.max_payload) == ("d-2", (8, 9), 5000)
    assert (m.lease_until, m.config_revision) == (123.0, 4)
    assert set(session.inboxes) == set(config().tiers)
    inbox = session.inboxes["normal"]
    assert inbox.next_subject == "$JS.API.CONSUMER.MSG.NEXT.RATEFLEET_JOBS.tier-normal"
    assert inbox.max_deliver == config().streams.max_deliver + config().tiers["normal"].max_rate_limited
    assert m.scheduler.snapshot(time.monotonic())["keys"]["k1"]["tokens"] == 2.0  # full buckets
    made_at = time.monotonic()  # read the buckets as made (no refill: a loaded machine may take 0.1 s here)
    default = LeaderSession(config(), MemoryBus(), "d-3")
    assert default.machine.scheduler.snapshot(made_at)["keys"]["k1"]["tokens"] < 1  # conservative
    assert default.machine.lease_until == math.inf and default.machine.config_revision is None
    assert default.machine.settings.epoch == (0, 0)


# -- commands -> bus calls --------------------------------------------------------------------------

@pytest.mark.anyio
async def test_every_command_becomes_its_bus_call():
    bus = MemoryBus()
    session = LeaderSession(config(), bus, "d-1")
    await session.inboxes["normal"].start()
    answers: list[bytes] = []
    await bus.subscribe("reply.1", lambda msg: _append(answers, msg.data))
    commands = [
        cmd.Pull("normal", 5, 2.0),
        cmd.Nak("ack.1", 1.5),
        cmd.InProgress("ack.2"),
        cmd.HandBack(3, "ack.3", 0.7),
        cmd.EndRefused(refused()),
        cmd.EndJob(incoming("j3"), "NO_POOL", "no pool", "invalid"),
        cmd.AnswerStored(b'{"job_id":"j4"}', "ack.4", "inbox.4"),
        cmd.Announce(b"hello"),
        cmd.SaveKey("k1", {"by": "operator"}),
        cmd.Respond("reply.1", {"ok": True}),
        cmd.Log("info", "a line", {"x": 1}),
    ]
    async with anyio.create_task_group() as tg:
        await session._carry_out(commands, tg)
    pull_subject = session.inboxes["normal"].next_subject
    assert [json.loads(p) for p in bus.sent_to(pull_subject)] == [{"batch": 5, "expires": 2_000_000_000}]
    assert [r for s, _, r in bus.published if s == pull_subject] == [session.inboxes["normal"].inbox]
    assert bus.naks == [("ack.1", 1.5)]
    assert bus.kept_alive == ["ack.2"]
    assert bus.handed_back == [(3, "ack.3", 0.7)]
    assert sorted(getattr(e, "job_id", "") for e in bus.ended) == ["j2", "j3"]
    assert bus.answered == [(b'{"job_id":"j4"}', "ack.4", "inbox.4")]
    assert bus.sent_to(SUBJECTS.leader_announce) == [b"hello"]
    assert bus.keys == {"k1": {"by": "operator"}}
    assert [json.loads(a) for a in answers] == [{"ok": True}]  # no saves: no "persisted"


@pytest.mark.anyio
async def test_end_job_passes_code_message_and_status():
    seen: list[tuple] = []

    class Bus(MemoryBus):
        async def end_job(self, incoming, code, message, status):
            seen.append((incoming.job_id, code, message, status))

        async def end_refused(self, refused):
            seen.append((refused.job_id,))

    session = LeaderSession(config(), Bus(), "d-1")
    async with anyio.create_task_group() as tg:
        await session._carry_out([cmd.EndJob(incoming("j3"), "NO_POOL", "no pool", "invalid"),
                                  cmd.EndRefused(refused("j5"))], tg)
    assert sorted(seen) == [("j3", "NO_POOL", "no pool", "invalid"), ("j5",)]


@pytest.mark.anyio
async def test_an_answer_says_whether_all_its_saves_persisted():
    class Bus(MemoryBus):
        async def save_key(self, key_id, record):
            await super().save_key(key_id, record)
            return key_id != "bad"

    for saves, persisted in (((), None), (("k1", "k2"), True), (("bad", "k2"), False), (("k1", "bad"), False)):
        bus = Bus()
        answers: list[bytes] = []
        await bus.subscribe("r", lambda msg, into=answers: _append(into, msg.data))
        session = LeaderSession(config(), bus, "d-1")
        command = cmd.Respond("r", {"ok": True, "key": "k1"}, tuple(cmd.SaveKey(k, {"by": "x"}) for k in saves))
        async with anyio.create_task_group() as tg:
            await session._carry_out([command], tg)
        answer = json.loads(answers[0])
        assert answer.get("persisted") == persisted and answer["key"] == "k1"
        assert set(bus.keys) == set(saves)  # every save made, even after one failed


@pytest.mark.anyio
async def test_a_failing_command_is_logged_and_the_rest_still_run():
    class Bus(MemoryBus):
        async def nak(self, ack, delay_s=0.0):
            raise ConnectionError("away")

    bus = Bus()
    session = LeaderSession(config(), bus, "d-1")
    async with anyio.create_task_group() as tg:
        await session._carry_out([cmd.Nak("a1"), cmd.InProgress("a2")], tg)
    assert bus.kept_alive == ["a2"]


@pytest.mark.anyio
async def test_a_failing_background_end_is_swallowed():
    class Bus(MemoryBus):
        async def end_refused(self, refused):
            raise ConnectionError("away")

    bus = Bus()
    session = LeaderSession(config(), bus, "d-1")
    async with anyio.create_task_group() as tg:
        await session._carry_out([cmd.EndRefused(refused()), cmd.InProgress("a2")], tg)
    assert bus.kept_alive == ["a2"]


# -- a new config revision ---------------------------------------------------------------------

@pytest.mark.anyio
async def test_a_new_revision_opens_inboxes_for_new_tiers_and_reaches_the_machine_in_order():
    bus = MemoryBus()
    old = config(tiers={"a": {"max_rate_limited": 3}}, streams={"max_deliver": 5})
    session = LeaderSession(old, bus, "d-1")
    await session.inboxes["a"].start()
    kept = session.inboxes["a"]
    new = config(tiers={"a": {"max_rate_limited": 4}, "b": {"max_rate_limited": 6}}, streams={"max_deliver": 5},
                 dispatcher={"window": 9})
    await session.reconfigure(new, 17)
    assert session.inboxes["a"] is kept and kept.max_deliver == 9 and kept.config is new
    added = session.inboxes["b"]
    assert added.inbox and added.inbox in bus.subs  # started: subscribed to its own inbox
    assert (added.max_deliver, added.config, added.tier) == (11, new, "b")
    assert session.config is new
    [changed] = session._queued()
    assert isinstance(changed, ev.ConfigChanged) and changed.revision == 17
    assert (dict(changed.windows), dict(changed.max_deliver)) == ({"a": 9, "b": 9}, {"a": 9, "b": 11})
    assert [t.name for t in changed.spec.tiers] == ["a", "b"]
    await session.reconfigure(config(tiers={"b": {"max_rate_limited": 1}}, streams={"max_deliver": 5}), 18)
    assert kept.config is new  # a removed tier's inbox keeps the config that knew it
    assert session.inboxes["b"].max_deliver == 6


@pytest.mark.anyio
async def test_status_requests_are_answered_with_the_machine_view_and_the_cache_counters():
    class Bus(MemoryBus):
        def cache_stats(self):
            return {"hits": 3}

    bus = Bus()
    session = LeaderSession(config(), bus, "d-1")
    answers: list[bytes] = []
    await bus.subscribe("r", lambda msg: _append(answers, msg.data))
    await session._on_status_request(MemoryMessage(SUBJECTS.leader_status, b"", "r"))
    answer = json.loads(answers[0])
    assert answer["cache"] == {"hits": 3} and answer["leader"] == "d-1"


# -- NATS messages -> events ---------------------------------------------------------------------

def _events(session: LeaderSession) -> list[ev.Event]:
    return session._queued()


@pytest.mark.anyio
async def test_messages_become_events_and_unreadable_ones_are_dropped_or_answered():
    session = LeaderSession(config(), MemoryBus(), "d-1")
    beat = Heartbeat(worker="w1", slots=2)
    await session._on_heartbeat(MemoryMessage(SUBJECTS.heartbeat, beat.model_dump_json().encode()))
    await session._on_heartbeat(MemoryMessage(SUBJECTS.heartbeat, b"not json"))
    [heard] = _events(session)
    assert isinstance(heard, ev.HeartbeatReceived) and heard.beat.worker == "w1"
    reports = [OutcomeReport(assignment=f"a{n}", worker="w1", key_id="k1", job_id=f"j{n}", kind="ok", status=200)
               for n in (1, 2)]
    batch = b"[" + b",".join(r.model_dump_json().encode() for r in reports) + b"]"
    await session._on_outcome(MemoryMessage(SUBJECTS.outcome, batch))
    await session._on_outcome(MemoryMessage(SUBJECTS.outcome, b"garbage"))
    outcomes = _events(session)
    assert [(o.assignment, o.key_id) for o in outcomes] == [("a1", "k1"), ("a2", "k1")]
    await session._on_keys_command(MemoryMessage(SUBJECTS.admin_keys, b'{"action": "enable"}', "r1"))
    await session._on_keys_command(MemoryMessage(SUBJECTS.admin_keys, b"{nope", "r2"))
    good, bad = _events(session)
    assert (good.request, good.reply) == ({"action": "enable"}, "r1")
    assert (bad.request, bad.reply, bad.error) == (None, "r2", "JSONDecodeError")


def test_a_report_without_an_outcome_is_a_lost_call():
    none = OutcomeReport(assignment="a", worker="w", key_id="k1", job_id="j", kind=OutcomeKind.NONE)
    assert _outcome(none) is LOST
    ok = OutcomeReport(assignment="a", worker="w", key_id="k1", job_id="j", kind="ok", status=200)
    assert _outcome(ok) is not LOST and _outcome(ok).kind == OutcomeKind.OK


def test_events_are_handed_over_a_burst_at_a_time():
    session = LeaderSession(config(), MemoryBus(), "d-1")
    for _ in range(BURST + 3):
        session.post(ev.Tick())
    assert len(session._queued()) == BURST
    assert len(session._queued()) == 3
    assert session._queued() == []
    session.post(ev.Tick())
    session._end_events()
    session.post(ev.Tick())  # after the session ended: dropped, never raised
    assert session._queued() == []


@pytest.mark.anyio
async def test_a_wake_time_in_the_past_never_starves_the_loop():
    """A machine whose wake_at stays in the past makes the reader hand it a Tick at once, again and
    again; each pass still lets the loop run other tasks (the callbacks that post events)."""
    session = LeaderSession(config(), MemoryBus(), "d-1")
    session.machine.wake_at = lambda: 0.0
    ticks: list[int] = []
    others = 0

    def handle_all(events, now):
        ticks.append(len(events))
        if len(ticks) >= 1000 and others == 0:  # (without the yield nothing else ever runs: end it here)
            raise AssertionError("the reader never let another task run")
        return []

    session.machine.handle_all = handle_all

    async def other() -> None:
        nonlocal others
        while True:
            others += 1
            await anyio.sleep(0)

    async with anyio.create_task_group() as tg:
        tg.start_soon(other)
        with anyio.move_on_after(0.2):
            await session._read(tg)
        tg.cancel_scope.cancel()
    assert len(ticks) > 10 and others > 10  # both ran, taking turns


@pytest.mark.anyio
async def test_a_post_wakes_the_waiting_reader_at_once():
    """With no wake time at all (wake_at inf), an event posted from a callback is handed to the
    machine right away, not at the next timer; the reader leaves nothing behind when it ends."""
    session = LeaderSession(config(), MemoryBus(), "d-1")
    session.machine.wake_at = lambda: math.inf
    handled: list[tuple[list, float]] = []
    session.machine.handle_all = lambda events, now: handled.append((events, time.monotonic())) or []
    async with anyio.create_task_group() as tg:
        tg.start_soon(session._read, tg)
        await anyio.sleep(0.05)
        assert handled == [] and session._waiter is not None  # asleep, no Tick
        posted = time.monotonic()
        session.post(ev.Tick())
        with anyio.fail_after(1.0):
            while not handled:
                await anyio.sleep(0)
        tg.cancel_scope.cancel()
    assert len(handled) == 1 and handled[0][1] - posted < 0.05
    assert session._waiter is None


# -- the lease at step-down ---------------------------------------------------------------------

@pytest.mark.anyio
@pytest.mark.parametrize(("answer", "owns_after"), [(None, False), ("later", True), ("raise", True)])
async def test_step_down_renews_the_lease_or_learns_it_is_lost(answer, owns_after):
    calls: list[int] = []

    async def renew() -> float | None:
        calls.append(1)
        if answer == "raise":
            raise ConnectionError("away")
        return None if answer is None else time.monotonic() + 100.0

    until = time.monotonic() + 5.0
    session = LeaderSession(config(), MemoryBus(), "d-1", lease_until=until, renew=renew)
    await session._renew()
    assert calls == [1]
    assert session.machine.owns(time.monotonic()) is owns_after
    if answer == "later":
        assert session.machine.lease_until > until + 50
    elif answer == "raise":
        assert session.machine.lease_until == until


@pytest.mark.anyio
async def test_no_renewal_once_the_lease_is_not_ours():
    calls: list[int] = []

    async def renew() -> float | None:
        calls.append(1)
        return time.monotonic() + 100

    session = LeaderSession(config(), MemoryBus(), "d-1", lease_until=time.monotonic() - 1, renew=renew)
    await session._renew()
    assert calls == []


async def _append(into: list[bytes], data: bytes) -> None:
    into.append(data)


class SmallAssignBus(MemoryBus):
    """The server's limit turned out lower than it told: assignments over 200 bytes refused."""

    async def publish(self, subject, payload, reply="", headers=None):
        if subject.startswith(SUBJECTS.assign("")) and len(payload) > 200:
            raise PayloadTooLarge(f"{len(payload)} bytes")
        await super().publish(subject, payload, reply, headers)


@pytest.mark.anyio
async def test_an_assignment_the_server_refuses_as_too_large_ends_that_job():
    from test_leader_session_memory import Running, job_message, until

    bus = SmallAssignBus()
    async with Running(bus) as run:
        await bus.deliver(MemoryMessage(SUBJECTS.heartbeat, Heartbeat(worker="w1", slots=1).model_dump_json().encode()))
        await bus.deliver(job_message(run.session, 1))
        await until(lambda: bus.ended)
        assert [e.job_id for e in bus.ended] == ["j1"]
        assert not bus.sent_to(SUBJECTS.assign("w1"))


@pytest.mark.anyio
async def test_a_running_session_answers_status_and_keeps_an_earlier_leaders_disabled_key_with_its_age():
    from test_leader_session_memory import Running, until

    saved = {"by": "operator", "reason": "rotating", "disabled_for_s": 30.0, "saved_at": time.time() - 40.0}
    bus = MemoryBus(keys={"k1": saved})
    async with Running(bus):
        answers: list[bytes] = []
        await bus.subscribe("r", lambda msg: _append(answers, msg.data))
        await bus.deliver(MemoryMessage(SUBJECTS.leader_status, b"", "r"))
        await until(lambda: answers)
        key = json.loads(answers[0])["keys"]["k1"]
        assert key["disabled"] and key["disabled_reason"] == "rotating"
        assert 69.0 <= key["disabled_for_s"] <= 75.0  # 30 s before, plus the 40 s since it was saved


class DrainingBus(MemoryBus):
    """A pull inbox whose drain still hands over one queued delivery (as nats-py's does)."""

    late: MemoryMessage | None = None

    async def subscribe(self, subject, handler):
        sub = await super().subscribe(subject, handler)
        bus = self

        class Draining:
            async def unsubscribe(self):
                await sub.unsubscribe()

            async def drain(self):
                if bus.late is not None and subject == bus.late.subject:
                    late, bus.late = bus.late, None
                    await handler(late)
                await sub.unsubscribe()

        return Draining()


@pytest.mark.anyio
async def test_a_delivery_the_drain_hands_over_at_step_down_is_handed_back():
    from test_leader_session_memory import Running, job_message

    bus = DrainingBus()
    async with Running(bus) as run:
        bus.late = job_message(run.session, 5)
    assert [(seq, ack) for seq, ack, _ in bus.handed_back] == [(5, "ack.5.1")]


@pytest.mark.anyio
async def test_jobs_waiting_for_tokens_go_out_as_the_bucket_refills_not_a_second_apart():
    from test_leader_session_memory import job_message, until

    bus = MemoryBus()
    conf = config(pools={"p": {"keys": [{"id": "k1", "rps": 20, "burst": 1, "secret": "env:UNUSED"}]}},
                  workers={"heartbeat_s": 0.1})
    session = LeaderSession(conf, bus, "d-mem", conservative=False)
    assigned: list[float] = []

    async def on_assign(msg):
        assigned.extend(time.monotonic() for _ in read_assignments(msg.data))

    async with anyio.create_task_group() as tg:
        tg.start_soon(session.run)
        await until(lambda: session.inboxes["normal"].inbox and session.machine.ready)
        await bus.subscribe(SUBJECTS.assign("w1"), on_assign)
        await bus.deliver(MemoryMessage(SUBJECTS.heartbeat, Heartbeat(worker="w1", slots=10).model_dump_json().encode()))
        for seq in range(1, 7):
            await bus.deliver(job_message(session, seq))
        await until(lambda: len(assigned) == 6, timeout=10)
        tg.cancel_scope.cancel()
    # 6 jobs at 20 rps with a bucket of 1: about 0.25 s; a reader that sleeps a second when
    # nothing arrives would take 5 s
    assert assigned[-1] - assigned[0] < 3.0


@pytest.mark.anyio
async def test_a_delivery_arriving_while_the_leader_lingers_at_step_down_is_handed_back():
    from test_leader_session_memory import job_message, until

    bus = MemoryBus()
    session = LeaderSession(config(workers={"heartbeat_s": 0.1}), bus, "d-mem", conservative=False)
    scope = anyio.CancelScope()

    async def lead():
        with scope:
            await session.run()

    async with anyio.create_task_group() as tg:
        tg.start_soon(lead)
        await until(lambda: session.inboxes["normal"].inbox and session.machine.ready)
        scope.cancel()
        await until(lambda: session.machine.stepping_down)
        await bus.deliver(job_message(session, 8))
        await until(lambda: any(seq == 8 for seq, _, _ in bus.handed_back))


class AwayBus(MemoryBus):
    """NATS gone at step-down: draining, unsubscribing and flushing all fail."""

    async def subscribe(self, subject, handler):
        sub = await super().subscribe(subject, handler)

        class Gone:
            async def unsubscribe(self):
                await sub.unsubscribe()
                raise ConnectionError("away")

            async def drain(self):
                raise ConnectionError("away")

        return Gone()

    async def flush(self, timeout):
        raise ConnectionError("away")


@pytest.mark.anyio
async def test_step_down_ends_cleanly_when_nats_is_away():
    from test_leader_session_memory import Running

    bus = AwayBus()
    async with Running(bus) as run:
        pass
    assert run.session.subs == [] and not bus.subs.get(SUBJECTS.heartbeat)  # every subscription tried
    run.session.post(ev.Tick())  # the session's stream is closed: dropped


@pytest.mark.anyio
async def test_a_renewal_that_hangs_at_step_down_is_given_up_within_about_a_second():
    async def renew() -> float | None:
        await anyio.sleep(60)
        return None

    until = time.monotonic() + 30.0
    session = LeaderSession(config(), MemoryBus(), "d-1", lease_until=until, renew=renew)
    with anyio.fail_after(10):
        await session._renew()
    assert session.machine.lease_until == until  # unknown: the lease is kept as it was


@pytest.mark.anyio
async def test_commands_after_an_assignment_are_still_carried_out_and_assignments_go_last():
    bus = MemoryBus()
    session = LeaderSession(config(), bus, "d-1")
    order: list[str] = []
    await bus.subscribe(SUBJECTS.assign("w1"), lambda msg: _append(order, b"assign"))
    await bus.subscribe(SUBJECTS.leader_announce, lambda msg: _append(order, b"announce"))
    assign = cmd.Assign("w1", "a1", b'{"id":"a1"}', incoming("j1"))
    async with anyio.create_task_group() as tg:
        await session._carry_out([assign, cmd.InProgress("a2"), cmd.Announce(b"x")], tg)
    assert bus.kept_alive == ["a2"] and order == [b"announce", b"assign"]


class SlowKeepAliveBus(MemoryBus):
    """A keep-alive that waits for `go`: a bus call still under way when the session stops."""

    def __init__(self) -> None:
        super().__init__()
        self.waiting, self.go = anyio.Event(), anyio.Event()

    async def in_progress(self, ack: str) -> None:
        self.waiting.set()
        await self.go.wait()
        await super().in_progress(ack)


@pytest.mark.anyio
async def test_a_stop_in_the_middle_of_a_pass_still_sends_its_assignments():
    # the machine counts a pass's assignments as sent once it returns them: a stop that cut
    # the pass short left those jobs with no worker and no hand-back until ack_wait (30 s)
    bus = SlowKeepAliveBus()
    session = LeaderSession(config(), bus, "d-1")
    sent: list[bytes] = []
    await bus.subscribe(SUBJECTS.assign("w1"), lambda msg: _append(sent, msg.data))
    assign = cmd.Assign("w1", "a1", b'{"id":"a1"}', incoming("j1"))
    scope = anyio.CancelScope()

    async def one_pass() -> None:
        with scope:
            async with anyio.create_task_group() as tg:
                await session._carry_out([cmd.InProgress("a0"), assign], tg)

    async with anyio.create_task_group() as tg:
        tg.start_soon(one_pass)
        with anyio.fail_after(5):
            await bus.waiting.wait()
        scope.cancel()  # the dispatcher stops (SIGTERM) while the keep-alive is under way
        await anyio.sleep(0.05)
        bus.go.set()
    assert bus.kept_alive == ["a0"] and sent == [b'{"id":"a1"}']


class SlowEndsBus(MemoryBus):
    """Hand-backs and ends that take a round trip (`pause` seconds each; inf: never done)."""

    def __init__(self, pause: float) -> None:
        super().__init__()
        self.pause = pause

    async def hand_back(self, seq: int, ack: str, delay_s: float) -> None:
        await anyio.sleep(self.pause)
        await super().hand_back(seq, ack, delay_s)

    async def end_job(self, incoming, code, message, status) -> None:
        await anyio.sleep(self.pause)
        await super().end_job(incoming, code, message, status)


async def pass_then_stop(session: LeaderSession, commands: list, after_s: float) -> None:
    """Carry out one pass of `commands` in a session task group, then stop it `after_s` seconds
    later as the dispatcher's stop does (cancel, then `_stopping` as the group is left)."""
    with anyio.CancelScope() as scope:
        async with anyio.create_task_group() as tg:
            try:
                await session._carry_out(commands, tg)
                await anyio.sleep(after_s)
                scope.cancel()
                await anyio.sleep(1)
            finally:
                session._stopping()


@pytest.mark.anyio
async def test_a_stop_lets_the_hand_backs_and_ends_of_its_last_pass_finish():
    # the machine counts them as done once asked: cut by the stop, a handed-back job waited out
    # ack_wait, and an end of a last delivery (max_deliver) would never come back at all
    bus = SlowEndsBus(pause=0.05)
    session = LeaderSession(config(), bus, "d-1")
    with anyio.fail_after(5):  # the stop comes while both are under way
        await pass_then_stop(session, [cmd.HandBack(5, "ack.5", 0.0),
                                       cmd.EndJob(incoming("j6"), ErrorCode.INVALID_JOB, "bad", "invalid")], 0.0)
    assert bus.handed_back == [(5, "ack.5", 0.0)] and [i.job_id for i in bus.ended] == ["j6"]


@pytest.mark.anyio
async def test_an_end_that_never_finishes_is_given_up_stop_grace_after_the_stop(monkeypatch):
    from ratefleet.dispatcher.shell import leader as shell_leader

    monkeypatch.setattr(shell_leader, "STOP_GRACE_S", 0.3)
    bus = SlowEndsBus(pause=math.inf)  # NATS never answers
    session = LeaderSession(config(), bus, "d-1")
    started = time.monotonic()
    with anyio.fail_after(5):  # long under way before the stop
        await pass_then_stop(session, [cmd.EndJob(incoming("j7"), ErrorCode.INVALID_JOB, "bad", "invalid")], 0.2)
    assert 0.25 < time.monotonic() - started - 0.2 < 2.0 and bus.ended == [] and session._finishing == set()
