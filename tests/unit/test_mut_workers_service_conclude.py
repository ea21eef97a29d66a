"""How a worker ends or returns a job after its call (workers/service.py `_conclude`, `_store`,
`_end_invalid`): which answers end the job and which go back (and with which delay, through
which book), the order of report and nak for a refused key, the cache write of a 2xx, which
ended jobs get a dead letter, and a Result NATS refuses. Over the recording fake bus and
finisher of test_bite_worker; deterministic, no NATS, no HTTP.
"""

from __future__ import annotations

import anyio
import pytest
from nats.js.errors import APIError
from structlog.testing import capture_logs
from test_bite_worker import ACK, RecordingFinisher, assignment, make_worker
from test_mut_workers_service_result import call

from ratefleet.runtime.cache import cache_key
from ratefleet.schemas import ErrorCode
from ratefleet.schemas.errors import ResultNotStored
from ratefleet.workers.service import retry_delay

pytestmark = pytest.mark.anyio


class Books:
    """The worker's hand-back book and cache, recording what they were asked."""

    def __init__(self, worker):
        self.log: list[tuple] = []
        worker.handbacks = self
        worker.cache = self

    async def rate_limited(self, seq, finisher, ack, delay_s):
        self.log.append(("rate_limited", seq, ack, delay_s))
        await finisher.nak(ack, delay_s)

    async def hand_back(self, seq, finisher, ack, delay_s=0.0):
        self.log.append(("hand_back", seq, ack, delay_s))
        await finisher.nak(ack, delay_s)

    async def store(self, key, result, ttl_s):
        self.log.append(("cache", key, result.status, ttl_s))
        return True


async def conclude(monkeypatch, the_call, **fields):
    worker, nc, finisher = make_worker(monkeypatch)
    books = Books(worker)
    a = assignment(**fields.pop("job", {})).model_copy(update=fields)
    worker.calling[a.id] = [ACK, 0.0]
    await worker._conclude(a, the_call, 4.0, a.job_model())
    return worker, nc, finisher, books, a


# -- back to the queue or the end --------------------------------------------------------------


@pytest.mark.parametrize("rate_limited, terminal", [(2, False), (7, False), (8, False), (9, True)])
async def test_a_429_goes_back_through_the_429_book_until_its_budget_is_spent(monkeypatch, rate_limited, terminal):
    worker, nc, finisher, books, a = await conclude(monkeypatch, call("rate_limited", 429, retry_after_s=30.0),
                                                    attempt=5, max_attempts=5, rate_limited=rate_limited,
                                                    max_rate_limited=10)
    if terminal:
        [result] = finisher.finished
        assert (result.status, result.error.code) == ("failed", "rate_limited")
        assert [r.job_id for r in finisher.dead_letters] == ["j1"] and books.log == []
    else:  # the 5th attempt of 5: a 429 is not an attempt
        delay = retry_delay("rate_limited", 5, 30.0, rate_limited + 1)
        assert delay == {2: 1.0, 7: 5.0, 8: 5.0}[rate_limited]  # its 3rd 429 waits 1 s; the 8th and 9th, 5 s
        assert finisher.finished == [] and books.log == [("rate_limited", 7, ACK, delay)]
        assert finisher.log == [("nak", ACK, delay)] and a.id not in worker.calling
    assert [(r.kind, r.terminal) for r in nc.reports()] == [("rate_limited", terminal)]


@pytest.mark.parametrize("attempt, terminal", [(3, False), (4, False), (5, True)])
async def test_a_5xx_goes_back_with_its_backoff_until_the_last_attempt(monkeypatch, attempt, terminal):
    with capture_logs() as logs:
        worker, nc, finisher, books, a = await conclude(monkeypatch, call("upstream_error", 503, retry_after_s=2.0),
                                                        attempt=attempt, max_attempts=5)
    retrying = [(e["event"], e["log_level"], e["kind"], e["delay_s"]) for e in logs if e["log_level"] == "info"]
    assert retrying == ([] if terminal else [("retrying job", "info", "upstream_error", 2.0)])
    assert [(r.kind, r.terminal) for r in nc.reports()] == [("upstream_error", terminal)]
    if terminal:
        assert [r.error.code for r in finisher.finished] == ["attempts_exhausted"] and "nak" not in finisher.kinds()
    else:
        assert finisher.log == [("nak", ACK, 2.0)] and books.log == [] and a.id not in worker.calling


