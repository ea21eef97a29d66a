"""W3C Trace Context (https://www.w3.org/TR/trace-context/) across the fleet, over the
OpenTelemetry API.

One job is one trace. Its `traceparent` travels as a NATS message header:

    producer (Client, CLI, rpc request headers, gateway HTTP header)
      -> JOBS message header `traceparent` (+ `tracestate`)
      -> dispatcher: span `ratefleet.queued` (submit -> dispatch, started at the JOBS
         message's timestamp) and span `ratefleet.dispatched` (the hand-out to a worker)
      -> assignment message header `traceparent` (the `dispatched` span)
      -> worker: span `ratefleet.run` (the worker's part of the job), and under it the
         upstream call's HTTP client span (opentelemetry-instrumentation-httpx), whose
         `traceparent` goes to the upstream in the request header.

A JOBS message without a valid `traceparent` gets a fresh trace whose ids are derived from
the message (job id, stream sequence, timestamp), so every delivery of that job (retries,
leader failovers) joins the same trace. The Result carries the trace id (`Result.trace_id`),
and every log line written inside a job's span carries it (runtime/logs.py).

Only the API is a dependency: without an SDK every span is a no-op that still carries the
incoming context, so propagation works and nothing is recorded or exported. With the
`[otel]` extra installed, `setup_tracing` (tracing_setup.py) turns exporting on.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Iterator, Mapping, MutableMapping
from contextlib import contextmanager

from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.trace import NonRecordingSpan, SpanContext, TraceFlags, TraceState
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

TRACEPARENT = "traceparent"
TRACESTATE = "tracestate"
TRACER_NAME = "ratefleet"
_PROPAGATOR = TraceContextTextMapPropagator()
# version 00 as written by W3C Trace Context section 3.2; ids not all zero (checked below)
_TRACEPARENT = re.compile(r"^00-([0-9a-f]{32})-([0-9a-f]{16})-([0-9a-f]{2})$")


def tracer() -> trace.Tracer:
    """The fleet's tracer (a no-op one while no SDK is set up)."""
    return trace.get_tracer(TRACER_NAME)


def current_headers() -> dict[str, str]:
    """`traceparent` (and `tracestate`) of the current context, for a message header;
    {} when no span is current (the dispatcher then starts a fresh trace)."""
    carrier: dict[str, str] = {}
    _PROPAGATOR.inject(carrier)
    return carrier


def inject(carrier: MutableMapping[str, str]) -> None:
    """Write the current context's `traceparent`/`tracestate` into `carrier` (e.g. HTTP headers)."""
    _PROPAGATOR.inject(carrier)


def trace_headers(headers: Mapping[str, str] | None) -> dict[str, str]:
    """The trace headers among `headers` (a NATS or HTTP header mapping, any case), only when
    `traceparent` is valid; {} otherwise."""
    if not headers:
        return {}
    found = {name.lower(): value for name, value in headers.items() if name.lower() in (TRACEPARENT, TRACESTATE)}
    if not valid_traceparent(found.get(TRACEPARENT)):
        return {}
    return found


def valid_traceparent(value: str | None) -> bool:
    """True for a version-00 `traceparent` whose trace id and parent id are not all zeros."""
    match = _TRACEPARENT.match(value.strip().lower()) if isinstance(value, str) else None
    return bool(match) and int(match.group(1), 16) != 0 and int(match.group(2), 16) != 0


def trace_id_of(traceparent: str | None) -> str | None:
    """The 32-hex-digit trace id of a valid `traceparent`, else None."""
    if not valid_traceparent(traceparent):
        return None
    return traceparent.strip().lower().split("-")[1]  # type: ignore[union-attr]


def fresh_traceparent(*identity: object) -> str:
    """A sampled `traceparent` for a job that came without one, derived from `identity`
    (e.g. job id, stream sequence, message timestamp): the same message always gets the
    same trace, so its redeliveries join it. The parent id names no span (the producer did
    not trace); the ids are never all zeros."""
    digest = hashlib.blake2b(repr(identity).encode(), digest_size=24).digest()
    trace_id, span_id = digest[:16].hex(), digest[16:].hex()
    if int(trace_id, 16) == 0 or int(span_id, 16) == 0:  # pragma: no cover - 2^-64
        trace_id, span_id = "1" + trace_id[1:], "1" + span_id[1:]
    return f"00-{trace_id}-{span_id}-01"


def parent_context(traceparent: str | None, tracestate: str | None = None) -> otel_context.Context:
    """An OpenTelemetry context whose current span is the remote parent `traceparent`
    (the empty context when it is missing or invalid: a new trace)."""
    if not valid_traceparent(traceparent):
        return otel_context.Context()
    return trace.set_span_in_context(remote_span(traceparent, tracestate), otel_context.Context())


def tracing_active() -> bool:
    """True when an SDK tracer provider is installed (spans are recorded). Without one the
    fleet skips building spans and only forwards the job's traceparent: nothing is paid."""
    return not isinstance(trace.get_tracer_provider(), (trace.ProxyTracerProvider, trace.NoOpTracerProvider))


def current_trace_id() -> str | None:
    """The trace id (32 hex digits) of the current span, None when there is none."""
    span_context = trace.get_current_span().get_span_context()
    return format(span_context.trace_id, "032x") if span_context.is_valid else None


def headers_of(span: trace.Span) -> dict[str, str]:
    """`traceparent`/`tracestate` naming `span` (a no-op span names its parent)."""
    carrier: dict[str, str] = {}
    _PROPAGATOR.inject(carrier, context=trace.set_span_in_context(span))
    return carrier


def remote_span(traceparent: str, tracestate: str | None = None) -> NonRecordingSpan:
    """A non-recording span standing for a valid remote `traceparent` (checked by the caller)."""
    _, trace_id, span_id, flags = traceparent.strip().lower().split("-")
    state = TraceState.from_header([tracestate]) if tracestate else None
    return NonRecordingSpan(SpanContext(int(trace_id, 16), int(span_id, 16), is_remote=True,
                                        trace_flags=TraceFlags(int(flags, 16)), trace_state=state))


@contextmanager
def remote_parent(headers: Mapping[str, str] | None) -> Iterator[None]:
    """Make the `traceparent` among `headers` (an incoming HTTP request's, the environment's
    TRACEPARENT) the current context for the block; without a valid one, nothing changes."""
    found = trace_headers(headers)
    if not found:
        yield
        return
    token = otel_context.attach(parent_context(found[TRACEPARENT], found.get(TRACESTATE)))
    try:
        yield
    finally:
        otel_context.detach(token)


def environment_carrier(environ: Mapping[str, str]) -> dict[str, str]:
    """`TRACEPARENT`/`TRACESTATE` from the environment as headers: how a shell script or a
    CI job hands its trace to a command (the OpenTelemetry convention for environment
    variables as carriers)."""
    return {name.lower(): environ[name] for name in ("TRACEPARENT", "TRACESTATE") if environ.get(name)}
