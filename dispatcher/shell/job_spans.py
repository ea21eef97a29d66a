"""The dispatcher's spans of a job (runtime/tracing.py has the whole picture).

`ratefleet.queued`: from the JOBS message's timestamp (submit) to this hand-out, and
`ratefleet.dispatched`: the hand-out to a worker, whose context the assignment carries in
its `traceparent` header. Both are children of the job's incoming context (the producer's
span, or the fresh trace intake derived for a job without one). Attributes name the job,
tier, attempt, key id, pool and worker; never a secret (the dispatcher has none) nor the
job's request.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager

from opentelemetry.trace import SpanKind

from ratefleet.dispatcher.core.commands import Assign
from ratefleet.runtime.tracing import TRACEPARENT, TRACESTATE, headers_of, parent_context, tracer, tracing_active


@contextmanager
def dispatch_spans(command: Assign) -> Iterator[dict[str, str]]:
    """Record `queued` (ended now) and open `dispatched` around the assignment's publish;
    yields the `traceparent`/`tracestate` headers for the assignment message. An exception
    in the block is recorded on `dispatched` and re-raised."""
    incoming = command.incoming
    if not tracing_active():  # no SDK: the worker's parent is the job's own traceparent, no span built
        yield _forwarded(incoming.traceparent, incoming.tracestate)
        return
    parent = parent_context(incoming.traceparent, incoming.tracestate)
    now_ns = time.time_ns()
    job = {"ratefleet.job_id": incoming.job_id, "ratefleet.tier": incoming.tier,
           "ratefleet.attempt": incoming.attempt, "messaging.system": "nats"}
    fleet_tracer = tracer()
    queued = fleet_tracer.start_span("ratefleet.queued", context=parent, kind=SpanKind.CONSUMER, attributes=job,
                                     start_time=min(now_ns, int(incoming.submitted_at * 1e9)))
    queued.end(end_time=now_ns)
    dispatched = {**job, "ratefleet.key_id": command.key_id, "ratefleet.pool": command.pool,
                  "ratefleet.worker": command.worker, "ratefleet.assignment": command.assignment}
    with fleet_tracer.start_as_current_span("ratefleet.dispatched", context=parent, kind=SpanKind.PRODUCER,
                                            attributes=dispatched, start_time=now_ns) as span:
        yield headers_of(span)


def _forwarded(traceparent: str | None, tracestate: str | None) -> dict[str, str]:
    headers = {TRACEPARENT: traceparent} if traceparent else {}
    if traceparent and tracestate:
        headers[TRACESTATE] = tracestate
    return headers
