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
from collections.abc import Iterator
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


STREAM_ERROR_EVENTS = 3  # the last events with data a stream's error is looked for in


def stream_error(raw: bytes) -> dict[str, Any] | None:
    """The error event that ended a server-sent-events answer begun with a 2xx, as a JSON
    error body (`{"error": {...}}`, for `signals.provider_code`), or None when it ended
    without one. Anthropic sends `event: error` with `{"type": "error", "error": {"type":
    "overloaded_error", ...}}` after its 200 (docs.anthropic.com/en/api/messages-streaming,
    "Error events"); OpenAI a data line `{"error": {...}}`; both SDKs raise an APIError on such
    an event, so the answer is not a success. Only the last STREAM_ERROR_EVENTS events with data
    are read (an error ends the stream), and only a top-level `error` object counts (text the
    model wrote is nested inside `choices`/`delta`)."""
    seen = 0
    for data in _event_data_last_first(raw, {b"data"} if b"data" in raw else set()):
        if data.strip() == b"[DONE]":
            continue
        seen += 1
        if seen > STREAM_ERROR_EVENTS:
            return None
        if b'"error"' not in data:
            continue
        try:
            event = json.loads(data)
        except (ValueError, RecursionError):
            continue
        if isinstance(event, dict) and isinstance(event.get("error"), dict):
            return {"error": event["error"]}
    return None
