"""The ratefleet error tree. Exceptions from nats-py and httpx are translated at the edge.

    RatefleetError
    ├── ConfigError                       bad configuration, names file, field and why
    ├── NatsUnavailable                   no NATS server could be reached or started
    ├── SubmitError                       a job could not be stored
    │   ├── QueueFull                     RATEFLEET_JOBS is at its limits (discard-new)
    │   └── JobInvalid                    the job fails validation before it is sent
    ├── RequestTimeout                    no Result arrived in time for a request
    ├── SecretUnavailable                 a worker cannot resolve a key's secret
    ├── ResultNotStored                   the results stream refused a Result and holds none for the job
    ├── BodyUnavailable                   a Result's body_ref cannot be fetched or does not match
    └── InvalidRequest                    a job's HTTP request cannot be built (the job's fault)
"""

from __future__ import annotations


class RatefleetError(Exception):
    """Base of every error ratefleet raises on purpose."""


class ConfigError(RatefleetError):
    """The configuration cannot be used; the message names the file, the field and why."""


class NatsUnavailable(RatefleetError):
    """No NATS server could be reached (or started); the message says what to do."""


class SubmitError(RatefleetError):
    """A job could not be stored durably."""


class QueueFull(SubmitError):
    """RATEFLEET_JOBS is full; the job was NOT stored. Retry later or raise streams.jobs_max_msgs."""


class JobInvalid(SubmitError):
    """The job fails validation; nothing was sent."""


class RequestTimeout(RatefleetError):
    """No Result arrived within the timeout. The job is stored and still runs; collect its result later."""


class SecretUnavailable(RatefleetError):
    """A worker cannot use the secret for a key id (variable unset, file unreadable or empty,
    a value no HTTP header can carry). `reason` is the short form for status and results
    ("LOCAL_KEY_1 not set"); neither it nor the message ever holds the value."""

    def __init__(self, message: str, *, reason: str | None = None) -> None:
        super().__init__(message)
        self.reason = reason or message


class ResultNotStored(RatefleetError):
    """RATEFLEET_RESULTS refused a Result (error 10077 or another refusal) and holds no
    Result for that job: the job must stay un-acked so it is delivered again."""


class BodyUnavailable(RatefleetError):
    """A Result's `response.body_ref` names an object that is gone (expired with the
    results' max age, deleted) or whose size or sha256 does not match the reference."""


class InvalidRequest(RatefleetError):
    """A job's HTTP request cannot be built (a header that cannot be encoded, a body that
    cannot be serialised). The job's fault: it ends `invalid`, nothing is called, no retry."""


__all__ = ["BodyUnavailable", "ConfigError", "InvalidRequest", "JobInvalid", "NatsUnavailable", "QueueFull",
           "RatefleetError", "RequestTimeout", "ResultNotStored", "SecretUnavailable", "SubmitError"]
