"""A paid answer NATS refuses to store (full Object Store bucket or results stream) ends the
job `failed` with `result_not_stored`, the answer's status kept, and the upstream is not
called again; NATS being away still sends the job back. One Result per job either way."""

from __future__ import annotations

import httpx
import nats.errors
import pytest
from nats.js.errors import APIError
from test_worker_job_faults import RecordingFinisher, assignment, make_worker

from ratefleet.schemas.errors import ResultNotStored
from ratefleet.workers.executor import UpstreamExecutor

pytestmark = pytest.mark.anyio
FULL = APIError(code=503, description="maximum bytes exceeded", err_code=10077)


class RefusingFinisher(RecordingFinisher):
    """Refuses a Result that carries a body (as a full bucket would); takes one without."""

    def __init__(self, refusal: Exception):
        super().__init__()
        self.refusal, self.refused = refusal, 0

    async def finish(self, result, *, ack, reply_to, then=None, before_answer=None):
        response = result.response
        if response is not None and (response.body is not None or response.json_body is not None):
            self.refused += 1
            raise self.refusal
        return await super().finish(result, ack=ack, reply_to=reply_to, then=then)


def big_answer(calls: list) -> UpstreamExecutor:
    def handler(request):
        calls.append(request)
        return httpx.Response(200, text="x" * 4096, headers={"content-type": "text/plain", "x-request-id": "r1"})
    return UpstreamExecutor(httpx.AsyncClient(transport=httpx.MockTransport(handler)))


@pytest.mark.parametrize("refusal", [FULL, ResultNotStored("RATEFLEET_RESULTS refused the Result 4 times")],
                         ids=["object-store-full", "results-refused"])
async def test_a_refused_paid_answer_ends_failed_and_is_not_called_again(monkeypatch, refusal):
    finisher = RefusingFinisher(refusal)
    worker, nc = make_worker(monkeypatch, finisher)
    calls: list = []
    await worker._run_assignment(assignment(json={"m": 1}), big_answer(calls))
    assert len(calls) == 1 and finisher.refused == 1
    assert finisher.naks == [], "the paid call was sent back to be made again"
    [result] = finisher.finished
    assert (result.status, result.error.code) == ("failed", "result_not_stored")
    assert result.response.status == 200 and result.response.headers["x-request-id"] == "r1"
    assert result.response.body is None and "refused to store" in result.error.message
    assert [letter["code"] for letter in finisher.dead_letters] == ["result_not_stored"]
    [report] = nc.reports()
    assert (report.kind, report.terminal) == ("ok", True)


async def test_when_nothing_can_be_stored_the_job_goes_back():
    class NothingStored(RecordingFinisher):
        async def finish(self, result, *, ack, reply_to, then=None, before_answer=None):
            raise FULL

    finisher = NothingStored()
    worker, nc = make_worker(pytest.MonkeyPatch(), finisher)
    calls: list = []
    await worker._run_assignment(assignment(json={"m": 1}), big_answer(calls))
    assert finisher.naks == [("$JS.ACK.x", 1.0)] and finisher.finished == []
    [report] = nc.reports()
    assert report.terminal is False


async def test_nats_away_still_sends_the_job_back(monkeypatch):
    finisher = RefusingFinisher(nats.errors.ConnectionClosedError())
    worker, _ = make_worker(monkeypatch, finisher)
    await worker._run_assignment(assignment(json={"m": 1}), big_answer([]))
    assert finisher.naks == [("$JS.ACK.x", 1.0)] and finisher.finished == []


async def test_a_dead_letter_that_fails_after_the_stored_result_does_not_send_the_job_back(monkeypatch):
    class LetterFails(RecordingFinisher):
        async def dead(self, tier, result, *, job=None, raw=None, last_error=None):
            raise nats.errors.MaxPayloadError()

    finisher = LetterFails()
    worker, nc = make_worker(monkeypatch, finisher, "X-Custom-Auth")
    calls: list = []
    await worker._run_assignment(assignment(headers={"x-custom-auth": "mine"}), big_answer(calls))
    assert calls == [] and [r.status for r in finisher.finished] == ["invalid"]
    assert finisher.naks == [], "a job ended and acked was naked as well"
    [report] = nc.reports()
    assert (report.kind, report.terminal) == ("none", True)
