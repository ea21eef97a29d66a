"""The Job: one HTTP call to a configured upstream, as producers publish it.

A job can only name a *path* on its upstream. The worker adds the API key, so anything
that could send the key elsewhere (an absolute URL, a scheme, a host, `//host`, `..`
escapes, backslashes, auth or Host headers) is refused with `forbidden_target`.

A valid Job can always go on the wire (see schemas/wire.py): header names are RFC 9110
tokens, header values RFC 9110 field values, every string is encodable as UTF-8, and the
JSON body and metadata are strict JSON (no NaN/Infinity, bounded nesting). Whatever
fails is refused here, at every door (Client, `ratefleet submit`, rpc, intake), with the
field path and the reason, never later at a worker.
"""

from __future__ import annotations

import json
import re
import uuid
from collections.abc import Mapping
from datetime import datetime
from typing import Any, Literal, TypeVar
from urllib.parse import unquote

from pydantic import (
    AwareDatetime,
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)
from pydantic_core import PydanticCustomError, PydanticSerializationError

from ratefleet.schemas.cost import estimate_tokens
from ratefleet.schemas.errors import JobRejected
from ratefleet.schemas.result import ErrorCode
from ratefleet.schemas.subjects import NO_BATCH, TOKEN_PATTERN
from ratefleet.schemas.wire import (
    MAX_JSON_DEPTH,
    depth_problem,
    header_value_problem,
    is_field_name,
    json_problem,
    read_json,
    text_problem,
)

_CONTROL_OR_BACKSLASH = re.compile(r"[\x00-\x1f\\\x7f]")  # not allowed in a decoded path

# compared with the header name lower-cased (header names are case-insensitive, RFC 9110
# section 5.1); the auth-like ones are also masked in dead letters
FORBIDDEN_HEADERS = frozenset(
    {"authorization", "proxy-authorization", "host", "x-api-key", "api-key", "x-goog-api-key",
     "ocp-apim-subscription-key", "cookie", "forwarded", "x-forwarded-host", "x-forwarded-for",
     "content-length", "transfer-encoding"}
)
Method = Literal["GET", "POST", "PUT", "PATCH", "DELETE", "HEAD", "OPTIONS"]

_T = TypeVar("_T")


def _forbidden(message: str) -> PydanticCustomError:
    return PydanticCustomError("forbidden_target", message)


def _invalid(message: str) -> PydanticCustomError:
    return PydanticCustomError("invalid_job", message)


def normalised_header_name(name: str) -> str:
    """The name as an HTTP stack would read it: lower-cased, with the whitespace and ':'
    a sloppy parser trims. `"Authorization: "` and `"authorization"` both name `authorization`."""
    return name.strip(" \t:").lower()


def check_header(name: str, value: str, auth_header: str | None = None) -> None:
    """Raise (pydantic custom error) unless `name: value` can go on the wire and is not one
    ratefleet sets itself (FORBIDDEN_HEADERS, or the upstream's configured `auth_header`)."""
    normal = normalised_header_name(name)
    if normal in FORBIDDEN_HEADERS or (auth_header is not None and normal == auth_header.lower()):
        raise _forbidden(f"header {name!r} is set by ratefleet and must not be in a job")
    if not is_field_name(name):
        # a whole header line pasted as a name ("Authorization: Bearer sk-..."): its value is not
        # quoted back (the message reaches screens, Results, dead letters and submit --rejects)
        shown = name[:name.index(":") + 1] + " ..." if ":" in name.strip(" \t:") else name
        raise _invalid(f"header name {shown!r} is not an RFC 9110 token (section 5.1: letters, digits and "
                       "!#$%&'*+-.^_`|~ only; no spaces, no ':')")
    problem = header_value_problem(value)
    if problem:
        raise _invalid(f"header {name!r} value {problem}")


STRICT_JSON = "strict_json"  # validation context key: the values came from text `read_json` found strict
_STRICT_CONTEXT = {STRICT_JSON: True}


