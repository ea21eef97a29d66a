"""The rest of ratefleet/runtime/store.py after `publish_job`: how long and how often a
transient NATS failure is retried (`retrying`: 0.1 s doubling to 2 s, until `for_s`), how a
Result is stored once (`store_result`: dedup, a 10077 that is "already stored" only when the
Result is seen, `pause_s * n` between refusals, then ResultNotStored), reading a Result back,
and dead letters (auth headers masked, a letter made to fit the server's max_payload).

Over a fake JetStream context whose publish answers as the server would, and a fake clock
in place of the module's `time.monotonic` and `asyncio.sleep`, so the retry schedule is
asserted exactly. Deterministic, no server.
"""

from __future__ import annotations

import base64
import json
from types import SimpleNamespace

import pytest
from nats.js.errors import APIError, NotFoundError, ServiceUnavailableError
from structlog.testing import capture_logs

from ratefleet.runtime import store
from ratefleet.runtime.store import (
    LETTER_HEADROOM,
    LETTER_JOB_HEAD,
    MSG_ID,
    STORE_ATTEMPTS,
    dead_letter,
    interrupt_ack_waits,
    publish_job,
    read_result,
    redact_job,
    redact_payload,
    retrying,
    store_result,
)
from ratefleet.schemas import Result, Subjects
from ratefleet.schemas.errors import ResultNotStored
from ratefleet.schemas.wire import dumps_safe

pytestmark = pytest.mark.anyio
SUBJECTS = Subjects()


class Clock:
    """Stands in for the store module's `time` and `asyncio`: sleeping moves the clock."""

    def __init__(self):
        self.now, self.sleeps = 1000.0, []

    def monotonic(self):
        return self.now

    async def sleep(self, seconds):
        self.sleeps.append(seconds)
        self.now += seconds


@pytest.fixture
def clock(monkeypatch):
    fake = Clock()
    monkeypatch.setattr(store, "time", SimpleNamespace(monotonic=fake.monotonic, time=lambda: 1.7e9))
    monkeypatch.setattr(store, "asyncio", SimpleNamespace(sleep=fake.sleep))
    return fake


def failing(*answers):
    """An operation answering `answers` in turn (exceptions raised), the last one repeating."""
    calls = []

    async def operation():
        calls.append(len(calls))
        answer = answers[min(len(calls), len(answers)) - 1]
        if isinstance(answer, BaseException):
            raise answer
        return answer

    return operation, calls


# --- retrying ----------------------------------------------------------------------------

async def test_a_transient_failure_is_retried_with_doubling_delays_capped_at_2_s(clock):
    operation, calls = failing(TimeoutError())
    with pytest.raises(TimeoutError):
        await retrying(operation, for_s=10.0)
    assert clock.sleeps == pytest.approx([0.1, 0.2, 0.4, 0.8, 1.6, 2.0, 2.0, 2.0])
    assert len(calls) == 9


async def test_retrying_returns_the_first_success(clock):
    operation, calls = failing(TimeoutError(), ServiceUnavailableError(), "stored")
    assert await retrying(operation, for_s=10.0) == "stored"
    assert clock.sleeps == pytest.approx([0.1, 0.2]) and len(calls) == 3


async def test_a_retry_that_would_end_exactly_at_the_deadline_is_still_made(clock):
    operation, calls = failing(TimeoutError())
    with pytest.raises(TimeoutError):
        await retrying(operation, for_s=0.1)
    assert clock.sleeps == [0.1] and len(calls) == 2


async def test_no_time_left_is_no_retry(clock):
    operation, calls = failing(TimeoutError())
    with pytest.raises(TimeoutError):
        await retrying(operation, for_s=0.05)
    assert clock.sleeps == [] and len(calls) == 1


async def test_a_server_refusal_with_an_error_code_is_not_retried(clock):
    operation, calls = failing(ServiceUnavailableError(err_code=10077), "stored")
    with pytest.raises(ServiceUnavailableError):
        await retrying(operation, for_s=10.0)
    assert clock.sleeps == [] and len(calls) == 1