@pytest.mark.parametrize("kind", ["denied", "key_error"])
async def test_a_refused_key_is_reported_before_the_job_goes_back_at_once(monkeypatch, kind):
    worker, nc, finisher = make_worker(monkeypatch)
    Books(worker)
    order = []

    async def publish(subject, payload=b""):
        order.append("report")
        nc.published.append((subject, payload))

    async def nak(ack, delay_s=0.0):
        order.append(("nak", ack, delay_s))

    nc.publish, finisher.nak = publish, nak
    worker.reports._round_open = True  # another job's report opened this loop iteration's round
    a = assignment().model_copy(update={"denial_final": False})
    await worker._conclude(a, call(kind, 401, retry_after_s=9.0), 0.0, a.job_model())
    assert order == ["report", ("nak", ACK, 0.0)], "the job may come back to the key that refused it"
    assert [(r.kind, r.terminal) for r in nc.reports()] == [(kind, False)]


async def test_a_call_that_got_no_answer_goes_back_with_its_backoff(monkeypatch):
    worker, nc, finisher, books, a = await conclude(monkeypatch, call("upstream_error", None, error="ReadTimeout"),
                                                    attempt=2, max_attempts=5)
    assert finisher.log == [("nak", ACK, 0.5)] and finisher.finished == []
    assert [(r.kind, r.status, r.terminal) for r in nc.reports()] == [("upstream_error", None, False)]


async def test_a_call_that_settled_the_job_ends_it_even_when_its_kind_is_retried(monkeypatch):
    too_large = call("upstream_error", 200, code=ErrorCode.RESPONSE_TOO_LARGE, error="larger than 10 bytes")
    worker, nc, finisher, books, a = await conclude(monkeypatch, too_large, attempt=1, max_attempts=5)
    assert [(r.status, r.error.code) for r in finisher.finished] == [("failed", "response_too_large")]
    assert "nak" not in finisher.kinds() and [(r.kind, r.terminal) for r in nc.reports()] == [("upstream_error", True)]


async def test_a_final_answer_is_not_retried_on_the_first_attempt(monkeypatch):
    worker, nc, finisher, books, a = await conclude(monkeypatch, call("bad_request", 400), attempt=1, max_attempts=5)
    assert [(r.status, r.error.code) for r in finisher.finished] == [("failed", "upstream_error")]
    assert finisher.dead_letters == [] and "nak" not in finisher.kinds()


# -- the cache ---------------------------------------------------------------------------------


async def test_a_2xx_of_a_job_with_cache_ttl_is_cached_beside_its_result(monkeypatch):
    worker, nc, finisher, books, a = await conclude(monkeypatch, call("ok", 200), job={"cache_ttl_s": 60})
    assert books.log == [("cache", cache_key("u", a.job_model()), "succeeded", 60)]
    assert [r.status for r in finisher.finished] == ["succeeded"]


async def test_a_cache_that_does_not_answer_does_not_hold_the_result_back(monkeypatch):
    """A cache bucket that takes no write (up to cache.IO_TIMEOUT_S each) held every cached job's
    Result back that long (a reviewer's trial: cached chats 2.0-2.1 s instead of 0.1-0.2 s)."""
    worker, nc, finisher = make_worker(monkeypatch)
    books = Books(worker)
    release = anyio.Event()

    async def hanging_store(key, result, ttl_s):
        await release.wait()
        books.log.append(("cache", key, result.status, ttl_s))
        return False

    books.store = hanging_store
    a = assignment(cache_ttl_s=60)
    worker.calling[a.id] = [ACK, 0.0]
    async with anyio.create_task_group() as tg:
        tg.start_soon(worker._conclude, a, call("ok", 200), 4.0, a.job_model())
        with anyio.fail_after(5):
            while not finisher.finished:
                await anyio.sleep(0.01)
        assert [r.status for r in finisher.finished] == ["succeeded"] and books.log == []  # stored, cache pending
        release.set()
    assert [entry[0] for entry in books.log] == ["cache"]


@pytest.mark.parametrize("the_call, job", [
    (call("ok", 200), {}),  # the job did not ask
    (call("bad_request", 400), {"cache_ttl_s": 60}),  # not an answer to keep
    # relayed as it came, not replayed
    (call("ok", 200), {"cache_ttl_s": 60, "request": {"method": "POST", "path": "/v1/x", "json": {"stream": True}}}),
])
async def test_no_cache_write_for_other_answers(monkeypatch, the_call, job):
    worker, nc, finisher, books, a = await conclude(monkeypatch, the_call, job=job)
    assert books.log == [] and len(finisher.finished) == 1


# -- storing and dead letters ------------------------------------------------------------------


