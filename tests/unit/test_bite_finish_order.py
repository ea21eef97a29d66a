"""The first invariant, deterministically: a JOBS message is acked only after its Result is
stored, and a Result that could not be stored means no ack (the job is delivered again).

Over a recording fake NATS connection and JetStream context: every step (store started,
store returned, reply, ack) is written to one shared log, so the order is asserted, not
hoped for. The SIGKILL end-to-end tests stay as the second line of defence.
"""

from __future__ import annotations

import asyncio
import functools
from types import SimpleNamespace

import pytest
from nats.js.errors import APIError, NotFoundError

import ratefleet.runtime.finish as finish_module
from ratefleet.runtime.finish import Finisher
from ratefleet.runtime.store import STORE_FAILED, store_result
from ratefleet.schemas import ResponseInfo, Result, Subjects
from ratefleet.schemas.errors import ResultNotStored

pytestmark = pytest.mark.anyio
ACK = "$JS.ACK.RATEFLEET_JOBS.d.1.7.7.0.1"
REPLY = "_INBOX.caller.1"


class RecordingJetStream:
    """`publish` logs its start and its return (with a scheduling point between, where a
    wrong-order finisher could slip its ack in); `fail` makes it raise instead."""

    def __init__(self, log: list, fail: Exception | None = None, duplicate: bool = False, stored: bytes | None = None):
        self.log, self.fail, self.duplicate, self.stored = log, fail, duplicate, stored

    async def publish(self, subject, payload, headers=None, timeout=None):
        self.log.append(("store-start", subject))
        await asyncio.sleep(0)
        await asyncio.sleep(0)
        if self.fail is not None:
            self.log.append(("store-failed", subject))
            raise self.fail
        self.log.append(("store-done", subject))
        return SimpleNamespace(duplicate=True if self.duplicate else None)

    async def get_last_msg(self, stream, subject):
        if self.stored is None:
            raise NotFoundError(description="no message found")  # as JetStream answers (404)
        return SimpleNamespace(data=self.stored)


class RecordingNats:
    max_payload = 1 << 20

    def __init__(self, log: list):
        self.log = log

    async def publish(self, subject, payload=b"", **_):
        self.log.append(("ack" if subject == ACK else "reply", subject, payload))


def finisher(fail: Exception | None = None, **js) -> tuple[Finisher, list]:
    log: list = []
    f = Finisher(RecordingNats(log), RecordingJetStream(log, fail, **js), Subjects())
    return f, log


def result(job_id: str = "j1") -> Result:
    return Result(job_id=job_id, status="succeeded", tier="normal", attempts=1,
                  response=ResponseInfo(status=200, json={"answer": 42}))


def steps(log: list) -> list[str]:
    return [entry[0] for entry in log]


async def test_the_ack_is_published_only_after_the_result_store_returned():
    f, log = finisher()
    assert await f.finish(result(), ack=ACK, reply_to=REPLY) is True
    assert steps(log) == ["store-start", "store-done", "reply", "ack"]
    assert log[1][1] == "ratefleet.results._.j1"
    assert log[3] == ("ack", ACK, b"+ACK")


async def test_the_ack_follows_the_store_without_a_reply_subject_too():
    f, log = finisher()
    await f.finish(result(), ack=ACK, reply_to=None)
    assert steps(log) == ["store-start", "store-done", "ack"]


async def test_an_already_stored_result_is_answered_from_the_stream_then_acked():
    earlier = result().model_copy(update={"attempts": 2}).to_json()
    f, log = finisher(duplicate=True, stored=earlier)
    assert await f.finish(result(), ack=ACK, reply_to=REPLY) is False
    assert steps(log) == ["store-start", "store-done", "reply", "ack"]
    assert log[2][2] == earlier, "the caller got a Result other than the stored one"


async def test_a_store_refused_by_the_server_means_no_ack_and_no_reply():
    f, log = finisher(fail=APIError(code=500, err_code=10999, description="stream is sealed"))
    with pytest.raises(APIError):
        await f.finish(result(), ack=ACK, reply_to=REPLY)
    assert "ack" not in steps(log) and "reply" not in steps(log), log


async def test_a_result_the_stream_will_not_hold_means_no_ack(monkeypatch):
    # 10077 with no Result for the job in the stream: the store gives up with
    # ResultNotStored (pauses shortened here), and the job must stay un-acked
    monkeypatch.setattr(finish_module, "store_result", functools.partial(store_result, pause_s=0.0))
    f, log = finisher(fail=APIError(code=503, err_code=STORE_FAILED, description="maximum bytes exceeded"))
    with pytest.raises(ResultNotStored):
        await f.finish(result(), ack=ACK, reply_to=REPLY)
    assert steps(log).count("store-failed") == 4
    assert "ack" not in steps(log) and "reply" not in steps(log), log


