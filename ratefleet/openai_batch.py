"""OpenAI Batch API files: input lines in, output lines out (`ratefleet submit`, `ratefleet results`).

Input line (OpenAI API reference, "Batch" -> "The request input object"):

    {"custom_id": "request-1", "method": "POST", "url": "/v1/chat/completions", "body": {...}}

becomes the Job `{"request": {"method", "path": url, "query", "json": body}, "metadata":
{"custom_id": ...}}`; the line keeps the batch file's deterministic id (`batchfile.line_job_id`),
so `--order input` and re-runs work as for Job lines. Output line (OpenAI API reference, "Batch"
-> "The request output object"), written with `--out-format openai`:

    {"id": "batch_req_<job id>", "custom_id": "request-1",
     "response": {"status_code": 200, "request_id": "<x-request-id or job id>", "body": {...}},
     "error": null}

`response` is the upstream's answer whenever there is one (a provider error included, as OpenAI
writes it); when no call answered, or the answer's body was too large to keep
(`response_too_large`), `response` is null and `error` holds ratefleet's `{"code", "message"}`.
"""

from __future__ import annotations

import json
from typing import Any
from urllib.parse import parse_qsl

from ratefleet.schemas import ErrorCode, Result
from ratefleet.schemas.errors import RatefleetError

INPUT_FIELDS = frozenset({"custom_id", "method", "url", "body"})


class NotAnOpenAILine(RatefleetError):
    """The line is not an OpenAI Batch input line (it is read as a Job instead)."""


def job_from_openai_line(data: Any) -> dict[str, Any]:
    """The Job (as a dict, validated later like every job) for an OpenAI Batch input line.

    Raises NotAnOpenAILine for anything without `custom_id`, or with a Job's `request` (a Job
    line), ValueError naming the field for an OpenAI line that is malformed: `{"custom_id": "x"}`
    says its `url` is missing (a gateway trial: it was read as a Job line, "request: Field
    required; custom_id: Extra inputs are not permitted")."""
    if not isinstance(data, dict) or "custom_id" not in data or "request" in data:
        raise NotAnOpenAILine
    extra = sorted(set(data) - INPUT_FIELDS)
    if extra:
        raise ValueError(f"OpenAI batch line: unexpected field(s) {', '.join(extra)} (allowed: custom_id, method, "
                         "url, body)")
    if "url" not in data:
        raise ValueError('OpenAI batch line: url is missing (the endpoint, e.g. "/v1/chat/completions"; each line '
                         'is {"custom_id", "method", "url", "body"})')
    custom_id, method, url, body = data["custom_id"], data.get("method", "POST"), data["url"], data.get("body")
    if not isinstance(custom_id, str) or not custom_id:
        raise ValueError("OpenAI batch line: custom_id must be a non-empty string")
    if not isinstance(method, str):
        raise ValueError("OpenAI batch line: method must be a string such as \"POST\"")
    if not isinstance(url, str):
        raise ValueError("OpenAI batch line: url must be a path such as \"/v1/chat/completions\"")
    if body is not None and not isinstance(body, dict):
        raise ValueError("OpenAI batch line: body must be a JSON object")
    if body is None and method.upper() == "POST":  # (a new user's: sent without one, paid for a 400)
        raise ValueError("OpenAI batch line: body is required for a POST (the request's JSON object, e.g. "
                         "{\"model\": ..., \"messages\": [...]})")
    if body is not None and body.get("stream") is True:
        # a batch answer is stored whole; the OpenAI Batch API takes no streaming lines either
        raise ValueError("OpenAI batch line: body.stream must not be true (a batch line's answer is stored "
                         "whole; remove \"stream\" or set it to false)")
    path, _, query = url.partition("?")
    request: dict[str, Any] = {"method": method, "path": path}
    if query:
        request["query"] = dict(parse_qsl(query, keep_blank_values=True))
    if body is not None:
        request["json"] = body
    return {"request": request, "metadata": {"custom_id": custom_id}}


def openai_line_as_job(text: str) -> bytes | None:
    """The Job JSON for an OpenAI Batch input line, or None when `text` is not one (or not
    JSON at all: the Job parser then says why). ValueError for a malformed OpenAI line."""
    if '"custom_id"' not in text:  # cheap test first: Job lines are parsed once, not twice
        return None
    try:
        data = json.loads(text)
    except (ValueError, RecursionError):
        return None
    try:
        job = job_from_openai_line(data)
    except NotAnOpenAILine:
        return None
    try:
        return json.dumps(job, ensure_ascii=False, allow_nan=False).encode("utf-8", "surrogatepass")
    except ValueError:
        raise ValueError("OpenAI batch line: body is not strict JSON (NaN or Infinity)") from None


def body_withheld(result: Result) -> bool:
    """The upstream answered, but with a body larger than `workers.max_response_bytes`: the
    Result keeps its status and headers and no body, so it is no answer to pass on (an empty
    200 reads as a broken success)."""
    return result.error is not None and result.error.code == ErrorCode.RESPONSE_TOO_LARGE


def openai_output_line(result: Result) -> dict[str, Any]:
    """The OpenAI Batch output object for one Result. `custom_id` is the OpenAI line's own;
    a Job line has none, so its job id (its own `id`, or the one `submit` gave the line)
    stands in: the key to join the output back to its input either way."""
    response = None
    error = None
    if result.response is not None and not body_withheld(result):
        answer = result.response
        body: Any = answer.json_body
        if body is None:
            body = answer.body if answer.body is not None else answer.body_b64
        request_id = next((v for k, v in answer.headers.items() if k.lower() == "x-request-id"), result.job_id)
        response = {"status_code": answer.status, "request_id": request_id, "body": body}
    else:
        code = result.error.code if result.error else result.status
        message = result.error.message if result.error else f"job ended {result.status}"
        error = {"code": code, "message": message}
    custom_id = result.metadata.get("custom_id")
    return {"id": f"batch_req_{result.job_id}", "custom_id": result.job_id if custom_id is None else custom_id,
            "response": response, "error": error}


def format_result(result: Result, out_format: str) -> str:
    """One output line (without newline): the Result JSON (`ratefleet`) or OpenAI's (`openai`)."""
    if out_format != "openai":
        return result.model_dump_json(by_alias=True)
    line = openai_output_line(result)
    text = json.dumps(line, ensure_ascii=False)
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:  # a lone surrogate in an answer: written escaped, as JSON allows
        text = json.dumps(line)
    return text