async def test_a_non_transient_error_is_not_retried(clock):
    operation, calls = failing(ValueError("bug"), "stored")
    with pytest.raises(ValueError):
        await retrying(operation, for_s=10.0)
    assert len(calls) == 1


async def test_a_permanent_failure_ends_the_retries_and_is_asked_about_each_failure(clock):
    seen = []

    async def permanent(exc):
        seen.append(exc)
        return len(seen) == 2

    first, second = TimeoutError("1"), TimeoutError("2")
    operation, calls = failing(first, second, "stored")
    with pytest.raises(TimeoutError) as raised:
        await retrying(operation, for_s=10.0, permanent=permanent)
    assert raised.value is second and seen == [first, second] and clock.sleeps == [0.1]


# --- store_result --------------------------------------------------------------------------

class FakeJetStream:
    """`answers`: what each publish does in turn (an exception, or a bool: duplicate), the
    last one repeating; `held`: the Results stream's messages by subject."""

    def __init__(self, *answers, held=None):
        self.answers, self.held, self.published, self.reads = list(answers), dict(held or {}), [], []

    async def publish(self, subject, payload, headers=None, timeout=None):
        self.published.append((subject, payload, headers, timeout))
        answer = self.answers[min(len(self.published), len(self.answers)) - 1]
        if isinstance(answer, BaseException):
            raise answer
        return SimpleNamespace(duplicate=answer)

    async def get_last_msg(self, stream, subject):
        self.reads.append((stream, subject))
        if subject not in self.held:
            raise NotFoundError
        return SimpleNamespace(data=self.held[subject])


def result(job_id="j1", batch=None) -> Result:
    return Result(job_id=job_id, batch=batch, status="succeeded", tier="normal", attempts=1)


def refused(description="maximum messages per subject exceeded"):
    return APIError(code=503, description=description, err_code=store.STORE_FAILED)


async def test_a_result_is_stored_once_under_its_job_id_on_its_batch_subject(clock):
    js = FakeJetStream(False)
    res = result(batch="b7")
    assert await store_result(js, SUBJECTS, res) is True
    assert js.published == [(SUBJECTS.results("b7", "j1"), res.to_json(), {MSG_ID: "j1"}, 10.0)]
    js = FakeJetStream(False)
    assert await store_result(js, SUBJECTS, res, payload=b"{given}", timeout=2.0) is True
    assert js.published == [(SUBJECTS.results("b7", "j1"), b"{given}", {MSG_ID: "j1"}, 2.0)]


async def test_a_duplicate_result_is_not_newly_stored(clock):
    subject = SUBJECTS.results(None, "j1")
    js = FakeJetStream(True, held={subject: b"{}"})
    assert await store_result(js, SUBJECTS, result()) is False
    assert len(js.published) == 1 and js.reads == [(SUBJECTS.results_stream, subject)]


async def test_a_duplicate_of_another_batchs_result_is_stored_under_its_own_msg_id(clock):
    """The dedup hit came from a Result of the same id in another batch (an id reused; a NATS
    restart forgot the JOBS dedup entry, so the job was called): this batch gets its Result too,
    or its `submit --wait` waits for ever."""
    js = FakeJetStream(True, False)
    with capture_logs() as logs:
        assert await store_result(js, SUBJECTS, result()) is True
    assert [headers[MSG_ID] for _, _, headers, _ in js.published] == ["j1", "j1@"]
    assert [e["event"] for e in logs] == ["job id already has a Result in another batch; stored under this batch too"]


async def test_a_10077_with_the_result_in_the_stream_is_already_stored(clock):
    subject = SUBJECTS.results(None, "j1")
    js = FakeJetStream(refused(), held={subject: b"{}"})
    assert await store_result(js, SUBJECTS, result()) is False
    assert js.reads == [(SUBJECTS.results_stream, subject)]
    assert len(js.published) == 1 and clock.sleeps == []


