"""Worker rules that were tested only end to end, now over a recording fake bus and fake
executors (no NATS, no HTTP): the in-progress keep-alive of slow calls, epoch fencing of
assignments from a former leader, the worker-side deadline check, attempt counting
(retry below max_attempts, give up at it), `retry_delay`, and hand-back accounting.
"""

from __future__ import annotations

import asyncio
import time
from datetime import UTC, datetime, timedelta
from types import SimpleNamespace

import anyio
import pytest
from nats.js.errors import NotFoundError

from ratefleet.runtime.handbacks import Handbacks
from ratefleet.schemas import ResponseInfo
from ratefleet.schemas.config import parse_config
from ratefleet.schemas.internal import Assignment, LeaderAnnounce, OutcomeReport
from ratefleet.workers.executor import CallResult
from ratefleet.workers.service import Worker, retry_delay

pytestmark = pytest.mark.anyio
ACK = "$JS.ACK.RATEFLEET_JOBS.d.1.3.3.0.1"


class NoResults:
    """A JetStream context holding no Result: a later attempt's stored-Result lookup finds none."""

    async def get_last_msg(self, stream, subject):
        raise NotFoundError(description="no message found")


class FakeNats:
    def __init__(self):
        self.published: list[tuple[str, bytes]] = []

    def jetstream(self):
        return NoResults()

    async def publish(self, subject: str, payload: bytes = b"") -> None:
        self.published.append((subject, payload))

    def reports(self) -> list[OutcomeReport]:
        return [OutcomeReport.model_validate_json(p) for s, p in self.published if s.endswith("internal.outcome")]


class RecordingFinisher:
    """Every finisher call, in order, with the monotonic time it was made."""

    def __init__(self, nak_s: float = 0.0):
        self.log: list[tuple] = []
        self.finished, self.dead_letters = [], []
        self.nak_s = nak_s  # how long a nak takes (a slow NATS connection)

    async def finish(self, result, *, ack, reply_to, then=None, before_answer=None):
        self.log.append(("finish", ack, time.monotonic()))
        self.finished.append(result)
        if then is not None:  # right after the ack, as the Finisher does
            await then()
        return True

    async def dead(self, tier, result, *, job=None, raw=None, last_error=None):
        self.dead_letters.append(result)

    async def nak(self, ack, delay_s=0.0):
        self.log.append(("nak", ack, delay_s))
        await anyio.sleep(self.nak_s)

    async def in_progress(self, ack):
        self.log.append(("wpi", ack, time.monotonic()))

    def kinds(self) -> list[str]:
        return [entry[0] for entry in self.log]


class FakeExecutor:
    """`call` waits `seconds`, counts itself and answers `status`."""

    def __init__(self, status: int = 200, seconds: float = 0.0, retry_after_s: float | None = None):
        self.status, self.seconds, self.retry_after_s = status, seconds, retry_after_s
        self.calls = 0

    async def call(self, job, upstream, secret) -> CallResult:
        self.calls += 1
        await anyio.sleep(self.seconds)
        kind = "ok" if self.status < 400 else "rate_limited" if self.status == 429 else "upstream_error"
        return CallResult(kind=kind, response=ResponseInfo(status=self.status, json={"n": self.calls}), error=None,
                          retry_after_s=self.retry_after_s, ratelimit=None, actual_cost=None,
                          latency_ms=self.seconds * 1000)


def make_worker(monkeypatch, **streams) -> tuple[Worker, FakeNats, RecordingFinisher]:
    monkeypatch.setenv("RF_BITE_K1", "sk-bite-0000000000")
    config = parse_config({"upstreams": {"u": {"base_url": "https://api.example.test"}},
                           "pools": {"p": {"keys": [{"id": "k1", "secret": "env:RF_BITE_K1", "rps": 10}]}},
                           "streams": streams})
    nc = FakeNats()
    worker = Worker(config, nc, worker_id="w-bite")
    worker.finisher = finisher = RecordingFinisher()
    return worker, nc, finisher


def assignment(attempt: int = 1, max_attempts: int = 5, epoch=(0, 0), job_id: str = "j1", **job) -> Assignment:
    body = {"id": job_id, "request": {"method": "POST", "path": "/v1/x", "json": {}}, **job}
    return Assignment(id=f"a-{job_id}-{attempt}", job=body, job_id=job_id, tier="normal", upstream="u", key_id="k1",
                      pool="p", ack=ACK, attempt=attempt, max_attempts=max_attempts, submitted_at=time.time(),
                      queued_ms=0.0, epoch=epoch, seq=7)


