"""The Result: exactly one terminal answer per job, stored in RATEFLEET_RESULTS."""

from __future__ import annotations

from datetime import datetime
from enum import StrEnum
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

ResultStatus = Literal["succeeded", "failed", "expired", "invalid"]


class ErrorCode(StrEnum):
    """Stable error codes carried in `Result.error.code`."""

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


class ErrorInfo(BaseModel):
    code: str
    message: str


class ResponseInfo(BaseModel):
    """The upstream's answer: status, selected headers, and the body as JSON or text."""

    status: int
    headers: dict[str, str] = Field(default_factory=dict)
    json_body: Any = Field(default=None, alias="json")
    body: str | None = None

    model_config = ConfigDict(populate_by_name=True)


class Timings(BaseModel):
    submitted_at: datetime | None = None
    queued_ms: float | None = None
    upstream_ms: float | None = None
    total_ms: float | None = None


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
    pool: str | None = None
    worker: str | None = None
    timings: Timings = Field(default_factory=Timings)
    metadata: dict[str, Any] = Field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return self.status == "succeeded"

    def to_json(self) -> bytes:
        return self.model_dump_json(by_alias=True).encode()

    @classmethod
    def from_json(cls, raw: bytes | str) -> "Result":
        return cls.model_validate_json(raw)
