"""What a leader does with deliveries around its step-down, over a real nats-server: hand
them back (nak with a delay, after its open pull requests expired, so they do not come
straight back), drop them when the lease may have lapsed (the new leader owns them), and
never leave the last delivery the server will make (`max_deliver`) unended: that one is
finished through intake, or the job would be stuck for good.

The leader is a real LeaderSession (dispatcher/shell/leader.py) on a real NatsLeaderBus;
no workers run, so every job it takes in stays held."""

from __future__ import annotations

import json
import time

import anyio
import nats
import pytest

from ratefleet.dispatcher.shell.bus import NatsLeaderBus
from ratefleet.dispatcher.shell.leader import LeaderSession
from ratefleet.dispatcher.shell.puller import HANDBACK_MARGIN_S, PULL_EXPIRES_S
from ratefleet.runtime.handbacks import Handbacks
from ratefleet.runtime.store import read_result
from ratefleet.runtime.streams import ensure_topology
from ratefleet.schemas import Config, Subjects

pytestmark = [pytest.mark.timeout(40), pytest.mark.anyio]


def _config(max_deliver: int, ack_wait_s: float, max_rate_limited: int) -> Config:
    return Config.model_validate({
        "upstreams": {"mock": {"base_url": "http://127.0.0.1:9"}},
        "pools": {"shared": {"keys": [{"id": "k1", "rps": 1, "secret": "env:UNUSED"}]}},
        "tiers": {"normal": {"weight": 1, "pools": ["shared"], "max_rate_limited": max_rate_limited}},
        "streams": {"max_deliver": max_deliver, "ack_wait_s": ack_wait_s},
        "workers": {"heartbeat_s": 0.2},
    })


async def _setup(url: str, max_deliver: int, ack_wait_s: float, max_rate_limited: int = 50):
    nc = await nats.connect(url)
    config = _config(max_deliver, ack_wait_s, max_rate_limited)
    js = nc.jetstream()
    await ensure_topology(js, config)
    return nc, js, config


async def _submit(js, job_id: str) -> None:
    await js.publish(Subjects().jobs("normal"), json.dumps({"request": {"method": "GET", "path": "/x"}}).encode(),
                     headers={"Nats-Msg-Id": job_id})


class Leader:
    """A LeaderSession run in the test's task group; `held()`: the job ids it holds."""

    def __init__(self, nc, config: Config, name: str) -> None:
        self.session = LeaderSession(config, NatsLeaderBus(config, nc), name, conservative=False)
        self.scope = anyio.CancelScope()
        self.done = anyio.Event()

    async def run(self) -> None:
        with self.scope:
            await self.session.run()
        self.done.set()

    def held(self) -> dict[str, int]:
        return {h.incoming.job_id: h.incoming.attempt for h in self.session.machine.held.values()}

    async def holds(self, job_id: str, timeout: float = 10) -> int:
        """Wait until the job is held; its attempt number."""
        with anyio.fail_after(timeout):
            while job_id not in self.held():
                await anyio.sleep(0.02)
        return self.held()[job_id]

    def ack_of(self, job_id: str) -> str:
        return next(h.incoming.ack for h in self.session.machine.held.values() if h.incoming.job_id == job_id)

    async def step_down(self) -> None:
        self.scope.cancel()
        await self.done.wait()