async def test_a_10077_without_a_result_is_tried_again_after_a_growing_pause(clock):
    js = FakeJetStream(refused(), refused(), False)
    assert await store_result(js, SUBJECTS, result()) is True
    assert clock.sleeps == [0.5, 1.0] and len(js.published) == 3


async def test_a_result_refused_every_time_is_not_stored_and_says_why(clock):
    js = FakeJetStream(refused("maximum bytes exceeded"))
    with pytest.raises(ResultNotStored) as raised:
        await store_result(js, SUBJECTS, result("j9"))
    assert STORE_ATTEMPTS == 4 and len(js.published) == 4
    assert clock.sleeps == [0.5, 1.0, 1.5]  # pause_s * attempt, none after the last
    assert str(raised.value) == (
        f"{SUBJECTS.results_stream} refused the Result of job j9 4 times (maximum bytes exceeded) and "
        "holds none for it; check the stream's limits and the server's disk")


async def test_each_refusal_and_the_last_are_logged_with_the_job_and_why(clock):
    """An operator reading the log sees which job's Result was refused, why, which attempt of
    how many, and, when it is given up, in which stream."""
    js = FakeJetStream(refused("maximum bytes exceeded"))
    with capture_logs() as logs, pytest.raises(ResultNotStored):
        await store_result(js, SUBJECTS, result("j9"), attempts=2, pause_s=1.0)
    retry = "results stream refused a result and holds none for the job; storing again"
    assert logs == [
        {"event": retry, "log_level": "warning", "job_id": "j9", "refusal": "maximum bytes exceeded",
         "attempt": n, "of": 2} for n in (1, 2)
    ] + [{"event": "result NOT stored; the job stays un-acked and is delivered again", "log_level": "error",
          "job_id": "j9", "refusal": "maximum bytes exceeded", "stream": SUBJECTS.results_stream}]


async def test_the_attempts_and_pause_are_the_callers(clock):
    js = FakeJetStream(refused(None))
    with pytest.raises(ResultNotStored) as raised:
        await store_result(js, SUBJECTS, result(), attempts=2, pause_s=3.0)
    assert clock.sleeps == [3.0] and len(js.published) == 2
    assert "2 times (message could not be stored)" in str(raised.value)


async def test_another_refusal_of_a_result_is_raised_at_once(clock):
    other = APIError(code=400, description="bad subject", err_code=10999)
    js = FakeJetStream(other)
    with pytest.raises(APIError) as raised:
        await store_result(js, SUBJECTS, result())
    assert raised.value is other and len(js.published) == 1 and js.reads == []


async def test_nats_away_is_ridden_out_for_two_minutes_then_raised(clock):
    js = FakeJetStream(TimeoutError())
    with pytest.raises(TimeoutError):
        await store_result(js, SUBJECTS, result())
    assert 118.0 < sum(clock.sleeps) <= 120.0


# --- read_result -----------------------------------------------------------------------------

async def test_read_result_finds_a_job_in_any_batch_or_in_the_one_named():
    js = FakeJetStream(False, held={SUBJECTS.results("*", "j1"): b"any", SUBJECTS.results("b", "j1"): b"in b"})
    assert await read_result(js, SUBJECTS, "j1") == b"any"
    assert await read_result(js, SUBJECTS, "j1", "b") == b"in b"
    assert await read_result(js, SUBJECTS, "j2") is None
    assert js.reads[0] == (SUBJECTS.results_stream, SUBJECTS.results("*", "j1"))


class SlowReads(FakeJetStream):
    """Its reads time out `failures` times first (NATS restarting), then answer as the server would."""

    def __init__(self, *answers, failures, held=None):
        super().__init__(*answers, held=held)
        self.failures = failures

    async def get_last_msg(self, stream, subject):
        if self.failures:
            self.failures -= 1
            self.reads.append((stream, subject))
            raise TimeoutError
        return await super().get_last_msg(stream, subject)