def _json_problem(value: Any, info: ValidationInfo, where: str = "$") -> str | None:
    """`json_problem`, or only `depth_problem` for a value from a text `read_json` found strict
    (the validation context says so)."""
    strict = isinstance(info.context, dict) and bool(info.context.get(STRICT_JSON))
    return (depth_problem if strict else json_problem)(value, where)


def _check_json(value: _T, what: str, info: ValidationInfo) -> _T:
    problem = _json_problem(value, info)
    if problem:
        raise _invalid(f"{what} is not strict JSON: {problem}")
    return value


def _check_text(value: str | None, what: str) -> str | None:
    problem = text_problem(value) if value is not None else None
    if problem:
        raise _invalid(f"{what} {problem}")
    return value


def check_path(path: str) -> str:
    """Return `path` when it is a plain absolute path on the upstream, else raise."""
    _check_text(path, "path")
    if not path.startswith("/"):
        raise _forbidden("path must start with '/' (a path on the configured upstream)")
    decoded = percent_decoded(path)
    if _CONTROL_OR_BACKSLASH.search(decoded):
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

    @field_validator("query")
    @classmethod
    def _query(cls, value: dict[str, Any], info: ValidationInfo) -> dict[str, Any]:
        for name, item in value.items():
            _check_text(name, f"query parameter {name!r}:")
            problem = _json_problem(item, info, f"query parameter {name!r}")
            if problem:
                raise _invalid(problem)
        return value

    @field_validator("headers")
    @classmethod
    def _headers(cls, value: dict[str, str]) -> dict[str, str]:
        for name, header_value in value.items():
            check_header(name, header_value)
        return value

    @field_validator("json_body")
    @classmethod
    def _json_body(cls, value: Any, info: ValidationInfo) -> Any:
        return _check_json(value, "the JSON body", info)

    @field_validator("body")
    @classmethod
    def _body(cls, value: str | None) -> str | None:
        return _check_text(value, "body")

    @model_validator(mode="after")
    def _one_body(self) -> HttpRequest:
        # a new user's finding: with both, the worker sent `json` and dropped `body` without a word
        if self.json_body is not None and self.body is not None:
            raise _invalid("give the body as `json` (a JSON value) or as `body` (text), not both")
        return self


