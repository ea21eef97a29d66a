"""A worker's drain at shutdown and its whole `run` (workers/service.py `_drain`, `run`): what it
hands back and when, the grace period, unsubscribing, the connection's transport, slots and auth
headers, the leader callback and the config follower. Over the recording fake bus and finisher
of test_bite_worker; deterministic, no NATS, no HTTP.
"""

from __future__ import annotations

import time
from types import SimpleNamespace

import anyio
import nats.errors
import pytest
from structlog.testing import capture_logs
from test_bite_worker import ACK, BusWithAssignments, FakeExecutor, RecordingFinisher, assignment, make_worker
from test_mut_workers_service_life import beats

import ratefleet.workers.service as service
from ratefleet.schemas.config import parse_config
from ratefleet.schemas.internal import InFlight
from ratefleet.workers.service import Worker

pytestmark = pytest.mark.anyio


# -- the drain ----------------------------------------------------------------------------------------


class Sub:
    def __init__(self):
        self.unsubscribed = 0

    async def unsubscribe(self):
        self.unsubscribed += 1


def drained(monkeypatch, grace_s: float, heartbeat_s: float = 1.0):
    worker, nc, finisher = make_worker(monkeypatch)
    worker.config = worker.config.model_copy(update={"workers": worker.config.workers.model_copy(
        update={"grace_s": grace_s, "heartbeat_s": heartbeat_s})})
    return worker, nc, finisher


async def test_a_drain_tells_the_leader_listens_a_moment_and_unsubscribes(monkeypatch):
    worker, nc, finisher = drained(monkeypatch, grace_s=5.0, heartbeat_s=0.3)
    sub = Sub()
    started = time.monotonic()
    with capture_logs() as logs:
        await worker._drain(sub)
    waited = time.monotonic() - started
    assert 0.55 <= waited < 4.0, f"listened {waited:.2f}s, not 2 heartbeats"  # assignments sent meanwhile
    assert worker.draining and sub.unsubscribed == 1
    [beat] = beats(nc)
    assert beat.draining is True
    [line] = logs
    assert (line["event"], line["worker"], line["in_flight"], line["grace_s"]) == ("worker draining", "w-bite", 0, 5.0)


async def test_a_drain_listens_no_longer_than_its_grace(monkeypatch):
    worker, nc, finisher = drained(monkeypatch, grace_s=0.2, heartbeat_s=5.0)
    started = time.monotonic()
    await worker._drain(Sub())
    assert time.monotonic() - started < 3.0


async def test_a_drain_waits_for_running_calls_then_cuts_them_short(monkeypatch):
    worker, nc, finisher = drained(monkeypatch, grace_s=0.3, heartbeat_s=0.05)
    a = assignment()
    with anyio.fail_after(15):
        async with anyio.create_task_group() as tg:
            worker.in_flight[a.id] = InFlight(assignment=a.id, key_id="k1", job_id="j1")
            tg.start_soon(worker._run_assignment, a, FakeExecutor(seconds=30))
            await worker._drain(Sub())
    assert finisher.log == [("nak", ACK, 0.0)] and worker.in_flight == {}
    assert [(r.kind, r.terminal) for r in nc.reports()] == [("none", False)]


async def test_a_drain_lets_a_call_within_its_grace_finish(monkeypatch):
    worker, nc, finisher = drained(monkeypatch, grace_s=10.0, heartbeat_s=0.05)
    a = assignment()
    with anyio.fail_after(15):
        async with anyio.create_task_group() as tg:
            worker.in_flight[a.id] = InFlight(assignment=a.id, key_id="k1", job_id="j1")
            tg.start_soon(worker._run_assignment, a, FakeExecutor(seconds=0.5))
            await worker._drain(Sub())
    assert [r.status for r in finisher.finished] == ["succeeded"] and "nak" not in finisher.kinds()


async def test_a_drain_names_the_jobs_whose_result_was_not_stored(monkeypatch):
    worker, nc, finisher = drained(monkeypatch, grace_s=0.0, heartbeat_s=0.05)
    monkeypatch.setattr(service, "FINISH_BOUND_S", 0.1)
    worker.in_flight["a9"] = InFlight(assignment="a9", key_id="k1", job_id="j9")  # storing, stuck
    with capture_logs() as logs:
        await worker._drain(Sub())
    [line] = [e for e in logs if e["log_level"] == "error"]
    assert line["event"].startswith("shutdown before this job's Result was stored")
    assert (line["worker"], line["job_id"]) == ("w-bite", "j9")


async def test_a_drain_that_cannot_unsubscribe_still_drains(monkeypatch):
    worker, nc, finisher = drained(monkeypatch, grace_s=0.0, heartbeat_s=0.05)

    class Gone:
        async def unsubscribe(self):
            raise ConnectionError("away")

    await worker._drain(Gone())
    assert worker.draining


