"""OpenAI-shaped bodies the mock answers with: completions, embeddings, models, errors.

Each endpoint builder takes the parsed request body and the token count to report (None:
sized from the request, see `Sizing`), and raises `ValueError` for a request OpenAI would
refuse with 400.
"""

from __future__ import annotations

import hashlib
import math
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


CHARS_PER_TOKEN = 4  # OpenAI's rule of thumb for English text: what the mock counts as one token
_MAX_OUTPUT_FIELDS = ("max_completion_tokens", "max_tokens")


def count_tokens(text: str) -> int:
    """Tokens the mock counts for `text`: its characters / CHARS_PER_TOKEN, rounded up."""
    return math.ceil(len(text) / CHARS_PER_TOKEN)


def max_output(body: dict[str, Any]) -> int | None:
    """The most output tokens a request allows per choice (`max_completion_tokens` or
    `max_tokens`), or None when it names no limit."""
    for name in _MAX_OUTPUT_FIELDS:
        value = body.get(name)
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            return value
    return None


def _split_usage(total: int) -> dict[str, int]:
    completion = total // 2
    return {"prompt_tokens": total - completion, "completion_tokens": completion, "total_tokens": total}


def _usage(prompt: int, completion: int) -> dict[str, int]:
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def request_charge(body: dict[str, Any]) -> int:
    """What a provider's tokens-per-minute limit charges a request when it arrives (OpenAI:
    the prompt's estimated tokens plus `max_tokens` for each of the `n` choices; Anthropic
    reserves `max_tokens` of output the same way): the prompt's tokens plus, per choice, the
    request's output limit, or when it names none the tokens the mock's answer will have."""
    messages = body.get("messages")
    if isinstance(messages, list):
        prompt = count_tokens(_prompt_text(messages))
        n = body.get("n") if isinstance(body.get("n"), int) and not isinstance(body.get("n"), bool) else 1
        output = max_output(body)
        if output is None:
            output = _completion_tokens(body, _answer_text(messages))
        return prompt + max(1, n) * output
    return count_tokens(_input_text(body.get("input")))


def _prompt_text(messages: list[Any]) -> str:
    return "".join(_text_of(m.get("content")) for m in messages if isinstance(m, dict))


def _input_text(raw: Any) -> str:
    inputs = [raw] if isinstance(raw, str) else raw if isinstance(raw, list) else []
    return "".join(item for item in inputs if isinstance(item, str))


def _answer_text(messages: list[Any]) -> str:
    last_user = next((m for m in reversed(messages) if isinstance(m, dict) and m.get("role") == "user"), {})
    return "echo: " + _text_of(last_user.get("content"))


def _completion_tokens(body: dict[str, Any], answer: str) -> int:
    """Output tokens of one choice: the body's `"mock": {"completion_tokens": N}` or the
    answer's own, at most the request's output limit."""
    directive = body.get("mock")
    asked = directive.get("completion_tokens") if isinstance(directive, dict) else None
    tokens = asked if isinstance(asked, int) and not isinstance(asked, bool) else count_tokens(answer)
    limit = max_output(body)
    return tokens if limit is None else min(tokens, limit)


def chat_completion(body: dict[str, Any], tokens: int | None) -> dict[str, Any]:
    """A completion whose answer echoes the last user message, in `n` choices (OpenAI: 1 to 128).
    Its usage is `tokens` split in two, or with `tokens` None the prompt's tokens (characters / 4)
    and each choice's output (`_completion_tokens`)."""
    messages = body.get("messages", [])
    if not isinstance(messages, list):
        raise ValueError("'messages' must be an array")
    n = body.get("n", 1)
    if n is None:
        n = 1
    if isinstance(n, bool) or not isinstance(n, int) or not 1 <= n <= 128:
        raise ValueError("'n' must be a whole number from 1 to 128")
    answer = _answer_text(messages)
    if tokens is None:
        usage = _usage(count_tokens(_prompt_text(messages)), n * _completion_tokens(body, answer))
    else:
        usage = _split_usage(tokens)
    return {
        "id": "chatcmpl-mock-" + uuid.uuid4().hex[:24],
        "object": "chat.completion",
        "created": int(time.time()),
        "model": str(body.get("model") or "mock"),
        "choices": [
            {
                "index": index,
                "message": {"role": "assistant", "content": answer},
                "finish_reason": "stop",
            }
            for index in range(n)
        ],
        "usage": usage,
    }


def _vector(text: str) -> list[float]:
    digest = hashlib.sha256(text.encode()).digest()
    return [round(byte / 255.0 * 2.0 - 1.0, 6) for byte in digest[:EMBEDDING_SIZE]]


def embeddings(body: dict[str, Any], tokens: int | None) -> dict[str, Any]:
    """Small deterministic vectors, one per input string; usage `tokens`, or with None the
    inputs' characters / 4."""
    raw = body.get("input")
    inputs = [raw] if isinstance(raw, str) else raw
    if not isinstance(inputs, list) or not inputs or not all(isinstance(item, str) for item in inputs):
        raise ValueError("'input' must be a string or a non-empty array of strings")
    used = count_tokens("".join(inputs)) if tokens is None else tokens
    return {
        "object": "list",
        "data": [
            {"object": "embedding", "index": index, "embedding": _vector(text)}
            for index, text in enumerate(inputs)
        ],
        "model": str(body.get("model") or "mock-embedding"),
        "usage": {"prompt_tokens": used, "total_tokens": used},
    }


def models(body: dict[str, Any], tokens: int | None) -> dict[str, Any]:
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
