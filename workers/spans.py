"""The worker's span of a job: `ratefleet.run`, a child of the dispatcher's `dispatched`
span named by the assignment's `traceparent` header (runtime/tracing.py has the whole
picture). It is current while the worker runs the job, so the upstream call's HTTP span
(opentelemetry-instrumentation-httpx) is its child, the upstream gets a `traceparent`,
every log line carries the trace id (runtime/logs.py) and the Result its `trace_id`.
Attributes name the job, tier, attempt, key id, pool, worker and how the job ended; never
the secret nor the job's request.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.trace import SpanKind, Status, StatusCode

from ratefleet.runtime.tracing import (
    TRACEPARENT,
    TRACESTATE,
    current_trace_id,
    parent_context,
    tracer,
    tracing_active,
)
from ratefleet.schemas import ErrorInfo
from ratefleet.schemas.internal import Assignment


@contextmanager
def run_span(a: Assignment, worker: str, trace_headers: dict[str, str]) -> Iterator[trace.Span]:
    """Make `ratefleet.run` current for the block. Without a valid `traceparent` (an
    assignment from a dispatcher of an older version) the span starts a trace of its own."""
    parent = parent_context(trace_headers.get(TRACEPARENT), trace_headers.get(TRACESTATE))
    if not tracing_active():  # no SDK: the job's context is current (logs, Result, upstream), no span built
        token = otel_context.attach(parent)
        try:
            yield trace.get_current_span()
        finally:
            otel_context.detach(token)
        return
    attributes = {"ratefleet.job_id": a.job_id, "ratefleet.tier": a.tier, "ratefleet.attempt": a.attempt,
                  "ratefleet.key_id": a.key_id, "ratefleet.pool": a.pool, "ratefleet.worker": worker,
                  "messaging.system": "nats"}
    with tracer().start_as_current_span("ratefleet.run", context=parent, kind=SpanKind.CONSUMER,
                                        attributes=attributes) as span:
        yield span


def note_result(status: str, error: ErrorInfo | None) -> str | None:
    """Record how the job ended on the current span (status ERROR for a job that did not
    succeed, with its error code) and return the trace id for the Result."""
    span = trace.get_current_span()
    if span.is_recording():
        span.set_attribute("ratefleet.status", status)
        if error is not None:
            span.set_attribute("ratefleet.error_code", str(error.code))
            span.set_status(Status(StatusCode.ERROR, str(error.code)))
    return current_trace_id()
