"""`read_json` (schemas/wire.py): a job's JSON text parsed once, and the encoder pass of
`json_problem` skipped only where it cannot find anything but depth. The verdicts of
`parse_job` (intake, rpc) and `job_from_text` (the worker) must be exactly those of the full
check, whatever the text."""

from __future__ import annotations

import json
import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from ratefleet.schemas import Job, JobRejected, parse_job
from ratefleet.schemas import job as job_module
from ratefleet.schemas.job import job_from_text
from ratefleet.schemas.wire import MAX_JSON_DEPTH, read_json

PLAIN = b'{"request": {"path": "/v1/chat/completions", "query": {"v": [1, 2.5]}, "json": {"model": "m", ' \
        b'"temperature": 0.7, "messages": [{"role": "user", "content": "caf\xc3\xa9 \xf0\x9f\x98\x80 \\"hi\\" ' \
        b'\\u00e9"}]}}, "metadata": {"row": 1.5, "tags": ["a"]}}'


def verdict(raw: bytes) -> tuple[str, object]:
    try:
        return "ok", parse_job(raw).model_dump(mode="json", by_alias=True)
    except JobRejected as exc:
        return exc.code, exc.message


def full_check_verdict(raw: bytes, monkeypatch: pytest.MonkeyPatch) -> tuple[str, object]:
    """The verdict with every text taken as not strict: json.loads and the full json_problem."""
    with monkeypatch.context() as patched:
        patched.setattr(job_module, "read_json", lambda data: (json.loads(data), False))
        return verdict(raw)


@pytest.mark.parametrize("raw, strict", [
    (PLAIN, True),  # UTF-8 text, an escape that is not a surrogate, finite floats
    (b'{"a": [1, 2.5e10, -0.0, 1e-999, 12345678901234567890123]}', True),  # underflow is 0.0, finite
    (b'{"a": NaN}', False), (b'{"a": Infinity}', False), (b'{"a": [-Infinity]}', False),
    (b'{"a": 1e999}', False), (b'{"a": -1e400}', False),  # overflow to infinity
    (b'{"a": "\\ud83d"}', False), (b'{"a": "\\udc80x"}', False),  # lone surrogates, escaped
    (b'{"a": "\\ud83d\\ude00"}', False),  # a valid pair takes the full check too
    (b'{"a": "\\uD800"}', False), (b'{"a": "\\uDbFf\\uDfFf"}', False),  # upper- and mixed-case hex
    (b'{"\\udc80": 1}', False),  # in a key
    (b'\xef\xbb\xbf{"a": 1}', False),  # a UTF-8 BOM: json.loads(bytes) reads it, json.loads(str) does not
    ('{"a": "é"}'.encode("utf-16"), False),  # json.loads detects UTF-16 from the bytes
])
def test_read_json_gives_json_loads_value_and_says_when_it_is_strict(raw, strict):
    value, found = read_json(raw)
    expected = json.loads(raw)
    assert found is strict
    assert json.dumps(value, allow_nan=True) == json.dumps(expected, allow_nan=True)


@pytest.mark.parametrize("raw", [b"", b"{", b'{"a": 1', b"[1,]", b'{"a": 1' + b"0" * 5000 + b"}", b"\xff\xfe\x00",
                                 b'{"a": "caf\xe9"}'])  # (the last: latin-1, not UTF-8)
def test_read_json_raises_what_json_loads_raises(raw):
    with pytest.raises(ValueError) as expected:
        json.loads(raw)
    with pytest.raises(type(expected.value)) as caught:
        read_json(raw)
    assert str(caught.value) == str(expected.value)


def test_a_strict_text_is_not_encoded_again(monkeypatch):
    """The point of read_json: a valid job's body is not run through the encoder a second time
    (`json_problem`, a few ms per MiB on every job at intake and again at the worker)."""
    def refuse(*_args, **_kwargs):
        raise RuntimeError("json_problem ran on a strict text")  # (not a ValueError: pydantic would take it)

    monkeypatch.setattr(job_module, "json_problem", refuse)
    job = parse_job(PLAIN)  # the body, metadata and query values all take the fast path
    assert job.request.json_body["messages"][0]["content"] == 'café 😀 "hi" é' and job.metadata["row"] == 1.5
    text = PLAIN.decode()
    assert job_from_text(text).request.json_body["temperature"] == 0.7
    with pytest.raises(RuntimeError, match="strict text"):  # not strict: the full check runs
        parse_job(b'{"request": {"path": "/x", "json": {"a": "\\ud83d\\ude00"}}}')