# -- in-progress acks ----------------------------------------------------------------------


async def test_a_call_longer_than_ack_wait_is_kept_alive_and_the_keep_alive_stops_with_it(monkeypatch):
    # ack_wait 3 s: in-progress every 1 s on a 0.5 s tick, so a loaded machine's lag (the
    # suite runs in four processes on two cores) leaves 1.5 s before a gap reaches ack_wait
    worker, nc, finisher = make_worker(monkeypatch, ack_wait_s=3)
    executor = FakeExecutor(seconds=3.2)
    async with anyio.create_task_group() as tg:
        tg.start_soon(worker._keep_calls_alive)
        started = time.monotonic()
        await worker._run_assignment(assignment(), executor)
        ended = time.monotonic()
        await anyio.sleep(1.2)  # two more ticks of the keep-alive loop: nothing may follow the finish
        tg.cancel_scope.cancel()
    wpi = [t for kind, ack, t in finisher.log if kind == "wpi"]
    assert all(ack == ACK for kind, ack, _ in finisher.log)
    assert len(wpi) >= 2, f"only {len(wpi)} in-progress acks during a 3.2 s call with ack_wait 3 s"
    gaps = [b - a for a, b in zip([started, *wpi], wpi)]
    assert max(gaps) < 3.0, f"a gap of {max(gaps):.2f}s between keep-alives reaches ack_wait (3 s)"
    assert all(started < t <= ended for t in wpi), "an in-progress ack after the job finished"
    assert finisher.kinds()[-1] == "finish" and worker.calling == {}
    assert executor.calls == 1


async def test_no_keep_alive_after_a_retryable_job_is_sent_back(monkeypatch):
    worker, nc, finisher = make_worker(monkeypatch, ack_wait_s=1)
    worker.finisher = finisher = RecordingFinisher(nak_s=1.0)
    async with anyio.create_task_group() as tg:
        tg.start_soon(worker._keep_calls_alive)
        await worker._run_assignment(assignment(), FakeExecutor(status=503, seconds=0.7))
        await anyio.sleep(1.0)
        tg.cancel_scope.cancel()
    kinds = finisher.kinds()
    assert "nak" in kinds and "wpi" not in kinds[kinds.index("nak"):], kinds  # it would postpone the retry


class BusWithAssignments(FakeNats):
    """subscribe(): the leader-announce subscription stays silent; the assignment
    subscription's callback gets the given assignments, from a task of its own (as nats-py
    runs a subscription's callback)."""

    def __init__(self, *assignments: Assignment):
        super().__init__()
        self.assignments = assignments
        self.deliveries: list[asyncio.Task] = []

    async def subscribe(self, subject, cb=None, **_):
        if ".internal.assign." in subject:
            items = [SimpleNamespace(data=a.model_dump_json().encode()) for a in self.assignments]

            async def deliver():
                for item in items:
                    await cb(item)

            self.deliveries.append(asyncio.get_running_loop().create_task(deliver()))

        async def unsubscribe():
            return None

        return SimpleNamespace(unsubscribe=unsubscribe)


async def test_a_running_worker_keeps_its_slow_call_alive(monkeypatch):
    # the whole Worker.run, over a fake bus and executor: the keep-alive loop is wired in
    import ratefleet.workers.service as service

    monkeypatch.setenv("RF_BITE_K1", "sk-bite-0000000000")
    config = parse_config({"upstreams": {"u": {"base_url": "https://api.example.test"}},
                           "pools": {"p": {"keys": [{"id": "k1", "secret": "env:RF_BITE_K1", "rps": 10}]}},
                           "streams": {"ack_wait_s": 1}, "workers": {"heartbeat_s": 0.2, "grace_s": 5}})
    executor = FakeExecutor(seconds=1.6)
    monkeypatch.setattr(service, "UpstreamExecutor", lambda client, limit, **options: executor)
    worker = Worker(config, BusWithAssignments(assignment()), worker_id="w-bite")
    worker.finisher = finisher = RecordingFinisher()
    stop = anyio.Event()
    with anyio.fail_after(20):
        async with anyio.create_task_group() as tg:
            tg.start_soon(worker.run, stop)
            while not finisher.finished:
                await anyio.sleep(0.05)
            stop.set()
    assert executor.calls == 1
    assert finisher.kinds().count("wpi") >= 2, finisher.kinds()
    assert finisher.kinds()[-1] == "finish"


