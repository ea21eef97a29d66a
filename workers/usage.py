"""The actual cost an answer reports (`upstreams.<u>.usage_path`), in the pool's cost unit.

`usage_path` is a dotted path into the answer's JSON (`usage.total_tokens`, OpenAI), or
several joined by `+`, whose values are summed (`usage.input_tokens+usage.output_tokens`,
Anthropic, which reports no total). A path that is absent, or not a number, counts nothing;
when none of them is found the answer reports no cost (None) and the reservation stands.

A streamed answer (server-sent events, `"stream": true`) reports its usage in its events,
not in one JSON body: OpenAI in the last chunk when the request asks for it
(`stream_options.include_usage`), `{"choices": [], "usage": {...}}`; Anthropic the input
tokens in `message_start` (under `message.usage`) and the output tokens so far in each
`message_delta` (`usage.output_tokens`); OpenAI's Responses API in its `response.completed`
event (under `response.usage`). Each path is read from every event's data, and from its
`message` and `response` objects, and the last value found wins: OpenAI's earlier chunks carry
`"usage": null`, Anthropic's later deltas the larger count.
"""

from __future__ import annotations

import functools
import json
import re
from collections.abc import Callable, Iterator
from typing import Any


@functools.lru_cache(maxsize=64)
def usage_terms(usage_path: str) -> tuple[tuple[str, ...], ...]:
    """The dotted paths of `usage_path`, each split into its keys (spaces around a key or a `+`
    ignored, as the config checks them: schemas/config.py). Remembered per path: an
    upstream's one `usage_path` is split once, not on every answer."""
    return tuple(tuple(part.strip() for part in term.split(".")) for term in usage_path.split("+"))


def dig(data: Any, keys: tuple[str, ...]) -> float | None:
    """The number at `keys` in `data`, or None (absent, or not an int/float; a bool is no number)."""
    for part in keys:
        if not isinstance(data, dict) or part not in data:
            return None
        data = data[part]
    return float(data) if isinstance(data, (int, float)) and not isinstance(data, bool) else None


def answer_cost(json_body: Any, usage_path: str) -> float | None:
    """The sum of `usage_path`'s values in a JSON answer, or None when none is there."""
    found = [dig(json_body, keys) for keys in usage_terms(usage_path)]
    values = [value for value in found if value is not None]
    return sum(values) if values else None


def stream_cost(raw: bytes, usage_path: str) -> float | None:
    """The sum of `usage_path`'s values in a server-sent-events answer (module docstring), or
    None when no event carries any of them. The events are read from the last one back, and
    reading stops once every path has its last value: OpenAI's usage chunk is the last but
    `[DONE]`, while with `include_usage` every chunk before it carries `"usage": null` (parsed
    one by one from the start, 100,000 chunks took 0.6 s of CPU per answer, on the worker's
    event loop). Only events whose data names a path's first key are parsed."""
    terms = usage_terms(usage_path)
    markers = {f'"{keys[0]}"'.encode() for keys in terms} | {b'"message"'}
    found: list[float | None] = [None] * len(terms)
    for data in _event_data_last_first(raw, markers):
        if not any(marker in data for marker in markers):
            continue
        try:
            event = json.loads(data)
        except (ValueError, RecursionError):  # nested too deep to parse: counts nothing, as in a JSON body
            continue
        inner = (event.get("message"), event.get("response")) if isinstance(event, dict) else ()
        for place in (*inner, event):  # its `message` (Anthropic) or `response` (Responses API) first: it wins
            for i, keys in enumerate(terms):
                if found[i] is None:
                    found[i] = dig(place, keys)
        if all(value is not None for value in found):
            break
    values = [value for value in found if value is not None]
    return sum(values) if values else None


def _event_data_last_first(raw: bytes, markers: set[bytes]) -> Iterator[bytes]:
    """The data of each event of a server-sent-events body (`_event_data`), the last event
    first. Only the blocks between blank lines that hold one of `markers` are split into lines."""
    if b"\r" in raw:
        raw = raw.replace(b"\r\n", b"\n").replace(b"\r", b"\n")
    end = len(raw)
    while end > 0:
        start = raw.rfind(b"\n\n", 0, end)
        block = raw[start + 2 if start >= 0 else 0:end]
        if any(marker in block for marker in markers):
            yield from reversed(_event_data(block))
        if start < 0:
            return
        end = start


