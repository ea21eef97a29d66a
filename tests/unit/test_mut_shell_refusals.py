"""Ending the jobs the dispatcher will not run (dispatcher/shell/refusals.py): each gets its
one Result with the right status, code, attempts, batch and metadata, acked on its own
message; a dead letter when worth a look (never for an expired job, nor when the Result was
not stored), and a dead letter that fails never un-ends the job. A recording Finisher."""

from __future__ import annotations

import json
import time
from datetime import timedelta
from types import SimpleNamespace

import pytest
from structlog.testing import capture_logs

from ratefleet.dispatcher.core.delivery import Incoming, Refused
from ratefleet.dispatcher.shell import refusals
from ratefleet.dispatcher.shell.refusals import finish_refused, refuse_incoming
from ratefleet.schemas import ErrorCode, Job

pytestmark = pytest.mark.anyio
TP = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"


class Finisher:
    def __init__(self, stored: bool = True, dead_fails: bool = False) -> None:
        self.stored, self.dead_fails = stored, dead_fails
        self.finished: list[tuple] = []
        self.letters: list[tuple] = []

    async def finish(self, result, *, ack, reply_to):
        self.finished.append((result, ack, reply_to))
        return self.stored

    async def dead(self, tier, result, *, job=None, raw=None):
        if self.dead_fails:
            raise ConnectionError("away")
        self.letters.append((tier, result.job_id, job, raw))


def a_job() -> Job:
    return Job.model_validate({"id": "j1", "batch": "b1", "metadata": {"m": 1}, "request": {"path": "/x"}})


def incoming() -> Incoming:
    return Incoming(job=a_job(), job_id="j1", tier="vip", upstream="u", ack="ack.1", reply_to="inbox.1", attempt=2,
                    max_attempts=3, submitted_at=time.time() - 2.0, stream_seq=4, traceparent=TP)


async def test_a_job_refused_by_the_leader_gets_its_result_its_ack_and_a_replayable_dead_letter():
    finisher = Finisher()
    job = incoming()
    await refuse_incoming(finisher, job, ErrorCode.NO_KEY_AVAILABLE, "no pool serves 'u'", status="invalid")
    [(result, ack, reply_to)] = finisher.finished
    assert (ack, reply_to) == ("ack.1", "inbox.1")
    # (its 2nd delivery, ended without a call: the one before may have reached one)
    assert (result.job_id, result.status, result.tier, result.batch, result.attempts) == ("j1", "invalid", "vip", "b1", 1)
    assert (result.error.code, result.error.message) == (ErrorCode.NO_KEY_AVAILABLE, "no pool serves 'u'")
    assert result.metadata == {"m": 1} and result.trace_id == TP.split("-")[1]
    assert result.timings.submitted_at.timestamp() == pytest.approx(job.submitted_at, abs=1e-6)
    assert 1500 < result.timings.total_ms < 60_000
    [(tier, job_id, job, raw)] = finisher.letters
    assert (tier, job_id, raw) == ("vip", "j1", None) and job["id"] == "j1" and job["batch"] == "b1"


async def test_refuse_incoming_defaults_to_failed_and_letters_nothing_when_not_stored():
    finisher = Finisher(stored=False)
    await refuse_incoming(finisher, incoming(), ErrorCode.NO_KEY_AVAILABLE, "x")
    assert finisher.finished[0][0].status == "failed" and finisher.letters == []


def refused(status: str, job: Job | None) -> Refused:
    return Refused(status, ErrorCode.INVALID_JOB, "bad", "j1", "b1", "vip", "ack.1", "inbox.1", 3, b"raw bytes", job)


async def test_a_job_ended_at_intake_gets_its_result_and_a_dead_letter_with_the_job_or_raw_bytes():
    finisher = Finisher()
    await finish_refused(finisher, refused("failed", a_job()))
    await finish_refused(finisher, refused("invalid", None))
    (with_job, ack, reply_to), (without, _, _) = finisher.finished
    assert (ack, reply_to) == ("ack.1", "inbox.1")
    assert (with_job.job_id, with_job.status, with_job.tier, with_job.batch, with_job.attempts) == (
        "j1", "failed", "vip", "b1", 2)  # (its 3rd delivery ended at intake, without a call)
    assert (with_job.error.code, with_job.error.message) == (ErrorCode.INVALID_JOB, "bad")
    assert with_job.metadata == {"m": 1} and without.metadata == {} and without.status == "invalid"
    (tier, _, job, raw), (_, _, no_job, raw_bytes) = finisher.letters
    assert tier == "vip" and job["id"] == "j1" and raw is None
    assert no_job is None and raw_bytes == b"raw bytes"


