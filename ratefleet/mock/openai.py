"""OpenAI-shaped bodies the mock answers with: completions, embeddings, models, errors.

Each endpoint builder takes the parsed request body and the token count to report, and
raises `ValueError` for a request OpenAI would refuse with 400.
"""

from __future__ import annotations

import hashlib
import time
import uuid
from typing import Any

EMBEDDING_SIZE = 8

_ERROR_TYPES = {
    400: ("invalid_request_error", None),
    401: ("invalid_request_error", "invalid_api_key"),
    403: ("invalid_request_error", "permission_denied"),
    404: ("invalid_request_error", "unknown_url"),
    405: ("invalid_request_error", "method_not_allowed"),
    429: ("requests", "rate_limit_exceeded"),
}


def error_body(status: int, message: str, *, error_type: str | None = None) -> dict[str, Any]:
    """``{"error": {"message", "type", "code"}}`` as OpenAI sends it."""
    default_type, code = _ERROR_TYPES.get(status, ("server_error" if status >= 500 else "invalid_request_error", None))
    return {"error": {"message": message, "type": error_type or default_type, "code": code}}


def _text_of(content: Any) -> str:
    """Text of a message content: a string, or a list of parts with "text"."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "".join(part.get("text", "") for part in content if isinstance(part, dict))
    return ""


def _split_usage(total: int) -> dict[str, int]:
    completion = total // 2
    return {"prompt_tokens": total - completion, "completion_tokens": completion, "total_tokens": total}


def chat_completion(body: dict[str, Any], tokens: int) -> dict[str, Any]:
    """A completion whose answer echoes the last user message, in `n` choices (OpenAI: 1 to 128)."""
    messages = body.get("messages", [])
    if not isinstance(messages, list):
        raise ValueError("'messages' must be an array")
    n = body.get("n", 1)
    if n is None:
        n = 1
    if isinstance(n, bool) or not isinstance(n, int) or not 1 <= n <= 128:
        raise ValueError("'n' must be a whole number from 1 to 128")
    last_user = next(
        (m for m in reversed(messages) if isinstance(m, dict) and m.get("role") == "user"),
        {},
    )
    return {
        "id": "chatcmpl-mock-" + uuid.uuid4().hex[:24],
        "object": "chat.completion",
        "created": int(time.time()),
        "model": str(body.get("model") or "mock"),
        "choices": [
            {
                "index": index,
                "message": {"role": "assistant", "content": "echo: " + _text_of(last_user.get("content"))},
                "finish_reason": "stop",
            }
            for index in range(n)
        ],
        "usage": _split_usage(tokens),
    }


def _vector(text: str) -> list[float]:
    digest = hashlib.sha256(text.encode()).digest()
    return [round(byte / 255.0 * 2.0 - 1.0, 6) for byte in digest[:EMBEDDING_SIZE]]


def embeddings(body: dict[str, Any], tokens: int) -> dict[str, Any]:
    """Small deterministic vectors, one per input string."""
    raw = body.get("input")
    inputs = [raw] if isinstance(raw, str) else raw
    if not isinstance(inputs, list) or not inputs or not all(isinstance(item, str) for item in inputs):
        raise ValueError("'input' must be a string or a non-empty array of strings")
    return {
        "object": "list",
        "data": [
            {"object": "embedding", "index": index, "embedding": _vector(text)}
            for index, text in enumerate(inputs)
        ],
        "model": str(body.get("model") or "mock-embedding"),
        "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
    }


def models(body: dict[str, Any], tokens: int) -> dict[str, Any]:
    """The one model the mock pretends to serve (plus its embedding twin)."""
    del body, tokens
    return {
        "object": "list",
        "data": [
            {"id": name, "object": "model", "created": 0, "owned_by": "ratefleet-mock"}
            for name in ("mock", "mock-embedding")
        ],
    }


def chat_completion_chunks(completion: dict[str, Any], include_usage: bool = False) -> list[dict[str, Any]]:
    """A completion as the `chat.completion.chunk` objects OpenAI streams for `"stream": true`
    (API reference, "The chat completion chunk object"): for each choice, the role, then the
    answer a word at a time, then an empty delta with the finish reason. `include_usage`
    (`stream_options.include_usage`): every chunk has `"usage": null` and a last chunk with no
    choices carries the usage, as OpenAI streams it."""
    chunks = []
    for choice in completion["choices"]:
        index = choice["index"]
        words = choice["message"]["content"].split(" ")
        deltas = [{"role": "assistant", "content": ""}]
        deltas += [{"content": word if i == 0 else " " + word} for i, word in enumerate(words)]
        chunks += [{"index": index, "delta": delta, "finish_reason": None} for delta in deltas]
        chunks.append({"index": index, "delta": {}, "finish_reason": choice["finish_reason"]})
    base = {key: completion[key] for key in ("id", "created", "model")}
    extra = {"usage": None} if include_usage else {}
    events = [{**base, "object": "chat.completion.chunk", "choices": [chunk], **extra} for chunk in chunks]
    if include_usage:
        events.append({**base, "object": "chat.completion.chunk", "choices": [], "usage": completion["usage"]})
    return events