def _event_data(raw: bytes) -> list[bytes]:
    """The data of each event in a server-sent-events body (WHATWG HTML 9.2.6): the `data:`
    lines of an event joined by newlines; events end at a blank line; comments are skipped."""
    events: list[bytes] = []
    lines: list[bytes] = []
    for line in raw.replace(b"\r\n", b"\n").replace(b"\r", b"\n").split(b"\n"):
        if not line:
            if lines:
                events.append(b"\n".join(lines))
                lines = []
        elif line.startswith(b"data:"):
            value = line[5:]
            lines.append(value[1:] if value.startswith(b" ") else value)
    if lines:
        events.append(b"\n".join(lines))
    return events


STREAM_ERROR_EVENTS = 3  # the last events with data (pings aside) a stream's error is looked for in
# the end of an OpenAI (Chat) Completions stream: a `data: [DONE]` line (spaces around [DONE] and any of
# the SSE line ends, CRLF, LF or CR, as the openai SDK reads it)
_OPENAI_DONE = re.compile(rb'(?:^|[\r\n])data:[ \t]*\[DONE\][ \t]*(?:[\r\n]|$)')
_FINISH_REASON = re.compile(rb'"finish_reason"\s*:\s*"')
_RESPONSES_END = re.compile(rb'"response\.(?:completed|incomplete|failed)"')


def _openai_ended(raw: bytes) -> bool:
    """Whether an OpenAI Chat Completions or legacy Completions stream reached its end: its
    `data: [DONE]` line, or (a server that leaves out [DONE]) a `finish_reason` given for every
    choice index the stream carried. With `n` > 1 choices each ends on its own chunk
    (platform.openai.com/docs/api-reference/chat-streaming: `choices[].index`,
    `finish_reason` null until that choice ends), so one choice's finish_reason does not end a
    stream whose other choices are still open. Inside the model's text both are escaped JSON,
    never a line of their own or a bare quote."""
    if _OPENAI_DONE.search(raw) is not None:
        return True
    if _FINISH_REASON.search(raw) is None:  # (no chunk parsed when no choice ended at all)
        return False
    open_choices: set[object] = set()
    ended: set[object] = set()
    for data in _event_data(raw):
        try:
            chunk = json.loads(data)
        except (ValueError, RecursionError):
            continue
        choices = chunk.get("choices") if isinstance(chunk, dict) else None
        for choice in choices if isinstance(choices, list) else ():
            if isinstance(choice, dict):
                index = choice.get("index", 0)
                index = index if isinstance(index, (int, str)) else repr(index)
                open_choices.add(index)
                if isinstance(choice.get("finish_reason"), str):  # (null until the choice ends)
                    ended.add(index)
    return bool(ended) and open_choices <= ended


# a stream that began with one of these and has not reached its end was cut off: (a marker every
# stream of the kind has near its start, whether the stream reached its proper end)
_CUT_OFF: tuple[tuple[bytes, Callable[[bytes], bool]], ...] = (
    (b'"message_start"', lambda raw: b'"message_stop"' in raw),  # Anthropic Messages
    (b'"response.created"', lambda raw: _RESPONSES_END.search(raw) is not None),  # Responses API
    # OpenAI Chat Completions and legacy Completions chunks
    (b'"chat.completion.chunk"', _openai_ended),
    (b'"text_completion"', _openai_ended))


