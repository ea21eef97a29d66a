"""`[tracing]`: whether a process exports its spans (runtime/tracing_setup.py).

Traces are exported over OTLP with the SDK extra (`pip install 'ratefleet[otel]'`); where
they go and how is read from the standard OpenTelemetry environment variables
(https://opentelemetry.io/docs/specs/otel/configuration/sdk-environment-variables/):
`OTEL_EXPORTER_OTLP_ENDPOINT` / `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`, `..._PROTOCOL`,
`..._HEADERS`, `OTEL_TRACES_EXPORTER` (otlp, console, none), `OTEL_SERVICE_NAME`,
`OTEL_RESOURCE_ATTRIBUTES`, `OTEL_TRACES_SAMPLER`, `OTEL_SDK_DISABLED`.
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict


class TracingConfig(BaseModel):
    """`enabled`: true exports (OTLP to the default or configured endpoint), false never
    does, unset (the default) exports only when the environment names an exporter or an
    OTLP endpoint. `service_name`: the `service.name` of the spans when OTEL_SERVICE_NAME
    is not set (default `ratefleet-<role>`, e.g. ratefleet-worker)."""

    model_config = ConfigDict(extra="forbid")

    enabled: bool | None = None
    service_name: str | None = None