async def test_finisher_in_progress_is_a_wpi_to_the_ack_subject():
    from ratefleet.runtime.finish import Finisher
    from ratefleet.schemas import Subjects

    nc = FakeNats()
    nc.max_payload = 1 << 20
    await Finisher(nc, SimpleNamespace(), Subjects()).in_progress(ACK)
    assert nc.published == [(ACK, b"+WPI")]


# -- epoch fencing -------------------------------------------------------------------------


class FakeSub:
    def __init__(self, *assignments: Assignment):
        self._items = [SimpleNamespace(data=a.model_dump_json().encode()) for a in assignments]

    @property
    async def messages(self):
        for item in self._items:
            yield item


async def take(worker: Worker, *assignments: Assignment) -> FakeExecutor:
    executor = FakeExecutor()
    async with anyio.create_task_group() as tg:
        async for msg in FakeSub(*assignments).messages:
            await worker._on_assignments(msg, executor, tg)
    return executor


async def test_an_assignment_from_a_former_leader_is_dropped_without_a_call(monkeypatch):
    worker, nc, finisher = make_worker(monkeypatch)
    await worker._on_leader(SimpleNamespace(data=LeaderAnnounce(leader="d2", epoch=(100, 9)).model_dump_json().encode()))
    executor = await take(worker, assignment(epoch=(100, 8), job_id="stale"), assignment(epoch=(99, 50), job_id="old"))
    assert executor.calls == 0 and finisher.log == [] and nc.reports() == [] and worker.in_flight == {}
    executor = await take(worker, assignment(epoch=(100, 9), job_id="current"), assignment(epoch=(101, 1), job_id="new"))
    assert executor.calls == 2 and [r.job_id for r in finisher.finished] == ["current", "new"]
    assert worker.epoch == (101, 1)


async def test_a_silent_higher_epoch_is_forgotten_only_on_an_announce(monkeypatch):
    worker, nc, finisher = make_worker(monkeypatch)
    assert worker._note_epoch((100, 9), announced=False)
    assert not worker._note_epoch((100, 8), announced=True)  # heard recently: still fenced
    worker.epoch_seen_at = time.monotonic() - worker.epoch_forget_s - 1
    assert not worker._note_epoch((50, 1), announced=False), "a late stale assignment unfenced the worker"
    assert worker.epoch == (100, 9)
    assert worker._note_epoch((50, 1), announced=True), "a new leader with a lower epoch is never followed"
    assert worker.epoch == (50, 1)
    assert not worker._note_epoch((49, 9), announced=False)


# -- the worker-side deadline check ----------------------------------------------------------


def deadline(seconds: float) -> str:
    return (datetime.now(UTC) + timedelta(seconds=seconds)).isoformat()


async def test_a_job_past_its_deadline_ends_expired_without_a_call(monkeypatch):
    worker, nc, finisher = make_worker(monkeypatch)
    executor = FakeExecutor()
    await worker._run_assignment(assignment(deadline=deadline(-1)), executor)
    assert executor.calls == 0
    [result] = finisher.finished
    assert (result.status, result.error.code) == ("expired", "deadline_exceeded")
    assert [(r.kind, r.terminal) for r in nc.reports()] == [("none", True)]


async def test_a_job_with_a_future_deadline_is_called_not_expired(monkeypatch):
    worker, nc, finisher = make_worker(monkeypatch)
    executor = FakeExecutor()
    await worker._run_assignment(assignment(deadline=deadline(30)), executor)
    assert executor.calls == 1
    [result] = finisher.finished
    assert result.status == "succeeded" and result.error is None


# -- attempt counting ----------------------------------------------------------------------


async def test_a_retryable_failure_below_max_attempts_goes_back_with_backoff_and_no_result(monkeypatch):
    worker, nc, finisher = make_worker(monkeypatch)
    await worker._run_assignment(assignment(attempt=4, max_attempts=5), FakeExecutor(status=503))
    assert finisher.finished == [] and finisher.log == [("nak", ACK, retry_delay("upstream_error", 4, None))]
    assert [(r.kind, r.terminal) for r in nc.reports()] == [("upstream_error", False)]


