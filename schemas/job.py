"""The Job: one HTTP call to a configured upstream, as producers publish it.

A job can only name a *path* on its upstream. The worker adds the API key, so anything
that could send the key elsewhere (an absolute URL, a scheme, a host, `//host`, `..`
escapes, backslashes, auth or Host headers) is refused with `forbidden_target`.
"""

from __future__ import annotations

import json
import uuid
from datetime import datetime
from typing import Any, Literal
from urllib.parse import unquote

from pydantic import (
    AwareDatetime,
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
)
from pydantic_core import PydanticCustomError

from schemas.result import ErrorCode
from schemas.subjects import TOKEN_PATTERN

FORBIDDEN_HEADERS = frozenset(
    {"authorization", "proxy-authorization", "host", "x-api-key", "api-key", "cookie",
     "forwarded", "x-forwarded-host", "x-forwarded-for", "content-length", "transfer-encoding"}
)
Method = Literal["GET", "POST", "PUT", "PATCH", "DELETE", "HEAD", "OPTIONS"]


def _forbidden(message: str) -> PydanticCustomError:
    return PydanticCustomError("forbidden_target", message)


def check_path(path: str) -> str:
    """Return `path` when it is a plain absolute path on the upstream, else raise."""
    if not path.startswith("/"):
        raise _forbidden("path must start with '/' (a path on the configured upstream)")
    decoded = path
    for _ in range(3):  # catch %252e%252e style double encoding too
        decoded = unquote(decoded)
    if any(ord(c) < 0x20 or c in "\\\x7f" for c in decoded):
        raise _forbidden("path must not contain backslashes or control characters")
    if decoded.startswith("//") or "://" in decoded or "@" in decoded.split("/", 2)[1]:
        raise _forbidden("path must not name a scheme or host; give a path like /v1/chat/completions")
    segments = decoded.split("?", 1)[0].split("/")
    if ".." in segments or "." in segments:
        raise _forbidden("path must not contain '.' or '..' segments")
    return path


class HttpRequest(BaseModel):
    """The upstream call: method, path on the upstream, query, extra headers, JSON body."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    method: Method = "POST"
    path: str = Field(min_length=1, max_length=2048)
    query: dict[str, str | int | float | bool | list[str | int | float | bool]] = Field(default_factory=dict)
    headers: dict[str, str] = Field(default_factory=dict)
    json_body: Any = Field(default=None, alias="json")
    body: str | None = None

    @field_validator("method", mode="before")
    @classmethod
    def _upper(cls, value: Any) -> Any:
        return value.upper() if isinstance(value, str) else value

    @field_validator("path")
    @classmethod
    def _path(cls, value: str) -> str:
        return check_path(value)

    @field_validator("headers")
    @classmethod
    def _headers(cls, value: dict[str, str]) -> dict[str, str]:
        for name, header_value in value.items():
            if name.lower() in FORBIDDEN_HEADERS:
                raise _forbidden(f"header {name!r} is set by ratefleet and must not be in a job")
            if any(c in name + header_value for c in "\r\n\0"):
                raise PydanticCustomError("invalid_header", f"header {name!r} contains a line break")
        return value


class Job(BaseModel):
    """One job. Only `request` is required (and `upstream` when several are configured)."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    id: str | None = Field(default=None, pattern=TOKEN_PATTERN)
    upstream: str | None = None
    request: HttpRequest
    cost: float = Field(default=1.0, ge=0)
    deadline: AwareDatetime | None = None
    max_attempts: int | None = Field(default=None, ge=1, le=100)
    batch: str | None = Field(default=None, pattern=TOKEN_PATTERN)
    metadata: dict[str, Any] = Field(default_factory=dict)

    def with_id(self) -> "Job":
        """This job with an id (a random one when it had none)."""
        return self if self.id else self.model_copy(update={"id": new_job_id()})

    def to_json(self) -> bytes:
        return self.model_dump_json(by_alias=True, exclude_none=True).encode()

    def expired(self, now: datetime) -> bool:
        return self.deadline is not None and now >= self.deadline


def new_job_id() -> str:
    return uuid.uuid4().hex


class JobRejected(Exception):
    """A job payload that cannot run. Carries a stable error code and a readable reason."""

    def __init__(self, code: ErrorCode, message: str, *, job_id: str | None = None, batch: str | None = None):
        super().__init__(message)
        self.code = code
        self.message = message
        self.job_id = job_id
        self.batch = batch


def describe_validation_error(error: ValidationError) -> tuple[ErrorCode, str]:
    """Turn a pydantic error into (code, message) naming every bad field."""
    code = ErrorCode.INVALID_JOB
    parts = []
    for item in error.errors(include_url=False, include_input=False):
        if item["type"] == "forbidden_target":
            code = ErrorCode.FORBIDDEN_TARGET
        where = ".".join(str(p) for p in item["loc"]) or "job"
        parts.append(f"{where}: {item['msg']}")
    return code, "; ".join(parts)


def _salvage(data: Any) -> tuple[str | None, str | None]:
    """Best-effort id and batch of an invalid job, so its `invalid` result can be found."""
    if not isinstance(data, dict):
        return None, None
    from schemas.subjects import is_token

    job_id, batch = data.get("id"), data.get("batch")
    return (job_id if isinstance(job_id, str) and is_token(job_id) else None,
            batch if isinstance(batch, str) and is_token(batch) else None)


def parse_job(raw: bytes, *, max_bytes: int = 1 << 20) -> Job:
    """Parse and validate a job payload; raise `JobRejected` with the reason."""
    if len(raw) > max_bytes:
        raise JobRejected(ErrorCode.INVALID_JOB, f"job is {len(raw)} bytes; the limit is {max_bytes} (streams.max_job_bytes)")
    try:
        data = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as exc:
        raise JobRejected(ErrorCode.INVALID_JOB, f"job is not valid JSON: {exc}") from None
    job_id, batch = _salvage(data)
    if not isinstance(data, dict):
        raise JobRejected(ErrorCode.INVALID_JOB, "job must be a JSON object")
    try:
        return Job.model_validate(data)
    except ValidationError as exc:
        code, message = describe_validation_error(exc)
        raise JobRejected(code, message, job_id=job_id, batch=batch) from None
