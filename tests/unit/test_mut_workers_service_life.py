"""A worker's life around its jobs (workers/service.py): its identity and settings
(`__init__`), heartbeats (what they say, that reports go first, a lost beat), the keep-alive
loop's cadence (`_keep_calls_alive`, on a fake clock), readiness, a new fleet config revision
and warnings of pending key versions (the drain and the whole `run`:
test_mut_workers_service_drain.py). Over the
recording fake bus and finisher of test_bite_worker; deterministic, no NATS, no HTTP.
"""

from __future__ import annotations

import os
import re
import socket
import time
from datetime import UTC, datetime, timedelta
from types import SimpleNamespace

import anyio
import pytest
from structlog.testing import capture_logs
from test_bite_worker import FakeNats, assignment, make_worker

import ratefleet.workers.service as service
from ratefleet.schemas.config import parse_config
from ratefleet.schemas.internal import Heartbeat, InFlight
from ratefleet.workers.service import Worker

pytestmark = pytest.mark.anyio


def beats(nc) -> list[Heartbeat]:
    return [Heartbeat.model_validate_json(p) for s, p in nc.published if s == "ratefleet.internal.heartbeat"]


def config(monkeypatch, **sections):
    monkeypatch.setenv("RF_BITE_K1", "sk-bite-0000000000")
    return parse_config({"upstreams": {"u": {"base_url": "https://api.example.test", "auth_header": "X-Api-Token"}},
                         "pools": {"p": {"keys": [{"id": "k1", "secret": "env:RF_BITE_K1", "rps": 10}]}},
                         **sections})


# -- identity and settings ---------------------------------------------------------------------


def test_a_worker_takes_its_slots_id_and_fencing_time_from_the_config(monkeypatch):
    cfg = config(monkeypatch, workers={"slots": 12, "id_prefix": "gpu", "heartbeat_s": 1.5},
                 dispatcher={"lease_ttl_s": 4.0})
    worker = Worker(cfg, FakeNats())
    assert worker.slots == 12 and re.fullmatch(r"gpu-[0-9a-f]{6}", worker.id), worker.id
    assert worker.epoch_forget_s == 2 * 4.0 + 2 * 1.5
    assert (worker.epoch, worker.draining, worker.calls, worker.leader_heard_at) == ((0, 0), False, 0, None)
    assert worker.finisher.mask_headers == frozenset({"x-api-token"})
    assert Worker(cfg, FakeNats(), slots=3, worker_id="w9").slots == 3
    assert Worker(cfg, FakeNats(), slots=3, worker_id="w9").id == "w9"
    assert Worker(cfg, FakeNats()).id != worker.id


class OneStream(FakeNats):
    """A connection whose JetStream context is always the same object."""

    def __init__(self):
        super().__init__()
        self.js = object()

    def jetstream(self):
        return self.js


def test_a_worker_keeps_its_results_handbacks_and_cache_on_its_own_connection(monkeypatch):
    nc = OneStream()
    before = time.time()
    worker = Worker(config(monkeypatch, nats={"prefix": "acme"}), nc)
    assert (worker.finisher.nc, worker.finisher.js, worker.finisher.subjects) == (nc, nc.js, worker.subjects)
    assert (worker.handbacks.js, worker.handbacks.bucket) == (nc.js, "ratefleet_handbacks_acme")
    assert (worker.cache.js, worker.cache.bucket) == (nc.js, worker.subjects.cache_bucket)
    assert worker.subjects.heartbeat == "acme.internal.heartbeat"
    assert before <= worker.started_at <= time.time()


def test_a_worker_counts_every_result_it_stores_by_tier_status_and_variant(monkeypatch):
    from ratefleet.runtime.metrics import new_registry
    from ratefleet.schemas import Result

    registry = new_registry()
    worker = Worker(config(monkeypatch), FakeNats(), registry=registry, http="http://127.0.0.1:9", config_revision=4)
    worker.finisher.on_stored(Result(job_id="j", status="failed", tier="vip", variant="split"))
    assert registry.get_sample_value("ratefleet_jobs_total", {"tier": "vip", "status": "failed"}) == 1
    assert registry.get_sample_value("ratefleet_split_jobs_total",
                                     {"tier": "vip", "variant": "split", "status": "failed"}) == 1
    worker.in_flight["a"] = InFlight(assignment="a", key_id="k1", job_id="j")
    assert registry.get_sample_value("ratefleet_worker_slots", {"state": "busy"}) == 1
    assert registry.get_sample_value("ratefleet_worker_slots", {"state": "free"}) == 63
    assert (worker.http, worker.config_revision) == ("http://127.0.0.1:9", 4)


# -- heartbeats ----------------------------------------------------------------------------------


