"""HTTP request -> Job, Result -> HTTP answer: the pure half of the gateway.

The request path is the path on the upstream (an SDK's `base_url = http://HOST:PORT/v1`
sends `/v1/chat/completions`, which is what the job asks the upstream for). Only a few
provider headers are forwarded (FORWARDED_HEADERS); the caller's Authorization never is: the
worker adds the fleet's key. The answer is the upstream's status, content type and body, so
provider errors reach the caller unchanged; the gateway adds `x-ratefleet-job-id` and
`x-ratefleet-queued-ms`, and `x-should-retry: false` where an SDK's automatic retry would repeat
the fleet's own retries or pay again (FLEET_RETRIED, errors.timed_out).
"""

from __future__ import annotations

import base64
import fnmatch
import json
import re
from collections.abc import Iterable, Mapping
from datetime import datetime, timedelta
from typing import Any

from pydantic import ValidationError

from ratefleet.gateway.callers import Caller
from ratefleet.gateway.errors import SHOULD_RETRY, GatewayRefusal, bad_request
from ratefleet.openai_batch import body_withheld
from ratefleet.schemas import ErrorCode, Job, Result
from ratefleet.schemas.job import describe_validation_error, new_job_id, path_models, percent_decoded

UPSTREAM_HEADER = "x-ratefleet-upstream"  # picks one of the caller's upstreams
FORWARDED_HEADERS = frozenset({"openai-organization", "openai-project", "openai-beta", "anthropic-version",
                               "anthropic-beta"})
# headers of the upstream's answer passed on (the worker keeps content-type, retry-after,
# x-request-id, openai-processing-ms, content-encoding of an undecoded body, x-ratelimit-*;
# the x-ratelimit-* ones describe the fleet's key, not the caller, so they stay behind)
ANSWER_HEADERS = frozenset({"content-type", "retry-after", "x-request-id", "openai-processing-ms", "content-encoding"})


def _query(items: Iterable[tuple[str, str]]) -> dict[str, str | list[str]]:
    query: dict[str, str | list[str]] = {}
    for name, value in items:
        if name in query:
            previous = query[name]
            query[name] = [*previous, value] if isinstance(previous, list) else [previous, value]
        else:
            query[name] = value
    return query


def parse_body(raw: bytes, content_type: str | None) -> tuple[Any, str | None]:
    """(JSON value, None) for a JSON body, (None, text) for another UTF-8 body, (None, None) for
    none. GatewayRefusal 400 for JSON that does not parse, 415 for a body that is not UTF-8 and
    for a multipart one (RFC 2046 section 5.1: file uploads, which the gateway does not relay,
    refused whatever bytes the parts hold: a text part passed and the call was paid)."""
    if not raw:
        return None, None
    kind = (content_type or "application/json").split(";", 1)[0].strip().lower()
    if kind.startswith("multipart/"):
        raise GatewayRefusal(415, f"Request bodies of type {kind} (file uploads: audio transcriptions, image edits, "
                             "uploads) are not supported by the ratefleet gateway, which relays JSON and UTF-8 text; "
                             "send such requests to the provider directly.", type="invalid_request_error",
                             code="unsupported_media_type")
    if kind == "application/json" or kind.endswith("+json"):
        try:
            return json.loads(raw), None
        except (ValueError, RecursionError) as exc:
            raise bad_request(f"The request body is not valid JSON ({exc}).", code="invalid_json") from None
    try:
        return None, raw.decode("utf-8")
    except UnicodeDecodeError:
        raise GatewayRefusal(415, f"Request bodies of type {kind} are not supported by the ratefleet gateway "
                             "(JSON or UTF-8 text only).", type="invalid_request_error", code="unsupported_media_type") from None


def choose_upstream(caller: Caller, asked: str | None) -> str | None:
    """The upstream for this request: the one asked for (`x-ratefleet-upstream`) if the caller
    may use it, else the caller's first, else None (the config's only upstream)."""
    if asked:
        if caller.upstreams is not None and asked not in caller.upstreams:
            raise GatewayRefusal(403, f"Caller {caller.name!r} may not use upstream {asked!r}.",
                                 type="invalid_request_error", code="upstream_not_allowed")
        return asked
    return caller.upstreams[0] if caller.upstreams else None