@pytest.mark.parametrize("the_call, fields, dead", [
    (call("upstream_error", 503), {"attempt": 5}, True),  # attempts_exhausted
    (call("rate_limited", 429), {"rate_limited": 49}, True),  # rate_limited
    (call("ok", 200), {}, False),
    (call("bad_request", 400), {}, False),  # upstream_error: the job's own answer
    (call("denied", 403), {}, False),  # request_denied: the request's fault, said in the Result
])
async def test_which_ended_jobs_get_a_dead_letter(monkeypatch, the_call, fields, dead):
    worker, nc, finisher, books, a = await conclude(monkeypatch, the_call, max_attempts=5, **fields)
    assert len(finisher.finished) == 1 and len(finisher.dead_letters) == int(dead)


async def test_a_stored_result_is_sent_to_the_waiting_caller(monkeypatch):
    worker, nc, finisher = make_worker(monkeypatch)
    worker.finisher = finisher = RefusingOnce()
    a = assignment().model_copy(update={"reply_to": "_INBOX.caller"})
    assert await worker._store(a, worker._call_result(a, call("ok", 200), 0.0)) is True
    assert finisher.replies == ["_INBOX.caller"] and finisher.log[0][:2] == ("finish", ACK)


async def test_a_dead_letter_goes_to_the_jobs_tier_with_the_job(monkeypatch):
    worker, nc, finisher = make_worker(monkeypatch)
    letters = []

    async def dead(tier, result, *, job=None, raw=None, last_error=None):
        letters.append((tier, result.error.code, job, raw, last_error))

    finisher.dead = dead
    a = assignment(attempt=5, max_attempts=5).model_copy(update={"tier": "vip"})
    assert await worker._store(a, worker._call_result(a, call("upstream_error", 503), 0.0)) is True
    assert letters == [("vip", "attempts_exhausted", a.job_data(), None, None)]


class DuplicateFinisher(RecordingFinisher):
    async def finish(self, result, *, ack, reply_to, then=None, before_answer=None):
        await super().finish(result, ack=ack, reply_to=reply_to, then=then)
        return False  # another delivery stored it first


async def test_a_result_stored_by_another_delivery_gets_no_second_dead_letter(monkeypatch):
    worker, nc, finisher = make_worker(monkeypatch)
    worker.finisher = finisher = DuplicateFinisher()
    a = assignment(attempt=5, max_attempts=5)
    assert await worker._store(a, worker._call_result(a, call("upstream_error", 503), 0.0)) is True
    assert finisher.dead_letters == []


async def test_a_dead_letter_that_fails_is_logged_and_the_job_still_ends(monkeypatch):
    worker, nc, finisher = make_worker(monkeypatch)

    async def dead(tier, result, *, job=None, raw=None, last_error=None):
        raise ConnectionError("away")

    finisher.dead = dead
    a = assignment(attempt=5, max_attempts=5)
    with capture_logs() as logs:
        assert await worker._store(a, worker._call_result(a, call("upstream_error", 503), 0.0)) is True
    [line] = [entry for entry in logs if entry["log_level"] == "error"]
    assert (line["event"], line["error"]) == ("dead letter not stored", "ConnectionError")


class RefusingOnce(RecordingFinisher):
    """The first store is refused with `exc`; the next ones as `then` says."""

    def __init__(self, exc=None, then=None):
        super().__init__()
        self.exc, self.then, self.tries, self.replies = exc, then, 0, []

    async def finish(self, result, *, ack, reply_to, then=None, before_answer=None):
        self.tries += 1
        self.replies.append(reply_to)
        if self.exc is None:
            return await super().finish(result, ack=ack, reply_to=reply_to, then=then)
        if self.tries == 1:
            raise self.exc
        if self.then is not None:
            raise self.then
        return await super().finish(result, ack=ack, reply_to=reply_to, then=then)


@pytest.mark.parametrize("exc", [ResultNotStored("bucket full " + "x" * 300), APIError(code=400, err_code=10077,
                                                                             description="maximum bytes exceeded")])
async def test_a_refused_paid_answer_ends_failed_without_its_body_with_a_dead_letter(monkeypatch, exc):
    worker, nc, finisher = make_worker(monkeypatch)
    worker.finisher = finisher = RefusingOnce(exc)
    a = assignment().model_copy(update={"reply_to": "_INBOX.caller"})
    with capture_logs() as logs:
        assert await worker._store(a, worker._call_result(a, call("ok", 200), 0.0)) is True
    [result] = finisher.finished
    assert (result.status, result.error.code, result.response.status) == ("failed", "result_not_stored", 200)
    assert finisher.replies == ["_INBOX.caller"] * 2, "the waiting caller would not get the answer"
    assert f"({type(exc).__name__}: " in result.error.message
    assert result.response.json_body is None and [r.job_id for r in finisher.dead_letters] == ["j1"]
    assert finisher.log[-1][:2] == ("finish", ACK)
    [line] = [entry for entry in logs if entry["log_level"] == "error"]
    assert line["event"].startswith("NATS refused to store the Result of a paid call")
    assert line["error"] == type(exc).__name__ and line["detail"] == str(exc)[:200]