async def test_the_last_attempt_ends_failed_attempts_exhausted_with_a_dead_letter(monkeypatch):
    worker, nc, finisher = make_worker(monkeypatch)
    await worker._run_assignment(assignment(attempt=5, max_attempts=5), FakeExecutor(status=503))
    [result] = finisher.finished
    assert (result.status, result.error.code, result.attempts) == ("failed", "attempts_exhausted", 5)
    assert result.response.status == 503 and "gave up after 5 attempts" in result.error.message
    assert [r.job_id for r in finisher.dead_letters] == ["j1"]
    assert "nak" not in finisher.kinds()
    assert [(r.kind, r.terminal) for r in nc.reports()] == [("upstream_error", True)]


async def test_the_result_carries_the_attempt_it_was_made_on(monkeypatch):
    worker, nc, finisher = make_worker(monkeypatch)
    await worker._run_assignment(assignment(attempt=3, max_attempts=5), FakeExecutor(status=200))
    assert [(r.status, r.attempts) for r in finisher.finished] == [("succeeded", 3)]


# -- hand-back accounting --------------------------------------------------------------------


class FakeKV:
    def __init__(self, log: list):
        self.values: dict[str, bytes] = {}
        self.log = log

    async def get(self, key):
        from nats.js.errors import KeyNotFoundError

        if key not in self.values:
            raise KeyNotFoundError
        return SimpleNamespace(value=self.values[key])

    async def put(self, key, value):
        self.log.append(("put", key, value))
        self.values[key] = value


async def test_a_handback_is_recorded_before_the_nak_and_counts_up():
    log: list = []
    kv = FakeKV(log)

    async def key_value(bucket):
        return kv

    class Nak:
        async def nak(self, ack, delay_s=0.0):
            log.append(("nak", ack, delay_s))

    handbacks = Handbacks(SimpleNamespace(key_value=key_value), "ratefleet_handbacks")
    assert await handbacks.count(7) == 0
    await handbacks.hand_back(7, Nak(), ACK)
    await handbacks.hand_back(7, Nak(), ACK, 2.0)
    assert log == [("put", "s7", b"1"), ("nak", ACK, 0.0), ("put", "s7", b"2"), ("nak", ACK, 2.0)]
    assert await handbacks.count(7) == 2 and await handbacks.count(8) == 0


def record_handbacks(worker: Worker) -> list[tuple[int, str]]:
    """Replace the worker's hand-back book by one that records (seq, ack) of each hand-back."""
    handed: list[tuple[int, str]] = []

    class Recorder:
        async def hand_back(self, seq, fin, ack, delay_s=0.0):
            handed.append((seq, ack))

    worker.handbacks = Recorder()
    return handed


async def test_a_draining_worker_hands_an_assignment_back_without_a_call(monkeypatch):
    worker, nc, finisher = make_worker(monkeypatch)
    handed = record_handbacks(worker)
    worker.draining = True
    executor = await take(worker, assignment())
    assert executor.calls == 0 and handed == [(7, ACK)] and finisher.finished == []
    assert [(r.kind, r.terminal) for r in nc.reports()] == [("none", False)]


# -- retry_delay -----------------------------------------------------------------------------


@pytest.mark.parametrize("kind, attempt, retry_after, expected", [
    ("key_error", 2, None, 0.0),  # the key is disabled; the job runs on another at once
    ("denied", 1, None, 0.0),
    ("upstream_error", 1, None, 0.25),
    ("upstream_error", 2, None, 0.5),
    ("upstream_error", 3, None, 1.0),
    ("upstream_error", 7, None, 16.0),
    ("upstream_error", 8, None, 30.0),  # 32 capped at 30
    ("upstream_error", 30, None, 30.0),
    ("upstream_error", 1, 7.5, 7.5),  # Retry-After on a 503 is honoured
    ("upstream_error", 1, 300.0, 300.0),
    ("upstream_error", 1, 3600.0, 300.0),  # capped at 5 minutes
])
def test_retry_delay(kind, attempt, retry_after, expected):
    assert retry_delay(kind, attempt, retry_after) == pytest.approx(expected)


@pytest.mark.parametrize("rate_limited, retry_after, expected", [
    (1, None, 0.25), (2, None, 0.5), (3, None, 1.0), (4, None, 2.0), (5, None, 4.0), (6, None, 5.0),
    (40, None, 5.0),  # capped at 5 s
    (1, 60.0, 0.25),  # a key's Retry-After is the dispatcher's cooldown, not the job's wait
    (0, None, 0.25),
])
def test_retry_delay_of_a_rate_limited_job_doubles_with_its_own_429s(rate_limited, retry_after, expected):
    for attempt in (1, 4):  # by the job's 429s, not its attempts
        assert retry_delay("rate_limited", attempt, retry_after, rate_limited) == pytest.approx(expected)