# -- the whole run ------------------------------------------------------------------------------------


class Bus(BusWithAssignments):
    """Also records the subscriptions and unsubscriptions; unsubscribing twice raises, as in
    nats-py (the drain unsubscribes, then `run`'s cleanup tries again)."""

    def __init__(self, *assignments):
        super().__init__(*assignments)
        self.subscribed, self.gone, self.callbacks = [], [], {}

    async def subscribe(self, subject, cb=None, **kwargs):
        self.subscribed.append((subject, kwargs))
        self.callbacks[subject] = cb
        sub = await super().subscribe(subject, cb=cb, **kwargs)

        async def unsubscribe():
            if subject in self.gone:
                raise nats.errors.BadSubscriptionError
            self.gone.append(subject)

        return SimpleNamespace(unsubscribe=unsubscribe, inner=sub)


async def test_a_run_listens_to_its_subjects_and_ends_with_a_last_heartbeat(monkeypatch):
    monkeypatch.delenv("RF_RUN_K2", raising=False)
    monkeypatch.setenv("RF_BITE_K1", "sk-bite-0000000000")
    cfg = parse_config({"upstreams": {"u": {"base_url": "https://api.example.test"}},
                        "pools": {"p": {"keys": [{"id": "k1", "secret": "env:RF_BITE_K1", "rps": 10},
                                                 {"id": "k2", "secret": "env:RF_RUN_K2", "rps": 10}]}},
                        "workers": {"heartbeat_s": 0.1, "grace_s": 5, "transport": "httpcore"}})
    executor = FakeExecutor()
    clients = []

    def executor_for(client, limit, **options):
        clients.append((client, limit, options))
        return executor

    monkeypatch.setattr(service, "UpstreamExecutor", executor_for)
    built, followers = [], []
    real_build_client = service.build_client

    def build_client(transport, slots, secret_headers, *, keepalive_s):
        built.append((transport, slots, list(secret_headers), keepalive_s))
        return real_build_client(transport, slots, secret_headers, keepalive_s=keepalive_s)

    class Follower:
        def __init__(self, js, subjects, apply, **kwargs):
            followers.append((js, subjects, apply, kwargs))

        async def run(self):
            await anyio.sleep_forever()

    monkeypatch.setattr(service, "build_client", build_client)
    monkeypatch.setattr(service, "ConfigFollower", Follower)
    bus = Bus(assignment())
    worker = Worker(cfg, bus, worker_id="w-run", slots=5, config_revision=3)
    worker.finisher = finisher = RecordingFinisher()
    stop = anyio.Event()
    with capture_logs() as logs, anyio.fail_after(20):
        async with anyio.create_task_group() as tg:
            tg.start_soon(worker.run, stop)
            while not finisher.finished:
                await anyio.sleep(0.02)
            stop.set()
    assert executor.calls == 1 and worker.unusable == {"k2": "RF_RUN_K2 not set"}
    # an explicit --id first listens to the heartbeats for another process using it (then stops)
    assert [s for s, _ in bus.subscribed] == ["ratefleet.internal.heartbeat", "ratefleet.internal.leader",
                                              "ratefleet.internal.assign.w-run"]
    assert bus.subscribed[2][1] == {"pending_msgs_limit": 0}, "assignments would be dropped past the default"
    assert set(bus.gone) == {"ratefleet.internal.heartbeat", "ratefleet.internal.assign.w-run",
                             "ratefleet.internal.leader"}
    [(client, limit, options)] = clients
    assert options == {"validated": True}  # its jobs come from Assignment.job_model: bodies written by pydantic-core
    assert limit == cfg.workers.max_response_bytes and client.is_closed
    last = beats(bus)[-1]
    assert last.draining and last.in_flight == []
    warned = [e for e in logs if e["event"].startswith("secret unusable on this worker")]
    assert [(e["key_id"], e["problem"]) for e in warned] == [("k2", "RF_RUN_K2 not set")]
    [started] = [e for e in logs if e["event"] == "worker started"]
    assert (started["worker"], started["slots"], started["transport"]) == ("w-run", 5, "httpcore")
    assert built == [("httpcore", 5, ["Authorization"], 4.0)]  # workers.keepalive_s reaches the client
    assert bus.callbacks["ratefleet.internal.leader"] == worker._on_leader, "the worker would never hear a leader"
    [(js, subjects, apply, kwargs)] = followers
    assert (subjects, apply, kwargs) == (worker.subjects, worker._apply_config, {"role": "worker", "revision": 3})
    assert js is not None