async def test_a_read_nats_does_not_answer_is_asked_again_not_taken_for_no_result(clock):
    subject = SUBJECTS.results("*", "j1")
    js = SlowReads(False, failures=3, held={subject: b"stored"})
    assert await read_result(js, SUBJECTS, "j1") == b"stored"
    assert len(js.reads) == 4 and clock.sleeps == pytest.approx([0.1, 0.2, 0.4])


async def test_a_read_that_never_gets_an_answer_raises_after_its_retries(clock):
    js = SlowReads(False, failures=1000)
    with pytest.raises(TimeoutError):
        await read_result(js, SUBJECTS, "j1", retry_for=3.0)
    assert sum(clock.sleeps) <= 3.0 and len(js.reads) > 1
    assert await read_result(FakeJetStream(False), SUBJECTS, "j1") is None  # 404: no Result, at once


async def test_a_dedup_hit_whose_result_cannot_be_read_stores_no_second_result(clock):
    """A duplicate publish whose Result lookup got no answer raised before: it read as "no
    Result in this batch", and the job got a second Result under `j1@<batch>`."""
    js = SlowReads(True, False, failures=1000)
    with pytest.raises(TimeoutError):
        await store_result(js, SUBJECTS, result(batch="b1"))
    assert [headers[MSG_ID] for _, _, headers, _ in js.published] == ["j1"]


# --- redaction ---------------------------------------------------------------------------------

def test_a_raw_payload_that_is_not_json_is_kept_as_text_or_base64():
    assert redact_payload(b"not json") == {"raw": "not json"}
    assert redact_payload(b"\xff\xfe") == {"raw_b64": base64.b64encode(b"\xff\xfe").decode()}
    assert redact_payload(b"[" * 100_000) == {"raw": "[" * 100_000}


def test_a_json_payload_has_its_auth_headers_masked():
    raw = json.dumps({"id": "j", "request": {"headers": {"Authorization: ": "s", "X-Mine": "t", "A": "b"}}})
    assert redact_payload(raw.encode(), frozenset({"x-mine"})) == {
        "payload": {"id": "j", "request": {"headers": {"Authorization: ": "***", "X-Mine": "***", "A": "b"}}}}


def test_redact_job_copies_only_what_it_masks():
    clean = {"id": "j", "request": {"headers": {"Accept": "x"}}}
    assert redact_job(clean) is clean
    for odd in ({"id": "j"}, {"request": "x"}, {"request": {"headers": ["a"]}}, ["x"], "x"):
        assert redact_job(odd) is odd
    dirty = {"id": "j", "request": {"path": "/", "headers": {"X-Api-Key": "s"}}}
    masked = redact_job(dirty)
    assert masked == {"id": "j", "request": {"path": "/", "headers": {"X-Api-Key": "***"}}}
    assert dirty["request"]["headers"] == {"X-Api-Key": "s"}


# --- dead letters --------------------------------------------------------------------------------

class LetterBox:
    def __init__(self):
        self.published = []

    async def publish(self, subject, payload, headers=None, timeout=None):
        self.published.append((subject, payload, timeout))


async def test_a_dead_letter_holds_the_reason_job_attempts_and_last_error(clock):
    box = LetterBox()
    job = {"id": "j1", "request": {"headers": {"Authorization": "s"}}}
    await dead_letter(box, SUBJECTS, "vip", code="c", message="m", job=job, job_id="j1", attempts=3,
                      last_error={"status": 500})
    [(subject, data, timeout)] = box.published
    assert subject == SUBJECTS.dead("vip") and timeout == 10.0
    assert json.loads(data) == {"job_id": "j1", "tier": "vip", "reason": {"code": "c", "message": "m"},
                                "attempts": 3, "last_error": {"status": 500}, "at": 1.7e9,
                                "job": {"id": "j1", "request": {"headers": {"Authorization": "***"}}}}