@pytest.mark.parametrize("raw", [
    PLAIN,
    b'{"request": {"path": "/x", "json": {"a": NaN}}}',
    b'{"request": {"path": "/x", "json": [1, 1e999]}}',
    b'{"request": {"path": "/x", "query": {"t": [1, -Infinity]}}, "metadata": {"s": 1}}',
    b'{"request": {"path": "/x"}, "metadata": {"s": Infinity}}',
    b'{"request": {"path": "/x", "json": {"a": "\\ud83d"}}}',
    b'{"request": {"path": "/x", "json": {"a": "\\ud83d\\ude00"}}}',
    b'{"request": {"path": "/x", "json": "\\uD800"}}',
    b'{"request": {"path": "/x", "json": "\\uDBFF\\uDFFF"}}',
    b'{"request": {"path": "/x"}, "metadata": {"\\uDC80": 1}}',
    b'{"request": {"path": "/x", "query": {"\\ud800": "v"}}}',
    b'{"request": {"path": "/x", "json": %s}}' % (b"[" * MAX_JSON_DEPTH + b"]" * MAX_JSON_DEPTH),
    b'{"request": {"path": "/x", "json": {"deep": %s}}}' % (b"[" * (MAX_JSON_DEPTH + 1) + b"]" * (MAX_JSON_DEPTH + 1)),
    b'{"request": {"path": "/x", "query": {"q": "v"}}, "metadata": {"m": %s}}' % (b"{\"a\":" * 101 + b"1" + b"}" * 101),
    b'{"request": {"path": "/x", "json": {"n": 1%s}}}' % (b"0" * 5000),
    b'{"request": {"path": "/x", "json": 1}, "cost": 1e999}',
    b'\xef\xbb\xbf{"request": {"path": "/x"}}',
    b'[1, 2]',
])
def test_parse_job_gives_the_full_checks_verdict(raw, monkeypatch):
    assert verdict(raw) == full_check_verdict(raw, monkeypatch)


def test_too_deep_a_strict_text_is_refused_with_the_path():
    raw = b'{"request": {"path": "/x", "json": {"deep": %s}}}' % (b"[" * 150 + b"]" * 150)
    assert read_json(raw)[1] is True
    with pytest.raises(JobRejected, match=r"\$\.deep.* is nested more than 100 levels deep"):
        parse_job(raw)


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(st.characters(codec=None, exclude_categories=()), max_size=8),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=4), inner, max_size=4),
    max_leaves=20)


@settings(max_examples=300, deadline=None)
@given(body=json_values, metadata=st.dictionaries(st.text(max_size=3), json_values, max_size=2),
       ascii_only=st.booleans())
def test_any_job_text_gets_the_full_checks_verdict(body, metadata, ascii_only):
    """Whatever a producer's encoder writes (lone surrogates, NaN, Infinity, escaped or raw
    UTF-8), parse_job and the worker's job_from_text decide as the full check does."""
    raw_text = json.dumps({"request": {"path": "/x", "json": body}, "metadata": metadata}, ensure_ascii=ascii_only)
    try:
        raw = raw_text.encode("utf-8")
    except UnicodeEncodeError:  # a lone surrogate written raw (ensure_ascii=False) cannot be UTF-8 bytes
        raw = raw_text.encode("utf-8", "surrogatepass")
    with pytest.MonkeyPatch.context() as patched:
        assert verdict(raw) == full_check_verdict(raw, patched)
    try:
        old = Job.model_validate(json.loads(raw))
    except (ValidationError, ValueError, RecursionError):
        old = None
    try:
        new = job_from_text(raw.decode("utf-8", "surrogatepass"))
    except ValidationError:
        new = None
    assert (old is None) == (new is None)
    if old is not None and new is not None:
        assert old.model_dump_json() == new.model_dump_json()


def test_job_from_text_raises_validation_errors_for_what_is_not_a_job():
    for text in ("{", "[]", '{"request": {"path": "/x", "json": NaN}}', '{"request": {"path": "/x", "json": "\ud83d"}}',
                 '{"request": {"path": "/x", "json": %s}}' % ("[" * 300 + "]" * 300)):
        with pytest.raises(ValidationError):
            job_from_text(text)
    assert math.isclose(job_from_text('{"request": {"path": "/x"}, "cost": 2.5}').cost, 2.5)
