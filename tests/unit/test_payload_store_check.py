"""store_result over a fake JetStream: error 10077 is "already stored" only when the job's
Result is really in the stream; otherwise the store is retried, then refused loudly."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
from nats.js.errors import APIError, NotFoundError

from ratefleet.runtime.finish import Finisher
from ratefleet.runtime.store import store_result
from ratefleet.schemas import Result, Subjects
from ratefleet.schemas.errors import ResultNotStored

SUBJECTS = Subjects()
RESULT = Result(job_id="job-1", status="succeeded", batch="b1")


def store_failed(description: str) -> APIError:
    return APIError(code=503, err_code=10077, description=description)


class FakeJetStream:
    """publish answers from a script (an exception or an ack); get_last_msg finds what is 'stored'."""

    def __init__(self, script, stored: dict[str, bytes] | None = None):
        self.script = list(script)
        self.stored = dict(stored or {})
        self.publishes: list[str] = []
        self.lookups: list[str] = []

    async def publish(self, subject, payload, headers=None, timeout=None):
        self.publishes.append(subject)
        step = self.script.pop(0)
        if isinstance(step, Exception):
            raise step
        self.stored[subject] = payload
        return SimpleNamespace(duplicate=step == "duplicate")

    async def get_last_msg(self, stream, subject):
        self.lookups.append(subject)
        if subject not in self.stored:
            raise NotFoundError()
        return SimpleNamespace(data=self.stored[subject])


SUBJECT = SUBJECTS.results("b1", "job-1")


@pytest.mark.anyio
async def test_10077_with_the_result_in_the_stream_is_already_stored():
    js = FakeJetStream([store_failed("maximum messages per subject exceeded")], stored={SUBJECT: b"{}"})
    assert await store_result(js, SUBJECTS, RESULT, pause_s=0) is False
    assert js.publishes == [SUBJECT] and js.lookups == [SUBJECT]


@pytest.mark.anyio
async def test_10077_without_a_result_is_stored_again():
    js = FakeJetStream([store_failed("maximum bytes exceeded"), "ack"])
    assert await store_result(js, SUBJECTS, RESULT, pause_s=0) is True
    assert js.publishes == [SUBJECT, SUBJECT] and SUBJECT in js.stored


@pytest.mark.anyio
async def test_10077_that_persists_without_a_result_raises_after_bounded_attempts():
    js = FakeJetStream([store_failed("maximum messages exceeded")] * 10)
    with pytest.raises(ResultNotStored, match="job-1.*maximum messages exceeded"):
        await store_result(js, SUBJECTS, RESULT, attempts=3, pause_s=0)
    assert len(js.publishes) == 3 and len(js.lookups) == 3


@pytest.mark.anyio
async def test_other_refusals_are_not_taken_for_stored():
    js = FakeJetStream([APIError(code=400, err_code=10054, description="message size exceeds maximum allowed")])
    with pytest.raises(APIError):
        await store_result(js, SUBJECTS, RESULT, pause_s=0)


@pytest.mark.anyio
async def test_a_result_not_stored_leaves_the_job_unacked_and_unanswered():
    js = FakeJetStream([store_failed("maximum messages exceeded")] * 10)
    sent: list[tuple[str, bytes]] = []

    async def publish(subject, payload=b""):
        sent.append((subject, payload))

    nc = SimpleNamespace(max_payload=1 << 20, publish=publish)
    finisher = Finisher(nc, js, SUBJECTS)
    with pytest.raises(ResultNotStored):
        await finisher.finish(RESULT, ack="$JS.ACK.x", reply_to="_INBOX.caller")
    assert sent == []  # no ack, no reply: the JOBS message is delivered again