@pytest.mark.parametrize("exc, then", [
    (ConnectionError("away"), None),  # NATS away: an infrastructure failure, retried
    (ResultNotStored("full"), ConnectionError("away")),  # refused, then nothing can be stored
])
async def test_a_result_that_cannot_be_stored_sends_the_job_back(monkeypatch, exc, then):
    worker, nc, finisher = make_worker(monkeypatch)
    worker.finisher = finisher = RefusingOnce(exc, then)
    a = assignment()
    worker.calling[a.id] = [ACK, 0.0]
    with capture_logs() as logs:
        assert await worker._store(a, worker._call_result(a, call("ok", 200), 0.0)) is False
    [line] = [e for e in logs if e["event"] == "could not store the Result; job goes back to the queue"]
    assert (line["error"], line["detail"]) == ("ConnectionError", "away")
    assert finisher.finished == [] and finisher.log == [("nak", ACK, 1.0)] and a.id not in worker.calling


async def test_a_refused_result_without_an_answer_sends_the_job_back(monkeypatch):
    worker, nc, finisher = make_worker(monkeypatch)
    worker.finisher = finisher = RefusingOnce(ResultNotStored("full"))
    a = assignment()
    result = worker._result(a, "expired")
    assert await worker._store(a, result) is False
    assert finisher.tries == 1 and finisher.log == [("nak", ACK, 1.0)]


async def test_a_result_not_stored_ends_the_report_as_not_terminal(monkeypatch):
    worker, nc, finisher = make_worker(monkeypatch)
    worker.finisher = RefusingOnce(ConnectionError("away"))
    a = assignment()
    await worker._conclude(a, call("ok", 200), 0.0, a.job_model())
    assert [(r.kind, r.terminal) for r in nc.reports()] == [("ok", False)]


# -- a job that cannot be sent -----------------------------------------------------------------


async def test_an_invalid_job_ends_with_a_dead_letter_naming_the_error(monkeypatch):
    worker, nc, finisher = make_worker(monkeypatch)
    dead = []

    async def dead_letter(tier, result, *, job=None, raw=None, last_error=None):
        dead.append((tier, result.status, job, last_error))

    finisher.dead = dead_letter
    replies = []
    finish = finisher.finish

    async def finish_recording(result, *, ack, reply_to):
        replies.append((ack, reply_to))
        return await finish(result, ack=ack, reply_to=reply_to)

    finisher.finish = finish_recording
    a = assignment(extra="x").model_copy(update={"reply_to": "_INBOX.caller"})
    await worker._end_invalid(a, ErrorCode.INVALID_REQUEST, "the body is not JSON")
    assert replies == [(ACK, "_INBOX.caller")]
    [result] = finisher.finished
    assert (result.status, result.error.code, result.error.message) == ("invalid", "invalid_request",
                                                                         "the body is not JSON")
    assert dead == [("normal", "invalid", a.job_data(), {"code": "invalid_request", "message": "the body is not JSON",
                                                         **{k: v for k, v in result.error.model_dump().items()
                                                            if k not in ("code", "message")}})]
    assert [(r.kind, r.terminal) for r in nc.reports()] == [("none", True)]


async def test_an_invalid_job_stored_by_another_delivery_gets_no_dead_letter(monkeypatch):
    worker, nc, finisher = make_worker(monkeypatch)
    worker.finisher = finisher = DuplicateFinisher()
    await worker._end_invalid(assignment(), ErrorCode.INVALID_REQUEST, "bad")
    assert finisher.dead_letters == [] and [(r.kind, r.terminal) for r in nc.reports()] == [("none", True)]


async def test_a_failed_dead_letter_of_an_invalid_job_is_logged_and_reported(monkeypatch):
    worker, nc, finisher = make_worker(monkeypatch)

    async def dead(tier, result, *, job=None, raw=None, last_error=None):
        raise ConnectionError("away")

    finisher.dead = dead
    with capture_logs() as logs:
        await worker._end_invalid(assignment(), ErrorCode.INVALID_REQUEST, "bad")
    [line] = [entry for entry in logs if entry["log_level"] == "error"]
    assert (line["event"], line["error"]) == ("dead letter not stored", "ConnectionError")
    assert [(r.kind, r.terminal) for r in nc.reports()] == [("none", True)]