async def test_a_cancelled_finisher_still_stores_before_it_acks():
    # finish() is shielded: cancelling the caller mid-store neither loses the ack nor
    # moves it ahead of the store
    f, log = finisher()
    task = asyncio.create_task(f.finish(result(), ack=ACK, reply_to=None))
    await asyncio.sleep(0)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    for _ in range(10):
        await asyncio.sleep(0)
    assert steps(log) == ["store-start", "store-done", "ack"]


# -- what rides the ack's socket write ------------------------------------------------------


class FlushingNats(RecordingNats):
    """As RecordingNats, and models ratefleet/runtime/flusher.py: a publish wakes the flusher one
    loop iteration later, which yields once more and then writes. The ack's write is logged as
    ("write",) at that point; whatever is published before it leaves in the same write."""

    def __init__(self, log: list, ack: str = ACK):
        super().__init__(log)
        self.ack = ack

    async def publish(self, subject, payload=b"", **kw):
        self.log.append(("ack" if subject == self.ack else "reply", subject, payload))
        if subject == self.ack:
            loop = asyncio.get_running_loop()
            loop.call_soon(loop.call_soon, self.log.append, ("write",))


async def test_then_runs_right_after_the_ack_before_the_ack_is_written():
    log: list = []
    f = Finisher(FlushingNats(log), RecordingJetStream(log), Subjects())

    async def then():
        log.append(("then",))

    assert await f.finish(result(), ack=ACK, reply_to=REPLY, then=then) is True
    await asyncio.sleep(0.01)
    assert steps(log) == ["store-start", "store-done", "reply", "ack", "then", "write"]


async def test_then_is_not_run_when_the_result_is_not_stored():
    log: list = []
    f = Finisher(RecordingNats(log), RecordingJetStream(log, fail=ConnectionError("away")), Subjects())
    ran: list = []

    async def then():
        ran.append(1)

    with pytest.raises(ConnectionError):
        await f.finish(result(), ack=ACK, reply_to=REPLY, then=then)
    assert ran == [] and "ack" not in steps(log)


async def test_then_still_runs_when_the_caller_is_cancelled_during_the_store():
    log: list = []
    f = Finisher(RecordingNats(log), RecordingJetStream(log), Subjects())

    async def then():
        log.append(("then",))

    task = asyncio.create_task(f.finish(result(), ack=ACK, reply_to=REPLY, then=then))
    await asyncio.sleep(0)  # the store has started
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    await asyncio.sleep(0.01)
    assert steps(log)[-2:] == ["ack", "then"]


async def test_a_workers_terminal_report_leaves_in_the_acks_write(monkeypatch):
    """Before, the worker reported after `finish` returned: the shield's task hand-off and the
    report outbox's round put the report after the ack's write, in a write of its own (3 NATS
    writes per job instead of 2; strace at 100 requests/s: 3,993 -> 3,016 sendto per 1,000)."""
    from test_bite_worker import ACK as WORKER_ACK
    from test_bite_worker import FakeExecutor, assignment, make_worker

    worker, nc, _ = make_worker(monkeypatch)
    log: list = []
    worker.finisher = Finisher(FlushingNats(log, WORKER_ACK), RecordingJetStream(log), Subjects())
    published = nc.publish

    async def publish(subject, payload=b""):
        await published(subject, payload)
        if subject.endswith("internal.outcome"):
            log.append(("report",))

    nc.publish = publish
    await worker._run_assignment(assignment(), FakeExecutor())
    await asyncio.sleep(0.01)
    assert [r.terminal for r in nc.reports()] == [True]
    order = steps(log)
    assert order.index("ack") < order.index("report") < order.index("write"), order


async def test_an_error_in_then_is_logged_and_the_job_counts_as_stored():
    """`then` runs after the ack: an error there must not read as a failed store (the worker
    would nak an acked job and report it requeued)."""
    from structlog.testing import capture_logs

    log: list = []
    f = Finisher(RecordingNats(log), RecordingJetStream(log), Subjects())

    async def then():
        raise RuntimeError("boom")

    with capture_logs() as logs:
        assert await f.finish(result(), ack=ACK, reply_to=REPLY, then=then) is True
    assert steps(log) == ["store-start", "store-done", "reply", "ack"]
    assert any(line["event"] == "after the ack" and line["error"] == "RuntimeError" for line in logs)