async def test_a_dead_letter_of_a_raw_payload_and_its_defaults(clock):
    box = LetterBox()
    await dead_letter(box, SUBJECTS, "normal", code="c", message="m", raw=b"\xff")
    assert json.loads(box.published[0][1]) == {
        "job_id": None, "tier": "normal", "reason": {"code": "c", "message": "m"}, "attempts": 0,
        "last_error": None, "at": 1.7e9, "raw_b64": base64.b64encode(b"\xff").decode()}
    await dead_letter(box, SUBJECTS, "normal", code="c", message="m", raw=b"{}", job={"id": "j"})
    assert "payload" not in json.loads(box.published[1][1])


@pytest.mark.parametrize("tier, subject_tier", [
    ("vip", "vip"), ("a_b-c9", "a_b-c9"), ("", "_"), ("a.b", "_"), ("a*", "_"), ("a b", "_"), ("é", "é"),
])
async def test_a_dead_letter_of_an_odd_tier_goes_to_a_safe_subject(clock, tier, subject_tier):
    box = LetterBox()
    await dead_letter(box, SUBJECTS, tier, code="c", message="m")
    assert box.published[0][0] == SUBJECTS.dead(subject_tier)
    assert json.loads(box.published[0][1])["tier"] == tier


MAX = 20_000
LIMIT = MAX - LETTER_HEADROOM


async def publish_letter(**fields) -> dict:
    box = LetterBox()
    await dead_letter(box, SUBJECTS, "normal", code="c", message="m", job_id="j1", max_payload=MAX, **fields)
    data = box.published[0][1]
    assert len(data) <= LIMIT
    return json.loads(data)


@pytest.mark.parametrize("field", ["json", "body", "body_b64"])
async def test_a_letter_too_large_drops_the_last_answers_body_first(clock, field):
    last = {"status": 500, "json": None, "body": None, "body_b64": None, field: "x" * MAX}
    job = {"id": "j1", "request": {"path": "/small"}}
    got = await publish_letter(job=job, last_error=last)
    assert got["job"] == job
    assert got["last_error"] == {"status": 500, "json": None, "body": None, "body_b64": None,
                                 "body_omitted": "left out so that the dead letter fits in one message"}


async def test_a_letter_still_too_large_keeps_the_head_of_the_job(clock):
    job = {"id": "j1", "request": {"json": {"text": "é" * MAX}}}
    last = {"status": 500, "body": "short"}
    got = await publish_letter(job=job, last_error=last)
    text = dumps_safe(job).decode()
    assert "job" not in got and got["last_error"]["body"] is None
    assert got["job_omitted"] == {"field": "job", "bytes": len(text.encode()), "head": text[:LETTER_JOB_HEAD],
                                  "why": "larger than the NATS server takes in one dead letter"}
    assert LETTER_JOB_HEAD == 2048 and LETTER_HEADROOM == 4096


@pytest.mark.parametrize("raw, field", [(json.dumps({"x": "y" * MAX}).encode(), "payload"),
                                        (b"z" * MAX, "raw"), (b"\xff" * MAX, "raw_b64")])
async def test_a_raw_payload_too_large_keeps_its_head(clock, raw, field):
    got = await publish_letter(raw=raw)
    assert field not in got and got["job_omitted"]["field"] == field
    assert got["job_omitted"]["head"] == dumps_safe(redact_payload(raw)[field]).decode()[:LETTER_JOB_HEAD]


async def test_a_letter_too_large_without_a_body_or_job_is_sent_as_it_is(clock):
    box = LetterBox()
    await dead_letter(box, SUBJECTS, "normal", code="c", message="m" * MAX, max_payload=MAX)
    assert json.loads(box.published[0][1])["reason"]["message"] == "m" * MAX


async def test_a_letter_that_fits_exactly_is_not_cut(clock):
    box = LetterBox()
    await dead_letter(box, SUBJECTS, "normal", code="c", message="", raw=b"x")
    size = len(box.published[0][1])
    await dead_letter(box, SUBJECTS, "normal", code="c", message="", raw=b"x", max_payload=size + LETTER_HEADROOM)
    assert json.loads(box.published[1][1])["raw"] == "x"
    await dead_letter(box, SUBJECTS, "normal", code="c", message="", raw=b"x",
                      max_payload=size + LETTER_HEADROOM - 1)
    assert "raw" not in json.loads(box.published[2][1])