async def test_a_heartbeat_says_who_the_worker_is_and_what_it_runs(monkeypatch):
    worker, nc, finisher = make_worker(monkeypatch)
    worker.http, worker.config_revision, worker.calls, worker.draining = "http://127.0.0.1:9465", 7, 3, True
    worker.unusable = {"k2": "RF_K2 not set"}
    worker.in_flight["a1"] = InFlight(assignment="a1", key_id="k1", job_id="j1")
    await worker._send_heartbeat()
    [beat] = beats(nc)
    assert beat.model_dump() == {
        "worker": "w-bite", "slots": 64, "in_flight": [{"assignment": "a1", "key_id": "k1", "job_id": "j1"}],
        "draining": True, "pid": os.getpid(), "host": socket.gethostname(), "started_at": worker.started_at,
        "calls": 3, "unusable_keys": {"k2": "RF_K2 not set"}, "config_revision": 7, "http": "http://127.0.0.1:9465"}


async def test_the_reports_waiting_go_out_before_the_heartbeat(monkeypatch):
    worker, nc, finisher = make_worker(monkeypatch)
    worker.reports._round_open = True  # a report waits for its round
    await worker._report(assignment(), None, terminal=True)
    await worker._send_heartbeat()
    assert [s.rsplit(".", 1)[-1] for s, _ in nc.published] == ["outcome", "heartbeat"]


async def test_a_heartbeat_that_cannot_be_sent_is_not_raised(monkeypatch):
    worker, nc, finisher = make_worker(monkeypatch)

    async def publish(subject, payload=b""):
        raise ConnectionError("away")

    nc.publish = publish
    with capture_logs() as logs:
        await worker._send_heartbeat()
    assert [(e["event"], e["error"]) for e in logs] == [("heartbeat not sent", "ConnectionError")]


class Stop(Exception):
    pass


def fake_sleeps(monkeypatch, count: int) -> list[float]:
    """service.anyio.sleep records its durations and stops the loop at the `count`th."""
    slept: list[float] = []

    async def sleep(seconds):
        slept.append(seconds)
        if len(slept) >= count:
            raise Stop

    monkeypatch.setattr(service, "anyio", SimpleNamespace(sleep=sleep))
    return slept


async def test_heartbeats_recheck_the_secrets_every_beat(monkeypatch):
    worker, nc, finisher = make_worker(monkeypatch)
    worker.config = worker.config.model_copy(update={"workers": worker.config.workers.model_copy(
        update={"heartbeat_s": 2.5})})
    worker.unusable = {"k1": "stale"}
    slept = fake_sleeps(monkeypatch, 2)
    with pytest.raises(Stop):
        await worker._heartbeats()
    assert slept == [2.5, 2.5] and [b.unusable_keys for b in beats(nc)] == [{}, {}]


# -- in-progress acks, on a fake clock ------------------------------------------------------------


@pytest.mark.parametrize("ack_wait_s, interval, tick", [(30, 10.0, 1.0), (6, 2.0, 1.0), (1, 0.5, 0.25),
                                                        (3, 1.0, 0.5)])
async def test_slow_calls_get_an_in_progress_ack_every_third_of_ack_wait(monkeypatch, ack_wait_s, interval, tick):
    worker, nc, finisher = make_worker(monkeypatch, ack_wait_s=ack_wait_s)
    clock = [1000.0]
    monkeypatch.setattr(service, "time", SimpleNamespace(monotonic=lambda: clock[0], time=time.time))
    worker.calling = {"due": ["ack-due", 1000.0 - interval], "fresh": ["ack-fresh", 1000.0 - interval + 0.01]}
    slept = fake_sleeps(monkeypatch, 2)
    with pytest.raises(Stop):
        await worker._keep_calls_alive()
    assert slept == [tick, tick]
    assert [entry[:2] for entry in finisher.log] == [("wpi", "ack-due")]
    assert worker.calling == {"due": ["ack-due", 1000.0], "fresh": ["ack-fresh", 1000.0 - interval + 0.01]}


# -- readiness -------------------------------------------------------------------------------------


async def test_readiness(monkeypatch):
    worker, nc, finisher = make_worker(monkeypatch)
    clock = [500.0]
    monkeypatch.setattr(service, "time", SimpleNamespace(monotonic=lambda: clock[0], time=time.time))
    assert await worker.not_ready() == "no leader heard yet"
    worker.leader_heard_at = 500.0 - worker.epoch_forget_s
    assert await worker.not_ready() is None  # silent exactly that long: still ready
    clock[0] += 0.25
    assert await worker.not_ready() == f"no leader heard for {worker.epoch_forget_s + 0.25:.1f} s"
    worker.draining = True
    assert await worker.not_ready() == "draining (stopping)"