async def test_an_expired_job_or_one_not_stored_gets_no_dead_letter():
    finisher = Finisher()
    await finish_refused(finisher, refused("expired", a_job()))
    assert finisher.finished[0][0].status == "expired" and finisher.letters == []
    not_stored = Finisher(stored=False)
    await finish_refused(not_stored, refused("failed", a_job()))
    assert not_stored.letters == []


async def test_a_dead_letter_that_fails_does_not_raise():
    finisher = Finisher(dead_fails=True)
    await finish_refused(finisher, refused("failed", a_job()))
    await refuse_incoming(finisher, incoming(), ErrorCode.NO_KEY_AVAILABLE, "x")
    assert len(finisher.finished) == 2


# -- what an operator and a replay read: the log lines, the times, the dead letter's job ------


def full_job() -> Job:
    """A job with an aliased field (`request.json`) and a datetime (`deadline`)."""
    return Job.model_validate({"id": "j1", "batch": "b1", "request": {"path": "/x", "json": {"q": 1}},
                               "deadline": "2099-01-01T00:00:00+00:00"})


async def test_a_refusal_is_logged_with_the_job_its_tier_code_and_reason():
    with capture_logs() as logs:
        await refuse_incoming(Finisher(), incoming(), ErrorCode.NO_KEY_AVAILABLE, "no pool serves 'u'")
        await finish_refused(Finisher(), refused("invalid", None))
    assert [line for line in logs if line["log_level"] == "warning"] == [
        {"event": "job refused", "log_level": "warning", "job_id": "j1", "tier": "vip",
         "code": ErrorCode.NO_KEY_AVAILABLE, "reason": "no pool serves 'u'"},
        {"event": "job ended at intake", "log_level": "warning", "job_id": "j1", "tier": "vip", "status": "invalid",
         "code": str(ErrorCode.INVALID_JOB), "reason": "bad"}]


async def test_a_dead_letter_that_fails_is_logged_with_the_job_and_the_error():
    with capture_logs() as logs:
        await finish_refused(Finisher(dead_fails=True), refused("failed", a_job()))
    [line] = [line for line in logs if line["log_level"] == "error"]
    assert line == {"event": "dead letter not stored; the job's Result is", "log_level": "error", "job_id": "j1",
                    "error": "ConnectionError"}


async def test_a_refused_jobs_times_are_utc_and_in_milliseconds(monkeypatch):
    monkeypatch.setattr(refusals, "time", SimpleNamespace(time=lambda: 1_700_000_100.0))  # the refusal's clock
    finisher = Finisher()
    job = Incoming(**{**incoming().__dict__, "submitted_at": 1_700_000_000.0})
    await refuse_incoming(finisher, job, ErrorCode.NO_KEY_AVAILABLE, "x")
    timings = finisher.finished[0][0].timings
    assert timings.submitted_at.utcoffset() == timedelta(0)
    assert timings.submitted_at.timestamp() == 1_700_000_000.0
    assert timings.total_ms == pytest.approx(100_000.0)  # 100 s in ms (not 1.001 x)


async def test_the_dead_letter_keeps_the_job_as_the_producer_wrote_it():
    finisher = Finisher()
    job = incoming()
    await refuse_incoming(finisher, Incoming(**{**job.__dict__, "job": full_job()}), ErrorCode.NO_KEY_AVAILABLE, "x")
    await finish_refused(finisher, refused("failed", full_job()))
    assert len(finisher.letters) == 2
    for _, _, letter_job, _ in finisher.letters:
        assert json.loads(json.dumps(letter_job)) == letter_job  # JSON as it is (no datetime objects)
        assert (letter_job["id"], letter_job["batch"], letter_job["deadline"]) == ("j1", "b1", "2099-01-01T00:00:00Z")
        assert letter_job["request"]["json"] == {"q": 1} and "json_body" not in letter_job["request"]
        assert Job.model_validate(letter_job) == full_job()  # replayable as it is
