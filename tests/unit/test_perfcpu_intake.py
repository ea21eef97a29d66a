"""The job checks intake runs per message, made cheaper, still decide as before:
the depth walk is skipped only when the text cannot nest deeper than MAX_JSON_DEPTH, the
path check finds the same characters, and an invalid job still names its id and batch."""

from __future__ import annotations

import json

import pytest
from hypothesis import given
from hypothesis import strategies as st

from ratefleet.schemas import ErrorCode, JobRejected, parse_job
from ratefleet.schemas.job import check_path
from ratefleet.schemas.wire import MAX_JSON_DEPTH, json_problem


def nested(depth: int, kind: str):
    value: object = 1
    for _ in range(depth):
        value = [value] if kind == "list" else ({"a": value} if kind == "dict" else (value,))
    return value


@pytest.mark.parametrize("kind", ["list", "dict", "tuple"])
def test_depth_at_the_limit_passes_and_one_more_level_fails(kind):
    assert json_problem(nested(MAX_JSON_DEPTH, kind)) is None
    problem = json_problem(nested(MAX_JSON_DEPTH + 1, kind))
    assert problem is not None and "deep" in problem


def test_brackets_inside_strings_do_not_make_a_shallow_value_too_deep():
    assert json_problem({"text": "[{" * 500, "list": ["]}" * 300]}) is None


@given(st.text(alphabet=st.sampled_from("/ab.%5C\\\x00\x1f\x7f\x80 ?=2e"), max_size=30))
def test_path_check_refuses_exactly_backslashes_and_control_characters(tail):
    from urllib.parse import unquote

    path = "/" + tail
    decoded = path
    for _ in range(3):
        decoded = unquote(decoded)
    has_bad = any(ord(c) < 0x20 or c in "\\\x7f" for c in decoded)  # the rule as first written
    try:
        check_path(path)
        refused = None
    except Exception as exc:  # noqa: BLE001 - pydantic custom error: its message says why
        refused = str(exc)
    if has_bad:
        assert refused is not None and "backslashes or control characters" in refused
    elif refused is not None:
        assert "backslashes or control characters" not in refused


def test_an_invalid_job_still_names_its_id_and_batch():
    raw = json.dumps({"id": "job-7", "batch": "b1", "request": {"path": "no-slash"}}).encode()
    with pytest.raises(JobRejected) as caught:
        parse_job(raw)
    assert (caught.value.job_id, caught.value.batch) == ("job-7", "b1")
    assert caught.value.code == ErrorCode.FORBIDDEN_TARGET


def test_a_valid_job_parses_with_its_body_and_metadata():
    raw = json.dumps({"id": "job-8", "request": {"path": "/v1/x", "json": {"messages": [{"c": "[["}]}},
                      "metadata": {"k": [1, 2]}}).encode()
    job = parse_job(raw)
    assert job.request.json_body == {"messages": [{"c": "[["}]} and job.metadata == {"k": [1, 2]}
