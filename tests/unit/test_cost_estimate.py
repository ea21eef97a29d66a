"""A job without `cost` is charged an estimate of its tokens (schemas/cost.py)."""

from __future__ import annotations

import pytest

from ratefleet.schemas.cost import IMAGE_TOKENS, estimate_tokens
from ratefleet.schemas.job import Job

CHAT = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "x" * 400}]}  # 100 tokens of text


@pytest.mark.parametrize(("body", "tokens"), [
    (CHAT, 100 + 4),  # "gpt-4o-mini", "user": 15 characters more
    ({**CHAT, "max_tokens": 500}, 104 + 500),
    ({**CHAT, "max_completion_tokens": 500, "n": 3}, 104 + 1500),
    ({"contents": [{"parts": [{"text": "x" * 40}]}], "generationConfig": {"maxOutputTokens": 64}}, 10 + 64),
    ({"model": "m", "messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "data:image/png;base64," + "A" * 1_000_000}}]}]},
     IMAGE_TOKENS + 4),  # 14 characters of text; the inline image is one image, not 250,000 tokens
    ({"max_tokens": True}, 1),  # not a number of tokens
    ({}, 1),
])
def test_estimate_is_text_over_four_plus_the_output_asked_for(body, tokens):
    assert estimate_tokens(body) == tokens


def test_a_text_body_counts_its_characters():
    assert estimate_tokens(None, "y" * 4000) == 1000


def test_a_job_is_charged_its_own_cost_when_it_gives_one_else_the_estimate():
    request = {"path": "/v1/chat/completions", "json": {**CHAT, "max_tokens": 500}}
    assert Job.model_validate({"request": request}).charge() == 604  # before: 1 for every job
    assert Job.model_validate({"request": request, "cost": 0}).charge() == 0
    assert Job.model_validate({"request": request, "cost": 7.5}).charge() == 7.5
    assert "cost" not in Job.model_validate({"request": request}).to_json().decode()