async def test_a_letter_fitting_once_the_body_is_dropped_but_not_under_the_limit_cuts_the_job(clock):
    job = {"id": "j1", "request": {"json": {"text": "y" * (LIMIT + 2000)}}}  # over LIMIT, under MAX + headroom
    got = await publish_letter(job=job, last_error={"status": 500, "body": "x" * MAX})
    assert got["job_omitted"]["field"] == "job" and got["last_error"]["body"] is None


async def test_a_last_error_without_a_body_is_kept_as_it_is(clock):
    job = {"id": "j1", "request": {"json": {"text": "y" * MAX}}}
    got = await publish_letter(job=job, last_error={"status": 500})
    assert got["last_error"] == {"status": 500} and got["job_omitted"]["field"] == "job"


async def test_a_letter_that_fits_exactly_once_the_body_is_dropped_keeps_its_job(clock):
    job = {"id": "j1", "request": {"path": "/x"}}
    dropped = {"status": 500, "json": None, "body": None, "body_b64": None,
               "body_omitted": "left out so that the dead letter fits in one message"}
    box = LetterBox()
    await dead_letter(box, SUBJECTS, "normal", code="c", message="m", job=job, last_error=dropped)
    size = len(box.published[0][1])
    await dead_letter(box, SUBJECTS, "normal", code="c", message="m", job=job,
                      last_error={"status": 500, "body": "x" * MAX}, max_payload=size + LETTER_HEADROOM)
    got = json.loads(box.published[1][1])
    assert len(box.published[1][1]) == size and got["job"] == job and got["last_error"] == dropped


async def test_publish_job_passes_the_jobs_own_trace_headers():
    class Js:
        async def publish(self, subject, payload, headers=None, timeout=None):
            self.headers = headers
            return SimpleNamespace(duplicate=False)

    js = Js()
    trace = {"traceparent": "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"}
    assert await publish_job(js, SUBJECTS, "normal", "j1", b"{}", trace=trace) is True
    assert js.headers == {**trace, MSG_ID: "j1"}


# --- a reconnect while a Result's publish waits for its ack ------------------------------------


class Connection:
    """Stands for a nats-py connection (weakly referenced, hashed by identity)."""


class ReconnectingJetStream:
    """The first publish lands but its ack never comes: the connection reconnects 0.1 s later
    (the server it went through stopped). Later publishes are duplicates of it."""

    def __init__(self):
        self._nc = Connection()
        self.published, self.stored = [], None

    async def publish(self, subject, payload, headers=None, timeout=None):
        import asyncio

        self.published.append((subject, headers, timeout))
        if len(self.published) == 1:
            self.stored = payload
            await asyncio.sleep(0.1)
            asyncio.get_running_loop().call_soon(interrupt_ack_waits, self._nc)  # what connect()'s callback does
            await asyncio.sleep(timeout)  # the ack is lost: nats-py waits out the timeout
            raise TimeoutError
        return SimpleNamespace(duplicate=True, seq=1)

    async def get_last_msg(self, stream, subject):
        return SimpleNamespace(data=self.stored)


async def test_a_result_whose_ack_is_lost_in_a_reconnect_is_sent_again_at_once_and_counts_as_stored():
    # a worker storing a vip job's Result as its nats-server stopped (rolling restart) waited
    # the whole publish timeout (10 s) for an ack that could not come: the Result was stored
    # 10.3 s after the call and the caller's Client.request(timeout=10) failed
    import time as real_time

    js = ReconnectingJetStream()
    result = Result(job_id="vip-1", status="succeeded", tier="vip")
    started = real_time.monotonic()
    assert await store_result(js, SUBJECTS, result, timeout=10.0) is True  # its own Result: newly stored
    assert real_time.monotonic() - started < 2.0
    assert [h[MSG_ID] for _, h, _ in js.published] == ["vip-1", "vip-1"]
