"""The trace headers an assignment carries when no tracing SDK runs (dispatcher/shell/job_spans.py):
the job's own `traceparent`, its `tracestate` only alongside it, nothing without one."""

from __future__ import annotations

import pytest

from ratefleet.dispatcher.core.commands import Assign
from ratefleet.dispatcher.core.delivery import Incoming
from ratefleet.dispatcher.shell.job_spans import dispatch_spans
from ratefleet.schemas import Job

pytestmark = pytest.mark.usefixtures("no_tracing_sdk")
TP = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"


def command(traceparent: str | None, tracestate: str | None) -> Assign:
    job = Job.model_validate({"id": "j1", "request": {"path": "/x"}})
    incoming = Incoming(job=job, job_id="j1", tier="normal", upstream="u", ack="ack.1", reply_to=None, attempt=1,
                        max_attempts=3, submitted_at=1.0, stream_seq=1, traceparent=traceparent,
                        tracestate=tracestate)
    return Assign("w1", "a1", b"{}", incoming)


@pytest.mark.parametrize(("traceparent", "tracestate", "headers"), [
    (TP, 'k="v"', {"traceparent": TP, "tracestate": 'k="v"'}),
    (TP, None, {"traceparent": TP}),
    (None, 'k="v"', {}),  # a tracestate without its traceparent means nothing
    (None, None, {}),
])
def test_without_an_sdk_the_jobs_own_trace_context_is_forwarded(traceparent, tracestate, headers):
    with dispatch_spans(command(traceparent, tracestate)) as sent:
        assert sent == headers
