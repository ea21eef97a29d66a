"""What an operator reads when the results stream refuses a Result
(ratefleet/runtime/store.py `store_result`): a warning per refusal naming the job, the
server's reason and which attempt of how many it was, then an error saying the Result was
NOT stored, for which job, why, and on which stream. These lines are the only sign, besides
the job being delivered again, of a results stream at its limits. Over a fake JetStream
context that refuses every store (error 10077, no Result held); deterministic, no server.
"""

from __future__ import annotations

import pytest
from nats.js.errors import APIError, NotFoundError
from structlog.testing import capture_logs

from ratefleet.runtime.store import STORE_FAILED, store_result
from ratefleet.schemas import Result, Subjects
from ratefleet.schemas.errors import ResultNotStored

pytestmark = pytest.mark.anyio
SUBJECTS = Subjects()


class RefusingJetStream:
    """Every publish refused as a full results stream would; no Result is ever held."""

    async def publish(self, subject, payload, headers=None, timeout=None):
        raise APIError(code=503, description="maximum bytes exceeded", err_code=STORE_FAILED)

    async def get_last_msg(self, stream, subject):
        raise NotFoundError


async def test_each_refusal_is_a_warning_and_the_last_an_error_naming_job_reason_and_stream():
    result = Result(job_id="j7", status="succeeded", tier="normal", attempts=1)
    with capture_logs() as logs, pytest.raises(ResultNotStored):
        await store_result(RefusingJetStream(), SUBJECTS, result, attempts=3, pause_s=0.0)
    *warnings, error = logs
    assert [(w["log_level"], w["job_id"], w["refusal"], w["attempt"], w["of"]) for w in warnings] == [
        ("warning", "j7", "maximum bytes exceeded", n, 3) for n in (1, 2, 3)]
    assert all("refused" in w["event"].lower() for w in warnings)
    assert error["log_level"] == "error" and "NOT stored" in error["event"]
    assert (error["job_id"], error["refusal"], error["stream"]) == ("j7", "maximum bytes exceeded",
                                                                    SUBJECTS.results_stream)