class Job(BaseModel):
    """One job. Only `request` is required (and `upstream` when several are configured)."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True, allow_inf_nan=False)  # cost, cache_ttl_s

    id: str | None = Field(default=None, pattern=TOKEN_PATTERN)
    upstream: str | None = None
    request: HttpRequest
    cost: float | None = Field(default=None, ge=0)  # None: estimated from the request (`charge`)
    deadline: AwareDatetime | None = None
    max_attempts: int | None = Field(default=None, ge=1, le=100)
    batch: str | None = Field(default=None, pattern=TOKEN_PATTERN)
    metadata: dict[str, Any] = Field(default_factory=dict)
    # the fleet's answer cache (ratefleet/runtime/cache.py): seconds a 2xx answer is kept and
    # served to identical jobs (None: off); cache_refresh skips the lookup but still writes
    cache_ttl_s: float | None = Field(default=None, gt=0)
    cache_refresh: bool | None = None

    @field_validator("upstream")
    @classmethod
    def _upstream(cls, value: str | None) -> str | None:
        return _check_text(value, "upstream")

    @field_validator("batch")
    @classmethod
    def _batch(cls, value: str | None) -> str | None:
        """`_` is the results subject's token for "no batch" (Subjects.results): as a batch name it
        would mix its Results with those of every job sent without one."""
        if value == NO_BATCH:
            raise ValueError(f"{NO_BATCH!r} is reserved (it stands for jobs without a batch); choose another name")
        return value

    @field_validator("metadata")
    @classmethod
    def _metadata(cls, value: dict[str, Any], info: ValidationInfo) -> dict[str, Any]:
        return _check_json(value, "metadata", info)

    def charge(self) -> float:
        """What a key's cost bucket is charged for this job: its `cost`, else an estimate of
        its tokens (schemas/cost.py: text characters / 4 plus max_tokens x n)."""
        if self.cost is not None:
            return self.cost
        return float(estimate_tokens(self.request.json_body, self.request.body))

    def with_id(self) -> Job:
        """This job with an id (a random one when it had none)."""
        return self if self.id else self.model_copy(update={"id": new_job_id()})

    def to_json(self) -> bytes:
        """The job as UTF-8 JSON. A validated Job always serialises; a model built or changed
        without validation (`model_construct`) that cannot raises JobRejected."""
        try:
            return self.model_dump_json(by_alias=True, exclude_none=True).encode()
        except (PydanticSerializationError, ValueError) as exc:
            raise JobRejected(ErrorCode.INVALID_JOB, f"job cannot be serialised as JSON: {exc}",
                              job_id=self.id, batch=self.batch) from None

    def expired(self, now: datetime) -> bool:
        return self.deadline is not None and now >= self.deadline


# path segments after which a provider's URL names the model (or the deployment serving one):
# Google Gemini `/v1beta/models/{model}:generateContent` and `tunedModels/{model}`, Vertex AI
# `.../publishers/{publisher}/models/{model}:rawPredict`, Azure OpenAI
# `/openai/deployments/{deployment}/chat/completions`, AWS Bedrock `/model/{modelId}/converse`,
# Hugging Face `/models/{org}/{name}`, OpenAI `GET/DELETE /v1/models/{model}`
MODEL_SEGMENTS = frozenset({"models", "tunedmodels", "deployments", "model"})  # compared lower-cased


def path_models(path: str) -> list[tuple[str, ...]]:
    """The models a request path names, by the providers' URL conventions (MODEL_SEGMENTS):
    for each such segment, the names the next segment may stand for, the first the model
    itself: with a `:suffix` cut (Google's `:generateContent`), then the segment whole when it
    had one (a Bedrock id `anthropic.claude-v2:1`, an OpenAI fine-tune `ft:gpt-4o-mini:org::id`),
    then it and the segment after it joined by `/` (Hugging Face's `org/name`). Percent-escapes
    are decoded (as check_path decodes them). `/v1/models` (a list, no model) names none."""
    # decoded before the split (as check_path), empty segments dropped and names matched in any
    # case: `models//m`, `Deployments/m` or `models%2Fm` must not hide a model from the allow-list
    # from servers that merge slashes, ignore case or decode %2F
    decoded = percent_decoded(path.split("?", 1)[0])
    lowered = decoded.lower()
    if "model" not in lowered and "deployments" not in lowered:
        return []  # (every job's path is read by the dispatcher: most name no model)
    segments = [part for part in decoded.split("/") if part]
    named = []
    for i, segment in enumerate(segments[:-1]):
        if segment.lower() in MODEL_SEGMENTS:
            whole = segments[i + 1]
            names = [whole.split(":", 1)[0]]
            if ":" in whole:
                names.append(whole)
            if i + 2 < len(segments):
                names.append(f"{whole}/{segments[i + 2].split(':', 1)[0]}")
            named.append(tuple(names))
    return named


def percent_decoded(text: str) -> str:
    """`text` percent-decoded up to three times (%252e%252e style double escapes too)."""
    for _ in range(3):
        if "%" not in text:
            break
        text = unquote(text)
    return text


MAX_MODEL_CHARS = 256  # a longer name is no model the scheduler remembers (its lack memory holds names)


def requested_model(request: HttpRequest) -> str | None:
    """The model a request asks for: the models its path names (`path_models`) and its JSON
    body's `model` (a string), joined by `|` when they differ; None when it names none or the
    name is longer than MAX_MODEL_CHARS. Both count: the upstream picks by the path on Azure,
    Gemini, Vertex AI and Bedrock (whose bodies' `model` it ignores), so a job for a deployment
    some keys lack must not mark those keys as lacking another job's body model."""
    names = [candidates[0] for candidates in path_models(request.path)]
    body = request.json_body
    if isinstance(body, dict) and isinstance(body.get("model"), str):
        names.append(body["model"])
    model = "|".join(dict.fromkeys(names))
    return model if model and len(model) <= MAX_MODEL_CHARS else None


def new_job_id() -> str:
    return uuid.uuid4().hex


def _printable(text: str, limit: int = 80) -> str:
    """A field name from the payload, safe for a message: escaped if not UTF-8, bounded."""
    if text_problem(text):
        text = text.encode("utf-8", "backslashreplace").decode("utf-8")
    return text if len(text) <= limit else text[:limit] + "..."


def describe_validation_error(error: ValidationError) -> tuple[ErrorCode, str]:
    """Turn a pydantic error into (code, message) naming every bad field."""
    code = ErrorCode.INVALID_JOB
    parts = []
    items = error.errors(include_url=False, include_input=False)
    for item in items:
        if item["type"] == "forbidden_target":
            code = ErrorCode.FORBIDDEN_TARGET
        where = ".".join(_printable(str(p)) for p in item["loc"]) or "job"
        parts.append(f"{where}: {item['msg']}")
    if _bare_body(items):
        parts.append(BARE_BODY_HINT)
    return code, "; ".join(parts)


# top-level fields of a provider's request body (OpenAI, Anthropic, Gemini), pasted as a job
BODY_FIELDS = frozenset({"model", "messages", "input", "prompt", "contents", "max_tokens"})
BARE_BODY_HINT = ('this looks like a request body, not a job: put it under {"request": {"path": "/v1/...", '
                  '"json": ...}} (examples/jobs.jsonl shows the form)')


def _bare_body(items: Any) -> bool:
    """No `request`, and top-level fields a provider's body has: the body itself was sent as the job."""
    missing_request = any(i["type"] == "missing" and tuple(i["loc"]) == ("request",) for i in items)
    return missing_request and any(i["type"] == "extra_forbidden" and len(i["loc"]) == 1
                                   and i["loc"][0] in BODY_FIELDS for i in items)


def _salvage(data: Any) -> tuple[str | None, str | None]:
    """Best-effort id and batch of an invalid job, so its `invalid` result can be found."""
    if not isinstance(data, dict):
        return None, None
    from ratefleet.schemas.subjects import is_token

    job_id, batch = data.get("id"), data.get("batch")
    return (job_id if isinstance(job_id, str) and is_token(job_id) else None,
            batch if isinstance(batch, str) and is_token(batch) else None)


# bytes the leader's Assignment adds around a job on its way to a worker (ids, ack and reply
# subjects, counters: about 500) and the defaults a re-serialised job gains, with margin
ASSIGNMENT_OVERHEAD = 8 << 10


class UpstreamRoutes(dict[str, str]):
    """A fleet's upstreams for `upstream_problem`: name -> the header its keys go in, and
    `default`, where a job that names none goes when several are configured (the config's
    `default_upstream`; None: nowhere)."""

    def __init__(self, headers: Mapping[str, str], default: str | None = None) -> None:
        super().__init__(headers)
        self.default = default or None


def upstream_problem(job: Job, upstreams: Mapping[str, str], default: str | None = None
                     ) -> tuple[ErrorCode, str] | None:
    """What keeps `job` from running on a fleet whose upstreams are `upstreams` (name -> the
    header its keys go in, e.g. `Authorization`): no upstream named while several are
    configured, one that is not configured (both `unknown_upstream`), or the job setting that
    upstream's auth header itself (`forbidden_target`: the worker sets it). None when it can
    run. `default`: where a job naming none goes when several are configured (the config's
    `default_upstream`; read from `upstreams` when it is an UpstreamRoutes). The dispatcher's check
    at intake; `ratefleet submit` runs it on every line against the fleet's live config before
    anything is sent."""
    if default is None and isinstance(upstreams, UpstreamRoutes):
        default = upstreams.default
    implicit = next(iter(upstreams)) if len(upstreams) == 1 else (default or None)
    name = job.upstream if job.upstream is not None else implicit  # "" names none configured
    if name is None:
        return ErrorCode.UNKNOWN_UPSTREAM, (f"upstream is required: several are configured ({sorted(upstreams)}) "
                                            "and none is the default_upstream")
    if name not in upstreams:
        return ErrorCode.UNKNOWN_UPSTREAM, f"unknown upstream {name!r}; configured: {sorted(upstreams)}"
    auth_header = upstreams[name].lower()
    if any(normalised_header_name(header) == auth_header for header in job.request.headers):
        return ErrorCode.FORBIDDEN_TARGET, f"header {upstreams[name]!r} is set by ratefleet"
    return None


def job_size_limit(max_job_bytes: int | None, max_payload: int | None = None) -> tuple[int, str]:
    """(largest job in bytes, where that limit comes from) for a fleet whose NATS server has
    `max_payload` (bytes, from its INFO; None when unknown): min(max_job_bytes, max_payload -
    ASSIGNMENT_OVERHEAD), since a job reaches its worker inside one core-NATS message.
    `max_job_bytes` None: not known here (a client without the fleet's config)."""
    if max_payload is not None and (max_job_bytes is None or max_payload - ASSIGNMENT_OVERHEAD < max_job_bytes):
        configured = "" if max_job_bytes is None else f"; streams.max_job_bytes = {max_job_bytes}"
        return (max(0, max_payload - ASSIGNMENT_OVERHEAD),
                f"the NATS server's max_payload = {max_payload} less {ASSIGNMENT_OVERHEAD} bytes for the "
                f"assignment that carries the job to a worker{configured}")
    return max_job_bytes if max_job_bytes is not None else 1 << 62, "streams.max_job_bytes"


def _salvage_raw(raw: bytes) -> tuple[str | None, str | None]:
    """The id and batch of a payload refused before parsing (too large), so its `invalid`
    Result lands in its batch; (None, None) when it is not JSON."""
    try:
        return _salvage(json.loads(raw))
    except (ValueError, UnicodeDecodeError, RecursionError):
        return None, None


def parse_job(raw: bytes, *, max_bytes: int = 1 << 20, limit_source: str = "streams.max_job_bytes") -> Job:
    """Parse and validate a job payload; raise `JobRejected` with the reason. `max_bytes`
    and `limit_source`: the size limit and where it comes from (see `job_size_limit`)."""
    if len(raw) > max_bytes:
        job_id, batch = _salvage_raw(raw)
        raise JobRejected(ErrorCode.INVALID_JOB, f"job is {len(raw)} bytes; the limit is {max_bytes} ({limit_source})",
                          job_id=job_id, batch=batch)
    try:
        data, strict = read_json(raw)
    except (ValueError, UnicodeDecodeError) as exc:
        raise JobRejected(ErrorCode.INVALID_JOB, f"job is not valid JSON: {exc}") from None
    except RecursionError:
        raise JobRejected(ErrorCode.INVALID_JOB,
                          f"job is nested too deeply to parse (the limit is {MAX_JSON_DEPTH} levels)") from None
    if not isinstance(data, dict):
        raise JobRejected(ErrorCode.INVALID_JOB, "job must be a JSON object")
    try:
        return _validated(data, strict)
    except ValidationError as exc:
        code, message = describe_validation_error(exc)
        job_id, batch = _salvage(data)  # only for a job that fails: its `invalid` result names them
        raise JobRejected(code, message, job_id=job_id, batch=batch) from None


def _validated(data: Any, strict: bool) -> Job:
    """`Job.model_validate(data)`, told when `data` came from a text `read_json` found strict
    (then the validators check only the depth of its JSON values)."""
    return Job.model_validate(data, context=_STRICT_CONTEXT if strict else None)


def job_from_text(text: str) -> Job:
    """The Job in JSON `text` (`Assignment.job_json`, as a dispatcher validated it), validated
    the way `parse_job` validates a payload (`read_json`: no encoder pass over a strict text)
    but with pydantic's errors: raises ValidationError, as `Job.model_validate_json` (which
    reads a text that `read_json` cannot, e.g. one that is not JSON). Unlike it, a leading
    byte-order mark is read past, as `parse_job` reads one (the dispatcher never writes one)."""
    try:
        data, strict = read_json(text.encode("utf-8"))
    except (ValueError, RecursionError):  # not JSON, or a lone surrogate in `text`: pydantic says why
        return Job.model_validate_json(text)
    return _validated(data, strict)