# where a provider keeps what its account stores (OpenAI, also under Azure OpenAI's /openai and
# /openai/v1: files, batches, uploads, vector stores, assistants and threads, fine-tuning, evals,
# containers, conversations, videos, the organization's admin API; stored chat completions and
# responses; Gemini: files and cached contents; Anthropic: message batches): every caller shares the
# fleet's keys, so one caller could read, change or delete what another stored there
_OPENAI_STORES = ("/files", "/batches", "/uploads", "/vector_stores", "/assistants", "/threads", "/fine_tuning",
                  "/fine-tunes", "/evals", "/containers", "/conversations", "/videos", "/organization",
                  "/organizations", "/chat/completions/", "/responses/")
ACCOUNT_PREFIXES = (*(root + store for root in ("/v1", "/openai", "/openai/v1") for store in _OPENAI_STORES),
                    "/v1beta/files", "/v1beta/cachedcontents", "/upload/v1beta/files", "/v1/messages/batches")
CREATE_ONLY = frozenset({"/v1/chat/completions", "/v1/responses", "/openai/v1/chat/completions",
                         "/openai/v1/responses"})  # POST makes one; GET lists the stored ones
STATELESS = frozenset({"/v1/responses/input_tokens", "/openai/v1/responses/input_tokens"})  # POST, stores nothing
MODEL_PATHS = ("/v1/models/", "/openai/v1/models/")  # GET reads a model; DELETE removes a fine-tuned one
_SEGMENT_PARAMETERS = re.compile(r";[^/]*")  # a path segment's ;parameters, which some servers drop


def check_path(caller: Caller, method: str, path: str) -> None:
    """GatewayRefusal 403 `path_not_allowed` for a request path the caller may not use. With
    `paths` (callers.<name>.paths), only paths matching one of its patterns pass (fnmatch, case
    as given). Without: every path passes but those of what the provider account stores
    (ACCOUNT_PREFIXES, a bodiless list of stored chat completions or responses, CREATE_ONLY, and
    anything but GET on a model, MODEL_PATHS), which the fleet's shared keys would open to every
    caller (a gateway trial: `GET /v1/chat/completions` listed the organization's stored
    completions, and `/v1/batches/` and `/v1/files/abc` went to the provider past the gateway's
    own, per-caller Files and Batch API). The path is matched percent-decoded (as the worker's
    HTTP client may send `/v1/%66iles`: `/v1/files`, a review found), in lower case, without a
    trailing slash and each segment's `;parameters`; a path still holding `%` after three
    decodings, or with an empty segment (`//`, which nginx merges by default), is refused (400
    `invalid_path`; a re-run of the trial sent `/v1//files` and `/v1/files;x` on)."""
    decoded = percent_decoded(path)
    if "%" in decoded:
        raise GatewayRefusal(400, f"The path {path!r} is percent-encoded more than three times over.",
                             type="invalid_request_error", code="invalid_path")
    if "//" in decoded:  # a server or proxy that merges slashes (nginx's default) reads /v1//files as /v1/files
        raise GatewayRefusal(400, f"The path {path!r} has an empty segment (//).", type="invalid_request_error",
                             code="invalid_path")
    decoded = _SEGMENT_PARAMETERS.sub("", decoded)  # /v1/files;x: matched as /v1/files (RFC 3986 3.3)
    if caller.paths is not None:
        if any(fnmatch.fnmatchcase(decoded, pattern) for pattern in caller.paths):
            return
        raise GatewayRefusal(403, f"Caller {caller.name!r} may not use path {path!r} (callers.{caller.name}.paths "
                             f"lists what it may: {', '.join(caller.paths)}).",
                             type="invalid_request_error", code="path_not_allowed")
    trimmed = decoded.lower().rstrip("/") or "/"
    if trimmed in STATELESS and method == "POST":
        return
    if (_account_path(trimmed) or (trimmed in CREATE_ONLY and method != "POST")
            or (trimmed.startswith(MODEL_PATHS) and method not in ("GET", "HEAD"))):
        raise GatewayRefusal(403, f"Path {path!r} reads or changes what the fleet's provider account stores (shared by "
                             "every caller through the fleet's keys: files, batches, stored completions and responses, "
                             "vector stores, assistants, fine-tuning and its models, the organization), so the gateway "
                             "does not pass it on; its own /v1/files and /v1/batches keep each caller's apart. An "
                             f"operator can allow it for this caller with callers.{caller.name}.paths.",
                             type="invalid_request_error", code="path_not_allowed")


# ACCOUNT_PREFIXES as (what is under it, the collection itself or None): a prefix ending in / stands for
# what is under it only (the collection itself: CREATE_ONLY)
_UNDER = tuple(prefix.rstrip("/") + "/" for prefix in ACCOUNT_PREFIXES)
_COLLECTIONS = frozenset(prefix for prefix in ACCOUNT_PREFIXES if not prefix.endswith("/"))