async def test_held_and_late_jobs_are_handed_back_after_the_pull_requests_expired(nats_server):
    nc, js, config = await _setup(nats_server.url, max_deliver=5, ack_wait_s=20)
    try:
        async with anyio.create_task_group() as tg:
            first = Leader(nc, config, "d-first")
            tg.start_soon(first.run)
            await _submit(js, "j1")
            assert await first.holds("j1") == 1
            assert first.session.machine.pulls.open()  # the leader keeps a pull request open
            first.scope.cancel()  # step down: j1 goes back at once, delayed past the open pull requests
            await anyio.sleep(0.1)
            await _submit(js, "j2")  # arrives on a still-open pull request while stepping down
            await first.done.wait()
            handed_back_at = time.monotonic()
            assert first.held() == {}, "the stepping-down leader kept a job"
            assert (await Handbacks(js, Subjects().handbacks_bucket).counts(1)).handbacks == 1
            nxt = Leader(nc, config, "d-next")
            tg.start_soon(nxt.run)
            # both come back far before ack_wait (20 s), and neither counts as an attempt
            assert await nxt.holds("j1", PULL_EXPIRES_S + HANDBACK_MARGIN_S + 5) == 1
            assert await nxt.holds("j2", 5) == 1
            waited = time.monotonic() - handed_back_at
            assert waited < PULL_EXPIRES_S + HANDBACK_MARGIN_S + 5, f"came back only after {waited:.1f}s"
            await nxt.step_down()
    finally:
        await nc.close()


async def test_a_fenced_leader_drops_deliveries_instead_of_nak(nats_server):
    """Once the lease may have lapsed, a nak could re-deliver a job the new leader already runs."""
    nc, js, config = await _setup(nats_server.url, max_deliver=5, ack_wait_s=4)
    try:
        async with anyio.create_task_group() as tg:
            first = Leader(nc, config, "d-first")
            tg.start_soon(first.run)
            await _submit(js, "j1")
            await first.holds("j1")
            first.session.lease_lost()  # the lease may have lapsed
            await first.session.inboxes["normal"].pull(4, 2.0)  # a pull request still open
            await nc.publish(first.ack_of("j1"), b"-NAK")  # the server redelivers into it at once
            nakked_at = time.monotonic()
            await anyio.sleep(0.5)
            await first.step_down()  # fenced: hands nothing back
            nxt = Leader(nc, config, "d-next")
            tg.start_soon(nxt.run)
            await nxt.holds("j1", 20)
            # the second delivery came right after the nak; dropped, not nak'd, it is sent again
            # only when ack_wait (4 s) ran out (a hand-back would bring it back after 1.25 s)
            waited = time.monotonic() - nakked_at
            assert waited > 3.0, f"redelivered {waited:.1f}s after the second delivery: the fenced leader nak'd it"
            await nxt.step_down()
    finally:
        await nc.close()


async def test_the_last_delivery_is_ended_even_by_a_fenced_leader(nats_server):
    """streams.max_deliver 2 and one 429 allowed: the third delivery is the last one the
    server makes. A fenced leader still ends it (a poison message, with its Result); a nak
    or a drop here would leave the job in the stream forever, without a result."""
    nc, js, config = await _setup(nats_server.url, max_deliver=2, ack_wait_s=20, max_rate_limited=1)
    try:
        async with anyio.create_task_group() as tg:
            first = Leader(nc, config, "d-first")
            tg.start_soon(first.run)
            await _submit(js, "j1")
            await first.holds("j1")
            acks: list[str] = []

            async def spy(msg) -> None:  # sees the deliveries on the leader's pull inbox too
                if msg.data:
                    acks.append(msg.reply)

            await nc.subscribe(first.session.inboxes["normal"].inbox, cb=spy)
            await nc.publish(first.ack_of("j1"), b"-NAK")  # delivery 2: a duplicate of the held job
            with anyio.fail_after(5):
                while not acks:
                    await anyio.sleep(0.02)
            first.session.lease_lost()
            await first.session.inboxes["normal"].pull(4, 2.0)
            await nc.publish(acks[-1], b"-NAK")  # delivery 3, the last, reaches the fenced leader
            stored = None
            with anyio.fail_after(10):
                while stored is None:
                    await anyio.sleep(0.1)
                    stored = await read_result(js, Subjects(), "j1")
            result = json.loads(stored)
            assert (result["status"], result["error"]["code"]) == ("failed", "poison_message")
            assert len(acks) == 2
            await first.step_down()
    finally:
        await nc.close()
