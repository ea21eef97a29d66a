"""Turning span export on for one process: the OpenTelemetry SDK with an OTLP exporter,
when the `[otel]` extra is installed and the config or the environment asks for it.

`[tracing] enabled = true` in the config, or any of `OTEL_TRACES_EXPORTER` (not `none`),
`OTEL_EXPORTER_OTLP_ENDPOINT`, `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT` in the environment,
turns it on; `[tracing] enabled = false` or `OTEL_SDK_DISABLED=true` keeps it off. The
exporter reads its own settings (endpoint, protocol, headers, timeout) from the standard
OTEL_* variables. Without the SDK nothing is set up and the API's no-op tracer is used.
"""

from __future__ import annotations

import os
from collections.abc import Callable

from opentelemetry import trace

from ratefleet.runtime.logs import get_logger
from ratefleet.schemas.config_tracing import TracingConfig

log = get_logger("ratefleet.tracing")
_ASKING = ("OTEL_TRACES_EXPORTER", "OTEL_EXPORTER_OTLP_ENDPOINT", "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")


def tracing_wanted(config: TracingConfig, environ: dict[str, str] | os._Environ = os.environ) -> bool:
    """Whether this process should export spans (see the module docstring)."""
    if environ.get("OTEL_SDK_DISABLED", "").strip().lower() == "true" or config.enabled is False:
        return False
    if environ.get("OTEL_TRACES_EXPORTER", "").strip().lower() == "none":
        return False
    return bool(config.enabled) or any(environ.get(name, "").strip() for name in _ASKING)


def setup_tracing(config: TracingConfig, role: str) -> Callable[[], None] | None:
    """Install an SDK TracerProvider exporting in batches when wanted; returns its shutdown
    (which flushes what is left), or None when tracing stays a no-op. Never raises: a
    missing SDK or a bad exporter setting is logged and tracing stays off."""
    if not tracing_wanted(config):
        return None
    try:
        from opentelemetry.sdk.resources import Resource
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor
    except ImportError:
        log.warning("tracing is asked for but the OpenTelemetry SDK is not installed: pip install 'ratefleet[otel]'")
        return None
    try:
        exporter = _exporter()
    except Exception as exc:  # noqa: BLE001 - a bad OTEL_* value must not stop the role
        log.warning("tracing not started: the span exporter could not be built", error=f"{type(exc).__name__}: {exc}")
        return None
    attributes = {} if os.environ.get("OTEL_SERVICE_NAME") else {"service.name": config.service_name or f"ratefleet-{role}"}
    provider = TracerProvider(resource=Resource.create(attributes))
    if exporter is not None:
        provider.add_span_processor(BatchSpanProcessor(exporter))
    trace.set_tracer_provider(provider)
    log.info("tracing on", exporter=type(exporter).__name__ if exporter else "none")
    return provider.shutdown


def _exporter():
    """The span exporter OTEL_TRACES_EXPORTER names (default otlp), over the protocol
    OTEL_EXPORTER_OTLP_TRACES_PROTOCOL / OTEL_EXPORTER_OTLP_PROTOCOL names (default
    http/protobuf, as the OpenTelemetry specification says)."""
    kind = (os.environ.get("OTEL_TRACES_EXPORTER") or "otlp").split(",")[0].strip().lower()
    if kind == "console":
        from opentelemetry.sdk.trace.export import ConsoleSpanExporter

        return ConsoleSpanExporter()
    if kind != "otlp":
        raise ValueError(f"OTEL_TRACES_EXPORTER={kind!r}: only otlp, console and none are supported")
    protocol = (os.environ.get("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL") or os.environ.get("OTEL_EXPORTER_OTLP_PROTOCOL")
                or "http/protobuf").strip().lower()
    if protocol == "grpc":
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
    else:
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
    return OTLPSpanExporter()