def _account_path(trimmed: str) -> bool:
    """Whether a path (lower case, no trailing slash) is one of ACCOUNT_PREFIXES or under one."""
    return trimmed in _COLLECTIONS or trimmed.startswith(_UNDER)


def check_model(caller: Caller, body: Any, text_body: str | None = None, path: str = "") -> None:
    """For a caller with a model allow-list (`models`): GatewayRefusal 403 when the request
    names a model the caller may not use, in its JSON body's `model` or in its path
    (`path_models`: Gemini, Vertex AI, Azure deployments, Bedrock, Hugging Face); 400 when
    the body's `model` is not a string; 415 for a text body (`text_body`: the gateway cannot
    read a model from it, so it must not pass one on); and 400 `model_required` for a JSON
    body that names no model when the path names none either (the upstream would pick its
    own default, whatever the list says). A request without a body whose path names no model
    (GET /v1/models) passes. A caller without `models` may send any of these."""
    if caller.models is None:
        return
    allowed = caller.models
    named = path_models(path)
    for candidates in named:
        if allowed.isdisjoint(candidates):
            raise GatewayRefusal(403, f"Caller {caller.name!r} may not use model {candidates[0]!r} (named in the "
                                 "request's path).", type="invalid_request_error", code="model_not_allowed")
    if text_body is not None:
        raise GatewayRefusal(415, f"Caller {caller.name!r} may use only some models, and the gateway reads the "
                             "model from a JSON body: send it as application/json.",
                             type="invalid_request_error", code="unsupported_media_type")
    if body is None:
        return
    if not isinstance(body, dict) or "model" not in body or body["model"] == "":
        if named:
            return  # the path names the model (Gemini, Azure, Bedrock bodies have no `model`)
        listed = ", ".join(sorted(allowed))
        raise GatewayRefusal(400, f"Caller {caller.name!r} may use only some models ({listed}): name one in the "
                             "body's `model` (without it the upstream would choose its own default).",
                             type="invalid_request_error", code="model_required", param="model")
    model = body["model"]
    if not isinstance(model, str):
        raise GatewayRefusal(400, f"`model` must be a string, not {type(model).__name__}.",
                             type="invalid_request_error", code="invalid_model", param="model")
    if model not in allowed:
        raise GatewayRefusal(403, f"Caller {caller.name!r} may not use model {model!r}.",
                             type="invalid_request_error", code="model_not_allowed", param="model")


def no_cache(cache_control: str | None) -> bool:
    """True when a request's `Cache-Control` has the `no-cache` directive (RFC 9111 section
    5.2.1.4: do not answer from a cache without going to the origin; directives are
    case-insensitive, comma-separated)."""
    if not cache_control:
        return False
    return any(part.split("=", 1)[0].strip().lower() == "no-cache" for part in cache_control.split(","))


def build_job(caller: Caller, *, method: str, path: str, query: Iterable[tuple[str, str]],
              headers: Mapping[str, str], json_body: Any, text_body: str | None, now: datetime) -> Job:
    """The Job for one gateway request on behalf of `caller`, with a fresh id and the caller's
    timeout as its deadline (a job still queued when the caller gave up is not paid for), and
    the caller's `cache_ttl_s` (`Cache-Control: no-cache`: `cache_refresh`, the lookup is
    skipped, the answer still cached). `headers` keys lower-case. GatewayRefusal 400/403 for
    what cannot become a valid job."""
    check_model(caller, json_body, text_body, path)
    check_path(caller, method, path)
    forwarded = {name: value for name, value in headers.items() if name in FORWARDED_HEADERS}
    if text_body is not None and "content-type" in headers:
        forwarded["content-type"] = headers["content-type"]
    request: dict[str, Any] = {"method": method, "path": path, "query": _query(query), "headers": forwarded}
    if json_body is not None:
        request["json"] = json_body
    elif text_body is not None:
        request["body"] = text_body
    data = {"id": new_job_id(), "request": request, "deadline": now + timedelta(seconds=caller.timeout_s),
            "metadata": {"caller": caller.name}}
    upstream = choose_upstream(caller, headers.get(UPSTREAM_HEADER))
    if upstream is not None:
        data["upstream"] = upstream
    if caller.cache_ttl_s is not None:
        data["cache_ttl_s"] = caller.cache_ttl_s
        if no_cache(headers.get("cache-control")):
            data["cache_refresh"] = True
    try:
        return Job.model_validate(data)
    except ValidationError as exc:
        code, message = describe_validation_error(exc)
        raise bad_request(message, code=str(code)) from None


