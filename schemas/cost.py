"""What a job costs when it does not say: an estimate of its tokens.

A key's `cost_per_minute` bucket is charged a job's `cost` when the job is dispatched and
corrected by the answer's usage (`usage_path`) when it is back. A job without `cost` is
charged `estimate_tokens(request)`: the characters of the strings in its JSON body / 4
(OpenAI's rule of thumb for English text), plus the output it may ask for: `max_tokens`,
`max_completion_tokens` or `max_output_tokens` (Gemini's `generationConfig.maxOutputTokens`),
times `n` choices. This is how the providers charge a tokens-per-minute limit on entry
(OpenAI: the prompt's estimated tokens plus max_tokens; Anthropic reserves max_tokens of
output), so a batch whose jobs give no cost is paced by their size, not by 1 per job.

Inline data (strings starting with "data:", e.g. base64 images) counts IMAGE_TOKENS, not its
characters: a 1 MB image is ~1,000 tokens to the providers, not 250,000.
"""

from __future__ import annotations

import math
from typing import Any

CHARS_PER_TOKEN = 4
IMAGE_TOKENS = 1000  # an inline image or file ("data:..."): the order of what providers count for one
_OUTPUT_FIELDS = ("max_tokens", "max_completion_tokens", "max_output_tokens", "maxOutputTokens")
_MAX_DEPTH = 100  # jobs nest at most this deep (schemas/job.py); deeper parts are not counted


def estimate_tokens(json_body: Any, text_body: str | None = None) -> int:
    """Tokens a request may use (see module docstring), at least 1: its text's characters / 4
    plus its output limit times `n`. `json_body`: the request's JSON (None if it has none);
    `text_body`: its body as text when it is not JSON."""
    chars = _text_chars(json_body, 0) if json_body is not None else len(text_body or "")
    return max(1, math.ceil(chars / CHARS_PER_TOKEN) + _output_tokens(json_body))


def _text_chars(value: Any, depth: int) -> int:
    if isinstance(value, str):
        return IMAGE_TOKENS * CHARS_PER_TOKEN if value.startswith("data:") else len(value)
    if depth >= _MAX_DEPTH:
        return 0
    if isinstance(value, dict):
        return sum(_text_chars(item, depth + 1) for item in value.values())
    if isinstance(value, list):
        return sum(_text_chars(item, depth + 1) for item in value)
    return 0


def _whole(value: Any) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else None


def _output_tokens(body: Any) -> int:
    """The output a JSON body asks for at most: its first output limit times `n` (0: none)."""
    if not isinstance(body, dict):
        return 0
    config = body.get("generationConfig")
    scopes = (body, config) if isinstance(config, dict) else (body,)
    for scope in scopes:
        for name in _OUTPUT_FIELDS:
            limit = _whole(scope.get(name))
            if limit is not None:
                return limit * (_whole(body.get("n")) or 1)
    return 0
