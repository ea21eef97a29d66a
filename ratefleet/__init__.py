"""ratefleet: rate-limited API calls at scale over NATS JetStream.

Producers submit jobs by priority tier; one leader dispatcher spends each key's limits
exactly; a fleet of workers makes the calls and stores one Result per job.

One import package: `ratefleet.schemas` (the contract), `ratefleet.runtime` (the job
lifecycle), `ratefleet.dispatcher` and `ratefleet.workers`, and the application (CLI,
client, supervisor, demo) at the top. The names below are loaded on first use (PEP 562), so
importing a lower layer (a worker, the dispatcher) never loads the client.
"""

from __future__ import annotations

from importlib import import_module
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from ratefleet.client import Client
    from ratefleet.schemas import Job, Result
    from ratefleet.schemas.config_nats import NatsAuthConfig
    from ratefleet.schemas.errors import (
        BodyUnavailable,
        ConfigError,
        DispatcherUnavailable,
        InvalidRequest,
        JobInvalid,
        JobRejected,
        JobTooLarge,
        NatsError,
        NatsRefused,
        NatsUnavailable,
        QueueFull,
        RatefleetError,
        RequestTimeout,
        ResultNotStored,
        SecretUnavailable,
        SubmitError,
        UnknownTier,
        UpstreamUnavailable,
    )

_EXPORTS = {
    "Client": "ratefleet.client",
    "Job": "ratefleet.schemas",
    "Result": "ratefleet.schemas",
    "NatsAuthConfig": "ratefleet.schemas.config_nats",
    "BodyUnavailable": "ratefleet.schemas.errors",
    "ConfigError": "ratefleet.schemas.errors",
    "DispatcherUnavailable": "ratefleet.schemas.errors",
    "NatsError": "ratefleet.schemas.errors",
    "NatsUnavailable": "ratefleet.schemas.errors",
    "NatsRefused": "ratefleet.schemas.errors",
    "JobInvalid": "ratefleet.schemas.errors",
    "JobTooLarge": "ratefleet.schemas.errors",
    "QueueFull": "ratefleet.schemas.errors",
    "RatefleetError": "ratefleet.schemas.errors",
    "RequestTimeout": "ratefleet.schemas.errors",
    "SubmitError": "ratefleet.schemas.errors",
    "UnknownTier": "ratefleet.schemas.errors",
    "JobRejected": "ratefleet.schemas.errors",
    "SecretUnavailable": "ratefleet.schemas.errors",
    "ResultNotStored": "ratefleet.schemas.errors",
    "InvalidRequest": "ratefleet.schemas.errors",
    "UpstreamUnavailable": "ratefleet.schemas.errors",
}
__all__ = ["BodyUnavailable", "Client", "ConfigError", "DispatcherUnavailable", "InvalidRequest", "Job", "JobInvalid",
           "JobRejected", "JobTooLarge", "NatsAuthConfig", "NatsError", "NatsRefused", "NatsUnavailable", "QueueFull",
           "RatefleetError", "RequestTimeout", "Result", "ResultNotStored", "SecretUnavailable", "SubmitError",
           "UnknownTier", "UpstreamUnavailable"]


def __getattr__(name: str) -> Any:
    """`ratefleet.Client` and the other public names, imported on first access."""
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'ratefleet' has no attribute {name!r}")
    return getattr(import_module(module), name)
