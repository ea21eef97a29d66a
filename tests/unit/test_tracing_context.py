"""W3C traceparent handling (https://www.w3.org/TR/trace-context/ section 3.2) and when a
process turns span export on (runtime/tracing.py, runtime/tracing_setup.py)."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest

from ratefleet.runtime.tracing import (
    environment_carrier,
    fresh_traceparent,
    trace_headers,
    trace_id_of,
    valid_traceparent,
)
from ratefleet.runtime.tracing_setup import tracing_wanted
from ratefleet.schemas.config_tracing import TracingConfig

GOOD = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"


@pytest.mark.parametrize("value, ok", [
    (GOOD, True),
    (GOOD.upper(), True),  # read without case
    ("00-00000000000000000000000000000000-00f067aa0ba902b7-01", False),  # all-zero trace id
    ("00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01", False),  # all-zero parent id
    ("01-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01", False),  # only version 00 is known
    ("00-4bf92f3577b34da6a3ce929d0e0e473-00f067aa0ba902b7-01", False),  # short trace id
    ("", False), (None, False), ("garbage", False),
])
def test_valid_traceparent(value, ok):
    assert valid_traceparent(value) is ok
    assert trace_id_of(value) == ("4bf92f3577b34da6a3ce929d0e0e4736" if ok else None)


def test_trace_headers_keeps_only_a_valid_traceparent_and_its_tracestate():
    assert trace_headers({"Traceparent": GOOD, "TraceState": "a=1", "Nats-Msg-Id": "x"}) == {
        "traceparent": GOOD, "tracestate": "a=1"}
    assert trace_headers({"traceparent": "nope", "tracestate": "a=1"}) == {}
    assert trace_headers(None) == {}


def test_a_fresh_trace_is_the_same_for_every_delivery_of_one_message_and_new_for_another():
    first = fresh_traceparent("job-1", 17, 1764400000.25)
    assert valid_traceparent(first) and first.endswith("-01")  # sampled: the fleet's spans are kept
    assert fresh_traceparent("job-1", 17, 1764400000.25) == first
    assert trace_id_of(fresh_traceparent("job-1", 18, 1764400000.25)) != trace_id_of(first)


def test_environment_carrier():
    assert environment_carrier({"TRACEPARENT": GOOD, "PATH": "/bin"}) == {"traceparent": GOOD}
    assert environment_carrier({}) == {}


@pytest.mark.parametrize("enabled, env, wanted", [
    (None, {}, False),  # nothing asks: the API's no-op tracer, nothing paid
    (None, {"OTEL_EXPORTER_OTLP_ENDPOINT": "http://collector:4318"}, True),
    (None, {"OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": "http://collector:4318/v1/traces"}, True),
    (None, {"OTEL_TRACES_EXPORTER": "console"}, True),
    (None, {"OTEL_TRACES_EXPORTER": "none", "OTEL_EXPORTER_OTLP_ENDPOINT": "http://c:4318"}, False),
    (True, {}, True),
    (True, {"OTEL_SDK_DISABLED": "true"}, False),
    (False, {"OTEL_EXPORTER_OTLP_ENDPOINT": "http://collector:4318"}, False),
])
def test_tracing_wanted(enabled, env, wanted):
    assert tracing_wanted(TracingConfig(enabled=enabled), env) is wanted


def test_without_a_request_for_it_no_sdk_is_installed_and_spans_only_carry_the_context():
    """In a clean process: setup_tracing leaves the API's no-op provider; a span started
    under a remote parent records nothing and names that parent (so propagation works)."""
    code = textwrap.dedent(f"""
        from opentelemetry import trace
        from ratefleet.runtime.tracing import headers_of, parent_context, tracer
        from ratefleet.runtime.tracing_setup import setup_tracing
        from ratefleet.schemas.config_tracing import TracingConfig
        assert setup_tracing(TracingConfig(), "worker") is None
        span = tracer().start_span("x", context=parent_context("{GOOD}"))
        assert not span.is_recording()
        assert headers_of(span) == {{"traceparent": "{GOOD}"}}, headers_of(span)
        print(type(trace.get_tracer_provider()).__name__)
    """)
    env = {"PATH": "/usr/bin:/bin"}
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "ProxyTracerProvider"


def test_asked_for_it_installs_the_sdk_provider_with_the_role_as_service_name():
    code = textwrap.dedent("""
        from opentelemetry import trace
        from ratefleet.runtime.tracing_setup import setup_tracing
        from ratefleet.schemas.config_tracing import TracingConfig
        stop = setup_tracing(TracingConfig(enabled=True), "worker")
        provider = trace.get_tracer_provider()
        print(type(provider).__name__, provider.resource.attributes["service.name"])
        stop()
    """)
    env = {"PATH": "/usr/bin:/bin", "OTEL_TRACES_EXPORTER": "console"}
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip().splitlines()[-1] == "TracerProvider ratefleet-worker"
