"""The worker's `ratefleet.run` span (workers/spans.py): its name, kind, parent, trace state
and attributes; without an SDK the job's own context is current for the block and restored
after it; how the job ended goes on the span (status, error code, ERROR status) and its
trace id into the Result.

The tracer provider is process-global and set once (tests/e2e/tracekit.py installs the SDK's
for the whole run), so these tests never set it: they hand `run_span` a tracer of their own
provider, with an in-memory exporter, and say whether an SDK is active, whatever is global."""

from __future__ import annotations

import pytest
from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind, StatusCode

from ratefleet.runtime.tracing import current_headers, current_trace_id
from ratefleet.schemas import ErrorCode, ErrorInfo
from ratefleet.schemas.internal import Assignment
from ratefleet.workers import spans
from ratefleet.workers.spans import note_result, run_span

TRACE_ID = "0af7651916cd43dd8448eb211c80319c"
PARENT_ID = "b7ad6b7169203331"
TP = f"00-{TRACE_ID}-{PARENT_ID}-01"
STATE = "vendor=abc"


def assignment(**fields) -> Assignment:
    base = dict(id="a1", job_id="j1", tier="vip", upstream="u", key_id="k7", pool="shared", ack="ack.1",
                attempt=2, max_attempts=5, submitted_at=1.0, queued_ms=3.0)
    return Assignment(**{**base, **fields})


@pytest.fixture
def exporter(monkeypatch) -> InMemorySpanExporter:
    """An SDK of this test's own: `run_span` builds its span with it."""
    memory = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(memory))
    monkeypatch.setattr(spans, "tracer", lambda: provider.get_tracer("ratefleet"))
    monkeypatch.setattr(spans, "tracing_active", lambda: True)
    return memory


@pytest.fixture
def no_sdk(monkeypatch):
    monkeypatch.setattr(spans, "tracing_active", lambda: False)


def test_the_run_span_is_a_consumer_child_of_the_dispatch_span_with_the_jobs_attributes(exporter):
    with run_span(assignment(), "w-3", {"traceparent": TP, "tracestate": STATE}) as span:
        assert trace.get_current_span() is span and span.is_recording()
        assert current_trace_id() == TRACE_ID
    (done,) = exporter.get_finished_spans()
    assert done.name == "ratefleet.run" and done.kind is SpanKind.CONSUMER
    assert format(done.context.trace_id, "032x") == TRACE_ID
    assert done.parent is not None and format(done.parent.span_id, "016x") == PARENT_ID and done.parent.is_remote
    assert done.context.trace_state.to_header() == STATE
    assert dict(done.attributes) == {"ratefleet.job_id": "j1", "ratefleet.tier": "vip", "ratefleet.attempt": 2,
                                     "ratefleet.key_id": "k7", "ratefleet.pool": "shared", "ratefleet.worker": "w-3",
                                     "messaging.system": "nats"}
    assert not trace.get_current_span().get_span_context().is_valid  # ended and no longer current


@pytest.mark.parametrize("headers", [{}, {"traceparent": "00-nonsense"}, {"tracestate": STATE}])
def test_without_a_valid_traceparent_the_run_span_starts_a_trace_of_its_own(exporter, headers):
    with run_span(assignment(), "w-1", headers):
        pass
    (done,) = exporter.get_finished_spans()
    assert done.parent is None and format(done.context.trace_id, "032x") != TRACE_ID


def test_without_an_sdk_the_jobs_context_is_current_for_the_block_and_restored_after(no_sdk):
    before = otel_context.get_current()
    with run_span(assignment(), "w-1", {"traceparent": TP, "tracestate": STATE}) as span:
        assert span is trace.get_current_span() and not span.is_recording()
        assert current_trace_id() == TRACE_ID
        assert current_headers() == {"traceparent": TP, "tracestate": STATE}  # what the upstream gets
    assert otel_context.get_current() is before


def test_without_an_sdk_the_context_is_restored_when_the_job_fails(no_sdk):
    before = otel_context.get_current()
    with pytest.raises(RuntimeError), run_span(assignment(), "w-1", {"traceparent": TP}):
        raise RuntimeError("upstream blew up")
    assert otel_context.get_current() is before


def test_without_an_sdk_no_span_is_built(no_sdk, monkeypatch):
    monkeypatch.setattr(spans, "tracer", lambda: pytest.fail("a span was built without an SDK"))
    with run_span(assignment(), "w-1", {"traceparent": TP}):
        assert note_result("succeeded", None) == TRACE_ID


def test_a_failed_job_marks_its_span_as_an_error_with_its_code(exporter):
    error = ErrorInfo(code=ErrorCode.UNKNOWN_TIER, message="no tier 'x'")
    with run_span(assignment(), "w-1", {"traceparent": TP}):
        assert note_result("failed", error) == TRACE_ID
    (done,) = exporter.get_finished_spans()
    assert done.attributes["ratefleet.status"] == "failed"
    assert done.attributes["ratefleet.error_code"] == "unknown_tier"
    assert done.status.status_code is StatusCode.ERROR and done.status.description == "unknown_tier"


def test_a_succeeded_job_keeps_its_span_unset_and_without_an_error_code(exporter):
    with run_span(assignment(), "w-1", {"traceparent": TP}):
        assert note_result("succeeded", None) == TRACE_ID
    (done,) = exporter.get_finished_spans()
    assert done.attributes["ratefleet.status"] == "succeeded" and "ratefleet.error_code" not in done.attributes
    assert done.status.status_code is StatusCode.UNSET


def test_outside_any_span_the_result_gets_no_trace_id():
    assert note_result("failed", ErrorInfo(code=ErrorCode.UNKNOWN_TIER, message="x")) is None