def stream_error(raw: bytes) -> dict[str, Any] | None:
    """The error that ended a server-sent-events answer begun with a 2xx, as a JSON error body
    (`{"error": {...}}`, for `signals.provider_code`), or None when it ended as it should.

    - An error event: Anthropic `event: error` with `{"type": "error", "error": {"type":
      "overloaded_error", ...}}` after its 200 (docs.anthropic.com/en/api/messages-streaming,
      "Error events"); OpenAI Chat Completions a data line `{"error": {...}}`; the Responses API
      `{"type": "error", "code": ..., "message": ...}` or `{"type": "response.failed", "response":
      {"error": {...}}}`. The SDKs raise an APIError on each. Only the last STREAM_ERROR_EVENTS
      events with data are read (an error ends the stream; pings after it are skipped), and only a
      top-level error counts (text the model wrote is nested inside `choices`/`delta`).
    - A stream cut off: one that began as an Anthropic Messages, a Responses API, an OpenAI Chat
      Completions or legacy Completions stream and holds none of its end events (`message_stop`;
      `response.completed` / `.incomplete` / `.failed`; the `data: [DONE]` line or a
      `finish_reason` for every choice, `_openai_ended`): `{"error": {"type": "stream_cut_off"}}`. (A re-run of a provider trial:
      such answers were stored `succeeded`, cut off.)"""
    seen = 0
    for data in _event_data_last_first(raw, {b"data"} if b"data" in raw else set()):
        if data.strip() == b"[DONE]" or b'"ping"' in data:
            continue
        seen += 1
        if seen > STREAM_ERROR_EVENTS:
            break
        if b'"error' not in data and b"response.failed" not in data:
            continue
        try:
            event = json.loads(data)
        except (ValueError, RecursionError):
            continue
        if not isinstance(event, dict):
            continue
        if isinstance(event.get("error"), dict):
            return {"error": event["error"]}
        if event.get("type") == "error":  # the Responses API: the error's fields on the event itself
            return {"error": {key: event[key] for key in ("code", "message", "param") if key in event}}
        failed = event.get("response") if event.get("type") == "response.failed" else None
        if isinstance(failed, dict) and isinstance(failed.get("error"), dict):
            return {"error": failed["error"]}
    for start, reached_end in _CUT_OFF:
        if start in raw and not reached_end(raw):
            return {"error": {"type": "stream_cut_off", "message": "the stream ended before its end event"}}
    return None


# keys a body that is only an error may have beside `error` (OpenAI, Anthropic's `"type": "error"`,
# one-api/new-api style proxies, FastAPI's `detail`)
_ERROR_ONLY_KEYS = frozenset({"error", "type", "object", "id", "request_id", "code", "message", "msg", "status",
                              "success", "detail", "model", "created", "log_id", "error_code", "error_msg"})


def error_body(status: int, body: object) -> dict[str, Any] | None:
    """The error of a 2xx answer whose JSON body is only an error, as `{"error": {...}}` (for
    `signals.provider_code`), or None. Some proxies pass a provider's error on with a 200
    (`{"error": {"type": "rate_limit_error", "code": "rate_limit_exceeded", ...}}`): it was
    stored `succeeded` with no answer, and a rate limit told so never slowed the key (a provider
    trial: 40 of 40 jobs `succeeded`). Only a body whose `error` is an object saying something
    (a message, code or type), a non-empty string, or Baidu Qianfan's `error_code` /
    `error_msg` pair, and that has no key beside those of an error (`_ERROR_ONLY_KEYS`: no
    `choices`, `data`, `output`, `content`, `result`, ...) counts; an Anthropic-style `type`
    must be "error". Any other body, and any other status, gives None. The executor classifies it by
    its code, but never as key-scoped (an upstream echoing its request would let a job word it)."""
    if not 200 <= status < 300 or not isinstance(body, dict):
        return None
    error = body.get("error")
    if isinstance(error, str) and error.strip():  # `{"error": "text"}`
        error = {"message": error}
    elif error is None and body.get("error_code") and isinstance(body.get("error_msg"), str):
        error = {"code": str(body["error_code"]), "message": body["error_msg"]}  # Baidu Qianfan's 200
    if not isinstance(error, dict) or not any(error.get(field) for field in ("message", "code", "type")):
        return None
    if not body.keys() <= _ERROR_ONLY_KEYS or body.get("type", "error") != "error":
        return None
    return {"error": error}

