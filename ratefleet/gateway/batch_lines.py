"""An OpenAI Batch input file read for one gateway batch: each line a Job of the caller, or why not.

Every line goes through `batchfile.parse_line` (the rules and deterministic ids of `ratefleet
submit`: an OpenAI line keeps `custom_id` in `metadata`), then the Batch API's own rules
(OpenAI API reference, "Batch" -> "Create batch" and "The request input object": the file holds
request input objects whose `method` is POST and `url` the batch's endpoint, each `custom_id`
unique) and the caller's (its models, its upstream). A file with any bad line is refused whole,
with the line numbers, as OpenAI fails such a batch during `validating`: nothing of it is sent.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ratefleet.batchfile import SHOWN_ERRORS, IdSet, LineError, TooLong, iter_lines, line_of, parse_line
from ratefleet.gateway.callers import Caller
from ratefleet.gateway.errors import GatewayRefusal
from ratefleet.gateway.translate import check_model, check_path, choose_upstream
from ratefleet.schemas import Job

ENDPOINTS = frozenset({"/v1/chat/completions", "/v1/embeddings", "/v1/completions", "/v1/responses"})


MESSAGE_CHARS = 1000  # an entry's message at most: it may quote the line (a custom_id, a url, a model)


def line_error(number: int | None, code: str, message: str, param: str | None = None) -> dict[str, Any]:
    """One entry of a failed batch's `errors.data` (OpenAI's BatchError: code, message, param,
    line; `number` None for an entry about no one line). The message is cut at MESSAGE_CHARS:
    a line up to `streams.max_job_bytes` can quote a value that long, and the entries must fit
    in the batch's record (one KV message) with the others."""
    if len(message) > MESSAGE_CHARS:
        message = message[:MESSAGE_CHARS - 1] + "…"
    return {"code": code, "message": message, "param": param, "line": number}


def batch_jobs(path: Path, batch: str, endpoint: str, caller: Caller,
               size_limit: tuple[int, str] | None = None) -> Iterator[tuple[int, Job | dict[str, Any]]]:
    """(line number, Job) for each good line, (line number, error entry) for each bad one.
    `size_limit` (bytes, where it comes from: `job_size_limit` of the fleet's NATS server):
    a line whose job, as it will be sent (with its id, batch and caller), is larger is a bad
    one; without it, a line that passed `parse_line`'s 1 MiB could be refused by the submit
    mid-batch, and the batch would be submitted again and refused again for good."""
    upstream = choose_upstream(caller, None)
    for number, text in iter_lines(path):
        if '"custom_id"' not in text and isinstance(_json_or_none(text), dict):
            yield number, line_error(number, "invalid_request", f"line {number}: not an OpenAI batch request input "
                                     "line: it has no custom_id (each line needs custom_id, method, url and body)",
                                     "custom_id")
            continue
        try:
            job = parse_line(text, number, batch)
        except LineError as exc:
            # JSON that parses but breaks a rule (a `stream: true` body, a field of the wrong type)
            # is not an "invalid JSON line"
            code = "invalid_json_line" if isinstance(text, TooLong) or _json_or_none(text) is None else "invalid_request"
            yield number, line_error(number, code, str(exc))
            continue
        custom_id = job.metadata.get("custom_id")
        if not isinstance(custom_id, str):
            yield number, line_error(number, "invalid_request", f"line {number}: not an OpenAI batch request "
                                     "input line (custom_id, method, url, body)", "custom_id")
            continue
        if job.request.method != "POST":
            yield number, line_error(number, "invalid_method", f"line {number}: method {job.request.method!r}; "
                                     "the Batch API takes POST requests only", "method")
            continue
        if job.request.path != endpoint:
            yield number, line_error(number, "mismatched_endpoint", f"line {number}: url {job.request.path!r} "
                                     f"differs from the batch's endpoint {endpoint!r}", "url")
            continue
        try:
            check_path(caller, job.request.method, job.request.path)  # (a batch whose endpoint passed: every line)
            check_model(caller, job.request.json_body, path=job.request.path)
        except GatewayRefusal as refusal:
            yield number, line_error(number, refusal.code or "model_not_allowed", f"line {number}: {refusal.message}",
                                     "url" if refusal.code == "path_not_allowed" else "body.model")
            continue
        update: dict[str, Any] = {"metadata": {**job.metadata, "caller": caller.name}}
        if upstream is not None and job.upstream is None:
            update["upstream"] = upstream
        job = job.model_copy(update=update)
        if size_limit is not None and _may_pass(text, size_limit[0]) and (size := len(job.to_json())) > size_limit[0]:
            yield number, line_error(number, "invalid_request", f"line {number}: job is {size} bytes; the limit is "
                                     f"{size_limit[0]} ({size_limit[1]})")
            continue
        yield number, job


@dataclass
class Checked:
    """What the validation pass found: the jobs' ids, the line gaps (for input order), errors."""

    jobs: int = 0
    ids: IdSet = field(default_factory=IdSet)
    gaps: list[list[int]] = field(default_factory=list)
    errors: list[dict[str, Any]] = field(default_factory=list)
    error_count: int = 0


def check_file(path: Path, batch: str, endpoint: str, caller: Caller,
               size_limit: tuple[int, str] | None = None) -> Checked:
    """Pass 1 over the file (constant memory but 8 bytes per job); `size_limit`: see `batch_jobs`."""
    found = Checked()
    custom_ids: set[str] = set()
    last = 0
    for number, item in batch_jobs(path, batch, endpoint, caller, size_limit):
        if number > last + 1:
            _gap(found.gaps, last + 1, number - 1)
        last = number
        if isinstance(item, Job):
            custom_id = item.metadata["custom_id"]
            if custom_id in custom_ids:
                item = line_error(number, "duplicate_custom_id", f"line {number}: custom_id {custom_id!r} "
                                  "is used by an earlier line; each request needs its own", "custom_id")
            else:
                custom_ids.add(custom_id)
        if isinstance(item, dict):
            found.error_count += 1
            if len(found.errors) < SHOWN_ERRORS:
                found.errors.append(item)
            _gap(found.gaps, number, number)
            continue
        if line_of(item.id) != number:
            _gap(found.gaps, number, number)
        found.jobs += 1
        found.ids.add(item.id)
    found.ids.freeze()
    if found.error_count > len(found.errors):  # the entries stop at SHOWN_ERRORS: say how many more
        more = found.error_count - len(found.errors)
        found.errors.append(line_error(None, "more_errors", f"{more:,} more line{'s' if more != 1 else ''} with "
                                       f"errors ({found.error_count:,} in all; the first {len(found.errors)} are "
                                       "listed): check the whole file before uploading it again"))
    return found


def _may_pass(text: str, limit: int) -> bool:
    """Whether a line's job could pass `limit` bytes once sent: its JSON is the line's, compact
    and in UTF-8 (at most 4 bytes a character; a number grows less, `1e5` -> `100000.0`), plus
    its id, batch and caller. Only such lines are serialised to be measured."""
    return 4 * len(text) + 4096 > limit


def _json_or_none(text: str) -> Any:
    """`text` parsed as JSON, or None when it is not JSON (a JSON `null` line reads as None too)."""
    try:
        return json.loads(text)
    except (ValueError, RecursionError):
        return None


def _gap(gaps: list[list[int]], start: int, end: int) -> None:
    if gaps and gaps[-1][1] == start - 1:
        gaps[-1][1] = end
    else:
        gaps.append([start, end])