def _body_bytes(result: Result) -> bytes:
    response = result.response
    assert response is not None
    if response.body_b64 is not None:
        return base64.b64decode(response.body_b64)
    if response.body is not None:
        return response.body.encode("utf-8", "surrogatepass")
    if response.json_body is not None:
        return json.dumps(response.json_body, ensure_ascii=False).encode("utf-8", "surrogatepass")
    return b""


# a job that ended so has had the fleet's own retries (attempts, 429s), was paid for, or waited out
# the caller's whole timeout: an SDK's automatic retry (2 more by default, on 429 and 5xx) would be
# new jobs repeating all of it, so answers for them carry `x-should-retry: false`
# (not `upstream_error`: a final 4xx the fleet did not retry, e.g. a 409 the SDKs retry themselves)
# (`response_too_large`: the call was paid and asking again draws the same answer; `request_too_large`:
# the request exceeds every key's whole tokens/min, and each SDK retry of the provider's 429 would be
# a new job charged a key's whole minute budget, holding every caller of that key for about a minute)
FLEET_RETRIED = frozenset({ErrorCode.ATTEMPTS_EXHAUSTED, ErrorCode.RATE_LIMITED, ErrorCode.RESULT_NOT_STORED,
                           ErrorCode.DEADLINE_EXCEEDED, ErrorCode.RESPONSE_TOO_LARGE,
                           ErrorCode.REQUEST_TOO_LARGE})


def _refusal_of(result: Result) -> GatewayRefusal:
    """The answer for a Result without an upstream answer (nothing to pass through)."""
    code = result.error.code if result.error else "upstream_error"
    message = result.error.message if result.error else f"job {result.job_id} ended {result.status}"
    retry = False if code in FLEET_RETRIED else None
    if result.status == "invalid":
        return bad_request(message, code=code)
    if result.status == "expired":
        return GatewayRefusal(504, f"Job {result.job_id} was still queued at this caller's timeout: {message}",
                              type="timeout", code=code, sdk_retry=False)
    if code == "no_key_available":
        return GatewayRefusal(503, message, type="server_error", code=code, retry_after_s=5.0)
    return GatewayRefusal(502, message, type="server_error", code=code, sdk_retry=retry)


def answer_of(result: Result) -> tuple[int, dict[str, str], bytes]:
    """(status, headers, body) of the HTTP answer for a job's Result: the upstream's own answer
    when there is one (succeeded or not), else an OpenAI-style error of the gateway (also for
    an answer whose body was too large to keep: its status with an empty body is no answer)."""
    headers = {"x-ratefleet-job-id": result.job_id}
    if result.timings.queued_ms is not None:
        headers["x-ratefleet-queued-ms"] = f"{result.timings.queued_ms:.1f}"
    if result.response is None or body_withheld(result):
        refusal = _refusal_of(result)
        headers.update(refusal.headers())
        headers["content-type"] = "application/json"
        return refusal.status, headers, refusal.body()
    headers.update(passed_headers(result.response.headers))
    if result.error is not None and result.error.code in FLEET_RETRIED:  # the upstream's last answer, passed on
        headers[SHOULD_RETRY] = "false"
    return result.response.status, headers, _body_bytes(result)


def passed_headers(answer_headers: dict[str, str]) -> dict[str, str]:
    """The upstream answer's headers the caller gets (ANSWER_HEADERS, lower-case names), each
    value as the bytes the upstream sent. The worker decodes header bytes as httpx does (ASCII,
    else UTF-8, else latin-1: workers/direct.py `received_headers`), and Starlette writes values
    as latin-1: a UTF-8 value outside latin-1 (`x-request-id: req_€`) raised UnicodeEncodeError,
    a 500 for a paid call (a review). Such a value goes out as its UTF-8 bytes, as a proxy
    passing bytes on would send it."""
    passed = {}
    for name, value in answer_headers.items():
        if name.lower() in ANSWER_HEADERS:
            try:
                value.encode("latin-1")
            except UnicodeEncodeError:
                value = value.encode("utf-8", "surrogateescape").decode("latin-1")
            passed[name.lower()] = value
    return passed


def used_tokens(result: Result) -> float | None:
    """`usage.total_tokens` of the upstream's JSON answer (OpenAI's usage object), or None."""
    body = result.response.json_body if result.response is not None else None
    usage = body.get("usage") if isinstance(body, dict) else None
    total = usage.get("total_tokens") if isinstance(usage, dict) else None
    return float(total) if isinstance(total, int | float) and not isinstance(total, bool) else None
