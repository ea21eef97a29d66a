"""The ratefleet error tree: every exception ratefleet raises on purpose, and every
failure of NATS or of an HTTP call that ratefleet knows about, reaches a caller of the
Client or the CLI as one of these (nats-py and httpx exceptions are translated at one
edge, ratefleet/runtime/edge.py; the upstream calls of jobs become outcomes instead,
workers/executor.py).

    RatefleetError
    ├── ConfigError                       bad configuration, names file, field and why
    ├── NatsError                         NATS failed or refused an operation (the nats-py error is named)
    │   └── NatsUnavailable               no NATS server could be reached or started, or the connection is gone
    │       └── NatsRefused               the server refused the credentials, or TLS failed (retrying cannot help)
    ├── DispatcherUnavailable             no dispatcher answered a request only the leader serves (status)
    ├── SubmitError                       a job could not be stored
    │   ├── QueueFull                     RATEFLEET_JOBS is at its limits (discard-new)
    │   ├── JobInvalid                    the job fails validation before it is sent
    │   │   └── JobTooLarge               larger than a job can be on this fleet's NATS server
    │   └── UnknownTier                   no stream takes the tier: the fleet has no such tier
    ├── JobRejected                       a job payload that cannot run: a stable ErrorCode and the reason
    ├── RequestTimeout                    no Result arrived in time for a request
    ├── SecretUnavailable                 a worker cannot resolve a key's secret
    ├── ResultNotStored                   the results stream refused a Result and holds none for the job
    ├── BodyUnavailable                   a Result's body_ref cannot be fetched or does not match
    ├── InvalidRequest                    a job's HTTP request cannot be built (the job's fault)
    └── UpstreamUnavailable               an HTTP call ratefleet makes outside a job failed (the demo's upstream)
"""

from __future__ import annotations

from ratefleet.schemas.result import ErrorCode


class RatefleetError(Exception):
    """Base of every error ratefleet raises on purpose."""


class ConfigError(RatefleetError):
    """The configuration cannot be used; the message names the file, the field and why."""


class NatsError(RatefleetError):
    """NATS failed or refused an operation ratefleet does not handle by itself (a JetStream
    API error, a stream that does not exist...); the message names the nats-py error."""


class NatsUnavailable(NatsError):
    """No NATS server could be reached (or started), or the connection was lost or timed
    out during an operation; the message says what to do."""


class NatsRefused(NatsUnavailable):
    """The NATS server refused this process's credentials, or TLS failed: trying again with the
    same config cannot help (`[nats]` user/password, token, nkey_seed, creds, tls_*)."""


class DispatcherUnavailable(RatefleetError):
    """No dispatcher answered a request that only the leader serves (`Client.status()`):
    none runs, or none is leader yet. NATS itself is reachable."""


class SubmitError(RatefleetError):
    """A job could not be stored durably."""


class QueueFull(SubmitError):
    """RATEFLEET_JOBS is full; the job was NOT stored. Retry later or raise streams.jobs_max_msgs."""


class JobInvalid(SubmitError):
    """The job fails validation; nothing was sent."""


class JobTooLarge(JobInvalid):
    """The job is larger than a job can be on this fleet's NATS server (`job_size_limit`);
    nothing was sent. The gateway answers it 413, as a body over its limit."""


class UnknownTier(SubmitError):
    """No stream takes the tier's subject: the fleet has no such tier (tiers are configured in
    `[tiers]`); nothing was stored. `code` is "unknown_tier", the code a raw rpc caller gets in
    its reply for the same request."""

    code = ErrorCode.UNKNOWN_TIER


class JobRejected(RatefleetError):
    """A job payload that cannot run (schemas.job.parse_job, the dispatcher's intake and
    request/reply). `code` is the stable ErrorCode for its Result, `message` the readable
    reason; `job_id` and `batch` when the payload named them (for its Result)."""

    def __init__(self, code: ErrorCode, message: str, *, job_id: str | None = None, batch: str | None = None):
        super().__init__(message)
        self.code = code
        self.message = message
        self.job_id = job_id
        self.batch = batch


class RequestTimeout(RatefleetError):
    """No Result arrived within the timeout. The job is stored and runs (and is paid) once the fleet
    can run it; collect its result later. `job_id`: that job. `reason`: why, when the fleet said so
    after the timeout: "no_dispatcher" (nothing answers the status subject), "no_leader" (no
    dispatcher leads), "no_worker" (the leader has no worker) or "no_key_ready" (every key cooling
    down after 429s or answering 429 at its last call, with an open breaker or disabled),
    "nats_unavailable" (the connection to NATS was away, reconnecting: the job's store was not
    confirmed in time, or its Result could not come; once NATS is back it may be stored and run);
    None for anything else (queued behind other jobs, a slow call, or the fleet did not answer in
    time). `why`: the cause in words, without the job id or what to do next."""

    def __init__(self, message: str, *, job_id: str | None = None, reason: str | None = None,
                 why: str | None = None) -> None:
        super().__init__(message)
        self.job_id = job_id
        self.reason = reason
        self.why = why  # the cause alone, for a caller to word its own message (the gateway's 504)


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


class UpstreamUnavailable(RatefleetError):
    """An HTTP call ratefleet makes outside a job (the demo reading its mock upstream's
    statistics) found no answer or an error status; the message names the httpx error."""


__all__ = ["BodyUnavailable", "ConfigError", "DispatcherUnavailable", "InvalidRequest", "JobInvalid", "JobRejected",
           "JobTooLarge",
           "NatsError", "NatsRefused", "NatsUnavailable", "QueueFull", "RatefleetError", "RequestTimeout", "ResultNotStored",
           "SecretUnavailable", "SubmitError", "UnknownTier", "UpstreamUnavailable"]
