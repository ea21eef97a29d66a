"""The Result: exactly one terminal answer per job, stored in RATEFLEET_RESULTS."""

from __future__ import annotations

from datetime import datetime
from enum import StrEnum
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field
from pydantic_core import PydanticSerializationError

ResultStatus = Literal["succeeded", "failed", "expired", "invalid"]


class ErrorCode(StrEnum):
    """Stable error codes carried in `Result.error.code`: the only codes any part of
    ratefleet writes (tests/unit/test_vocabulary.py checks the writers). Codes are only ever
    added, never renamed or removed, so every Result stored so far still parses."""

    INVALID_JOB = "invalid_job"
    UNKNOWN_TIER = "unknown_tier"
    UNKNOWN_UPSTREAM = "unknown_upstream"
    FORBIDDEN_TARGET = "forbidden_target"
    DEADLINE_EXCEEDED = "deadline_exceeded"
    ATTEMPTS_EXHAUSTED = "attempts_exhausted"
    UPSTREAM_ERROR = "upstream_error"
    NO_KEY_AVAILABLE = "no_key_available"
    KEY_UNAVAILABLE = "key_unavailable"
    POISON_MESSAGE = "poison_message"
    RATE_LIMITED = "rate_limited"  # 429 on every try, `max_rate_limited` times
    RESPONSE_TOO_LARGE = "response_too_large"
    INVALID_REQUEST = "invalid_request"  # the job passed validation but its HTTP request could not be built
    REQUEST_DENIED = "request_denied"  # 401/403 or a model's 404 on two keys: the request is refused, not the keys
    RESULT_NOT_STORED = "result_not_stored"  # NATS refused the answer (bucket/stream full): not called again
    REQUEST_TOO_LARGE = "request_too_large"  # a 429 saying the request exceeds the whole limit: never fits
    CANCELLED = "cancelled"  # its batch was cancelled (`ratefleet cancel`) before it was called
    # only in the reply to `ratefleet.rpc.<tier>` (nothing is stored): the job was not stored
    QUEUE_FULL = "queue_full"  # RATEFLEET_JOBS is at its limits (discard-new)
    SUBMIT_FAILED = "submit_failed"  # any other refusal or failure of the JOBS publish


def expired_before_call(attempt: int, rate_limited: int) -> str:
    """The message of a job whose deadline passed before its next call could start, naming
    what it went through: `attempt` (1 for the first call; more after failed attempts) and
    `rate_limited` (earlier answers of 429). Without history: "the deadline passed before the
    call could start"; with it, e.g. "the deadline passed before the job could be called again,
    after 7 answers of 429 (the keys' limits: a longer deadline or more key capacity)"."""
    if attempt <= 1 and rate_limited <= 0:
        return "the deadline passed before the call could start"
    history = []
    if rate_limited > 0:
        history.append(f"{rate_limited} answer{'s' if rate_limited != 1 else ''} of 429")
    if attempt > 1:
        history.append(f"{attempt - 1} failed attempt{'s' if attempt != 2 else ''}")
    advice = " (the keys' limits: a longer deadline or more key capacity)" if rate_limited > 0 else ""
    return f"the deadline passed before the job could be called again, after {' and '.join(history)}{advice}"


class ErrorInfo(BaseModel):
    """Why a job did not succeed: a stable `code` (ErrorCode; its JSON value is the code's
    string) and a readable `message` (never a secret)."""

    code: ErrorCode
    message: str


BodyEncoding = Literal["json", "text", "base64"]


class BodyRef(BaseModel):
    """Where a large body is kept: an object in the fleet's NATS Object Store.

    The object holds the value of one `ResponseInfo` field as UTF-8, named by `encoding`:
    `json` (compact JSON -> `json`), `text` (the text -> `body`) or `base64` (standard
    base64 of the upstream's exact bytes -> `body_b64`). `size` is the object's length in
    bytes and `sha256` its hex digest. Any NATS client can fetch it (object store `bucket`, object `name`, e.g.
    `nats object get <bucket> <name>`); the Python client does it by itself.
    """

    bucket: str
    name: str
    size: int = Field(ge=0)
    sha256: str
    encoding: BodyEncoding


class ResponseInfo(BaseModel):
    """The upstream's answer: status, selected headers (content-type among them), and the body.

    At most one body field is set: `json` (a JSON content type whose body parses), `body`
    (a textual content type whose charset, default UTF-8, decodes cleanly) or `body_b64`
    (anything else, byte-exact, standard base64). A body too large to travel inside the
    Result is replaced by `body_ref`; the Python client fetches it and fills the field the
    ref names (keeping `body_ref` as provenance).
    """

    status: int
    headers: dict[str, str] = Field(default_factory=dict)
    json_body: Any = Field(default=None, alias="json")
    body: str | None = None
    body_b64: str | None = None
    body_ref: BodyRef | None = None

    model_config = ConfigDict(populate_by_name=True)


class Timings(BaseModel):
    """When a job was stored (`submitted_at`) and where its time went, in milliseconds:
    `queued_ms` from then to the start of the call that ended it (earlier attempts, their
    backoffs and 429 waits included: a job retried after four 503s shows them all),
    `upstream_ms` that last call, `total_ms` from `submitted_at` to its Result."""

    submitted_at: datetime | None = None
    queued_ms: float | None = None
    upstream_ms: float | None = None
    total_ms: float | None = None


def calls_before(attempt: int) -> int:
    """`Result.attempts` of a job ended without a call in its `attempt`-th delivery (expired,
    invalid, refused): the deliveries before it, which may have reached a call (0 for a job
    ended at its first delivery)."""
    return max(0, attempt - 1)


class Result(BaseModel):
    """A terminal result. `status` is succeeded, failed, expired or invalid."""

    model_config = ConfigDict(populate_by_name=True)

    job_id: str
    status: ResultStatus
    tier: str | None = None
    batch: str | None = None
    response: ResponseInfo | None = None
    error: ErrorInfo | None = None
    attempts: int = 0
    key_id: str | None = None
    key_version: str | None = None  # the version of the key's secret the call used (never the secret)
    pool: str | None = None
    worker: str | None = None
    timings: Timings = Field(default_factory=Timings)
    metadata: dict[str, Any] = Field(default_factory=dict)
    # served from the fleet's cache (ratefleet/runtime/cache.py): no call, no key token spent
    cached: bool = False
    # A/B routing (`[tiers.<t>.split]`): "control" (the tier's pools) or "split"; None: no split
    variant: str | None = None
    # the job's W3C trace id (32 lower-case hex digits, https://www.w3.org/TR/trace-context/#trace-id):
    # from the producer's traceparent, or a fresh trace the dispatcher started for the job
    trace_id: str | None = None

    @property
    def ok(self) -> bool:
        return self.status == "succeeded"

    def to_json(self) -> bytes:
        """UTF-8 JSON. Never fails on content: text that cannot be encoded (a lone surrogate
        in an upstream answer or in metadata) is written escaped (see schemas.wire.json_safe)."""
        try:
            return self.model_dump_json(by_alias=True).encode()
        except (PydanticSerializationError, ValueError):
            from ratefleet.schemas.wire import dumps_safe

            return dumps_safe(self.model_dump(mode="json", by_alias=True))

    @classmethod
    def from_json(cls, raw: bytes | str) -> Result:
        return cls.model_validate_json(raw)