async def test_a_worker_that_can_call_with_no_key_is_not_ready(monkeypatch):
    """A worker started without any key's secret gets no job from the leader: /readyz says so
    (before: 200 ready while the fleet's status said it could call with nothing)."""
    worker, nc, finisher = make_worker(monkeypatch)
    clock = [500.0]
    monkeypatch.setattr(service, "time", SimpleNamespace(monotonic=lambda: clock[0], time=time.time))
    worker.leader_heard_at = 500.0
    assert await worker.not_ready() is None
    worker.unusable = {key_id: "RF_X not set" for key_id in worker.config.keys()}
    reason = await worker.not_ready()
    assert reason is not None and reason.startswith("no key usable on this worker") and "RF_X not set" in reason
    first = next(iter(worker.config.keys()))
    worker.unusable = {first: "RF_X not set"} if len(worker.config.keys()) > 1 else {}
    assert await worker.not_ready() is None


# -- a new fleet config revision --------------------------------------------------------------------


async def test_a_config_revision_is_applied_told_to_the_leader_and_its_problems_warned(monkeypatch):
    worker, nc, finisher = make_worker(monkeypatch)
    monkeypatch.delenv("RF_REV_K2", raising=False)
    monkeypatch.delenv("RF_REV_K3", raising=False)
    soon = (datetime.now(UTC) + timedelta(days=1)).isoformat()
    stored = parse_config({"upstreams": {"u": {"base_url": "https://api.example.test"},
                                         "w": {"base_url": "https://w.example.test", "auth_header": "X-W-Key"}},
                           "pools": {"p": {"upstream": "u", "keys": [{"id": "k1", "secret": "env:RF_BITE_K1", "rps": 10},
                                                                     {"id": "k2", "secret": "env:RF_REV_K2", "rps": 10}]},
                                     "q": {"upstream": "w", "keys": [
                                         {"id": "k3", "rps": 10, "versions": [
                                             {"id": "v1", "secret": "env:RF_BITE_K1"},
                                             {"id": "v2", "secret": "env:RF_REV_K3", "not_before": soon}]}]}}})
    with capture_logs() as logs:
        await worker._apply_config(12, stored)
    assert set(worker.config.upstreams) == {"u", "w"} and worker.config_revision == 12
    assert worker.secrets.pick("k3")[0] == "v1"
    assert worker.unusable == {"k2": "RF_REV_K2 not set"}
    assert worker.finisher.mask_headers == frozenset({"authorization", "x-w-key"})
    [beat] = beats(nc)
    assert (beat.config_revision, beat.unusable_keys) == (12, {"k2": "RF_REV_K2 not set"})
    def logged(start):
        [entry] = [e for e in logs if e["event"].startswith(start)]
        return entry

    unusable = logged("secret unusable on this worker; the leader sends")
    assert (unusable["log_level"], unusable["key_id"], unusable["problem"], unusable["revision"]) == (
        "warning", "k2", "RF_REV_K2 not set", 12)
    pending = logged("secret of a key version not yet active is unusable on this worker; fix it before")
    assert (pending["log_level"], pending["key_version"], pending["problem"], pending["revision"]) == (
        "warning", "k3 v2", "version v2: RF_REV_K3 not set", 12)
    applied = logged("config revision applied")
    assert (applied["log_level"], applied["worker"], applied["revision"], applied["keys"]) == ("info", "w-bite", 12, 3)


class BeatingNats(FakeNats):
    """A connection on which another process heartbeats as `other` (pid 999999) once subscribed."""

    def __init__(self, other: str, draining: bool = False):
        super().__init__()
        self.other, self.draining = other, draining

    async def subscribe(self, subject, cb=None, **_):
        if subject.endswith(".internal.heartbeat"):
            beat = Heartbeat(worker=self.other, slots=4, pid=999999, host="elsewhere", draining=self.draining)
            await cb(SimpleNamespace(data=beat.model_dump_json().encode()))
        return SimpleNamespace(unsubscribe=lambda: _done())


async def _done():
    return None


async def test_a_worker_given_an_id_already_in_use_refuses_to_start(monkeypatch):
    """Two `ratefleet worker --id wdup` both received every assignment to wdup and both called it:
    404 upstream calls for 200 jobs, one worker in status. The second now refuses to start."""
    cfg = config(monkeypatch, workers={"heartbeat_s": 0.05})
    worker = Worker(cfg, BeatingNats("wdup"), worker_id="wdup")
    other = await worker.id_in_use()
    assert other is not None and other.pid == 999999
    with pytest.raises(Exception, match="worker id 'wdup' is already used by a running worker"):
        await worker.run(anyio.Event())
    assert await Worker(cfg, BeatingNats("w-other"), worker_id="wdup").id_in_use() is None
    assert await Worker(cfg, BeatingNats("wdup", draining=True), worker_id="wdup").id_in_use() is None  # a restart
