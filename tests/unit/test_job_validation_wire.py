"""What cannot go on the wire is refused by the Job model, with the field path and why,
at every door (parse_job for intake and rpc, Client.as_job, `ratefleet submit` lines);
and what the leader or a worker writes (Results, dead letters) always serialises."""

from __future__ import annotations

import json
import math
from datetime import UTC, datetime

import httpx
import pytest

from ratefleet.batchfile import LineError, parse_line
from ratefleet.client import as_job
from ratefleet.dispatcher.shell.intake import validate_job
from ratefleet.schemas import ErrorCode, Job, JobRejected, ResponseInfo, Result, UpstreamConfig, parse_job
from ratefleet.schemas.config import parse_config
from ratefleet.schemas.errors import InvalidRequest, JobInvalid
from ratefleet.schemas.wire import MAX_JSON_DEPTH, dumps_safe, json_problem
from ratefleet.workers.executor import UpstreamExecutor

LONE = "\ud83d"  # half of a surrogate pair: not Unicode text, cannot be UTF-8


def raw_job(request: dict | None = None, **top) -> bytes:
    """A job as JSON text; lone surrogates go out escaped (`"\\ud83d"`), as any JSON encoder writes them."""
    return json.dumps({"request": {"path": "/v1/chat/completions", **(request or {})}, **top}).encode()


def rejected(raw: bytes) -> JobRejected:
    with pytest.raises(JobRejected) as caught:
        parse_job(raw)
    json.dumps(caught.value.message).encode("utf-8")  # the message itself can always be sent
    caught.value.message.encode("utf-8")
    return caught.value


# -- header names: RFC 9110 section 5.1 field-name = token ----------------------------------

@pytest.mark.parametrize("name", [
    "Authorization:", "Authorization: ", " authorization", "AUTHORIZATION", "Proxy-Authorization",
    "proxy-authorization:", "x-api-key", "X-API-KEY:", "api-key", "Api-Key", "X-Goog-Api-Key", "Host:", "cookie",
])
def test_auth_like_header_names_are_forbidden_however_spelled(name):
    error = rejected(raw_job({"headers": {name: "Bearer sk-caller"}}))
    assert error.code == ErrorCode.FORBIDDEN_TARGET, error.message
    assert "request.headers" in error.message and "set by ratefleet" in error.message


@pytest.mark.parametrize("name", ["X Title", "X-Title:", "", "Ünïcode", "X-" + LONE, "a\r\nHost", "x\x00y",
                                  "(x)", "a/b", "x@y", "[x]"])
def test_header_names_that_are_not_tokens_are_refused(name):
    error = rejected(raw_job({"headers": {name: "v"}}))
    assert error.code == ErrorCode.INVALID_JOB, error.message
    assert "request.headers" in error.message and "RFC 9110 token" in error.message


@pytest.mark.parametrize("name", ["X-Title", "x_title", "X.Trace", "a!#$%&'*+-.^_`|~9", "Content-Type"])
def test_token_header_names_are_accepted(name):
    assert parse_job(raw_job({"headers": {name: "v"}})).request.headers == {name: "v"}


# -- header values: RFC 9110 section 5.5 field-value ----------------------------------------

@pytest.mark.parametrize("value, why", [
    ("Café – 日本語", "'–' (U+2013) at character 5"),
    ("日本語", "U+65E5"),
    ("emoji 😀", "U+1F600"),
    (LONE, "U+D83D"),
    ("a\r\nHost: evil.example", "line break"),
    ("a\nb", "line break"),
    ("nul\x00", "control character U+0000"),
    ("bell\x07", "control character U+0007"),
    ("del\x7f", "control character U+007F"),
    (" leading", "whitespace"),
    ("trailing\t", "whitespace"),
])
def test_header_values_outside_field_value_syntax_are_refused_with_why(value, why):
    error = rejected(raw_job({"headers": {"X-Title": value}}))
    assert error.code == ErrorCode.INVALID_JOB
    assert "request.headers" in error.message and "'X-Title'" in error.message and why in error.message, error.message


@pytest.mark.parametrize("value", ["plain ascii", "Café", "tab\tinside", "", "!\"#~", "\xff obs-text"])
def test_header_values_in_field_value_syntax_are_accepted(value):
    assert parse_job(raw_job({"headers": {"X-Title": value}})).request.headers["X-Title"] == value


# -- lone surrogates anywhere -----------------------------------------------------------------

@pytest.mark.parametrize("payload, where", [
    (raw_job({"path": "/v1/" + LONE}), "request.path"),
    (raw_job({"query": {"q": LONE}}), "request.query"),
    (raw_job({"query": {LONE: "v"}}), "request.query"),
    (raw_job({"query": {"q": ["a", LONE]}}), "request.query"),
    (raw_job({"json": {"messages": [{"role": "user", "content": "hi " + LONE}]}}), "$.messages[0].content"),
    (raw_job({"json": {"a": {LONE: 1}}}), "$.a has a key"),
    (raw_job({"json": LONE}), "request.json"),
    (raw_job({"json": None, "body": "x\udc80"}), "request.body"),
    (raw_job(metadata={"user": {"name": LONE}}), "$.user.name"),
    (raw_job(upstream=LONE), "upstream"),
])
def test_lone_surrogates_are_refused_wherever_they_are(payload, where):
    assert b"\\ud83d" in payload or b"\\udc80" in payload  # escaped in the JSON text, as a producer sends it
    error = rejected(payload)
    assert error.code == ErrorCode.INVALID_JOB and where in error.message, error.message


def test_an_extra_field_named_with_a_lone_surrogate_gives_a_message_that_can_be_sent():
    error = rejected(raw_job(**{LONE: 1}))
    assert error.code == ErrorCode.INVALID_JOB and error.message.startswith("job:")


# -- NaN, Infinity, huge numbers, deep nesting ------------------------------------------------

@pytest.mark.parametrize("payload, where", [
    (b'{"request": {"path": "/x", "json": {"temperature": NaN}}}', "$.temperature is nan"),
    (b'{"request": {"path": "/x", "json": [1, Infinity]}}', "$[1] is inf"),
    (b'{"request": {"path": "/x", "json": {"a": -Infinity}}}', "$.a is -inf"),
    (b'{"request": {"path": "/x", "json": {"a": 1e400}}}', "$.a is inf"),  # overflows a 64-bit float
    (b'{"request": {"path": "/x"}, "metadata": {"score": NaN}}', "metadata"),
    (b'{"request": {"path": "/x", "query": {"t": NaN}}}', "request.query"),
    (b'{"request": {"path": "/x", "query": {"t": [1, -Infinity]}}}', "request.query"),
])
def test_nan_and_infinity_are_refused_not_sent_as_null(payload, where):
    error = rejected(payload)
    assert error.code == ErrorCode.INVALID_JOB and where in error.message and "RFC 8259" in error.message, \
        error.message


def test_huge_integers_are_accepted_and_serialise_exactly_up_to_pythons_limit():
    big = 10 ** 4000
    job = parse_job(b'{"request": {"path": "/x", "json": {"n": %d}}}' % big)
    assert json.loads(job.to_json())["request"]["json"]["n"] == big
    error = rejected(b'{"request": {"path": "/x", "json": {"n": 1%s}}}' % (b"0" * 5000))
    assert "not valid JSON" in error.message and "limit" in error.message
    with pytest.raises(JobInvalid, match=r"\$\.n is an integer of 16610 bits, too large to write"):
        as_job({"request": {"path": "/x", "json": {"n": 10 ** 5000}}})


def nested(depth: int) -> str:
    return "[" * depth + "]" * depth


def test_nesting_up_to_the_limit_is_accepted_and_serialises():
    job = parse_job(b'{"request": {"path": "/x", "json": %s}}' % nested(MAX_JSON_DEPTH).encode())
    assert job.to_json().count(b"[") == MAX_JSON_DEPTH


@pytest.mark.parametrize("depth", [MAX_JSON_DEPTH + 1, 600, 5_000, 200_000])
def test_deeper_nesting_is_refused_with_a_clear_error_never_a_crash(depth):
    error = rejected(b'{"request": {"path": "/x", "json": %s}}' % nested(depth).encode())
    assert error.code == ErrorCode.INVALID_JOB and "nested" in error.message and "100" in error.message


# -- odd Python values at the Client door -----------------------------------------------------

@pytest.mark.parametrize("value, why", [
    ({1, 2}, "is a set"), (b"bytes", "is a bytes"), (datetime.now(UTC), "is a datetime"),
    (object(), "is a object"), ({(1, 2): "tuple key"}, "has the key (1, 2)"), (float("nan"), "is nan"),
    ({"deep": json.loads(nested(150))}, "nested more than 100"),
])
def test_client_refuses_values_that_are_not_json(value, why):
    with pytest.raises(JobInvalid) as caught:
        as_job({"request": {"path": "/x", "json": {"v": value}}})
    assert why in str(caught.value) and "request.json" in str(caught.value)


def test_number_keys_are_accepted_as_json_writes_them():
    assert json.loads(as_job({"request": {"path": "/x", "json": {1: "a", 2.5: "b"}}}).to_json())["request"]["json"] \
        == {"1": "a", "2.5": "b"}


def test_validating_a_big_valid_job_never_walks_its_values(monkeypatch):
    """1 MB of tiny values: the verdict comes from the C encoder; the per-value walk that names
    a problem's path (`wire._describe`, ~5x slower on such a job) runs only for a value that
    fails. Counted, not timed (a timed assert fails on a loaded machine)."""
    from ratefleet.schemas import wire

    walked: list[str] = []
    describe = wire._describe

    def counting(value, where, depth):
        walked.append(where)
        return describe(value, where, depth)

    monkeypatch.setattr(wire, "_describe", counting)
    raw = b'{"request": {"path": "/x", "json": [%s]}}' % b",".join([b"{}"] * 300_000)
    assert len(parse_job(raw, max_bytes=1 << 21).request.json_body) == 300_000
    assert walked == []
    bad = b'{"request": {"path": "/x", "json": [%s, 1e999]}}' % b",".join([b"{}"] * 1_000)
    with pytest.raises(JobRejected, match=r"\$\[1000\] is inf"):
        parse_job(bad, max_bytes=1 << 21)
    assert walked  # the walk names the failing value's path


def test_client_validates_again_a_job_model_changed_after_it_was_built():
    job = Job.model_validate({"request": {"path": "/x"}})
    job.request.headers["Authorization:"] = "Bearer sk-caller"
    with pytest.raises(JobInvalid, match="set by ratefleet"):
        as_job(job)
    job = Job.model_validate({"request": {"path": "/x"}})
    job.request.json_body = {"t": math.inf}
    with pytest.raises(JobInvalid, match="RFC 8259"):
        as_job(job)


def test_a_job_built_without_validation_fails_to_serialise_as_job_rejected():
    job = Job.model_construct(request=Job.model_validate({"request": {"path": "/x"}}).request.model_copy(
        update={"body": LONE}), metadata={})
    with pytest.raises(JobRejected, match="cannot be serialised"):
        job.to_json()


def test_submit_lines_are_checked_serialisation_included_before_anything_is_sent():
    lines = [json.dumps({"request": {"path": "/v1/a"}}),
             '{"request": {"path": "/v1/b", "json": {"text": "\\ud83d"}}}',
             '{"request": {"path": "/v1/c", "headers": {"X-Title": "Café – 日本語"}}}',
             '{"request": {"path": "/v1/d", "json": NaN}}',
             '{"request": {"path": "/v1/e", "json": ' + nested(3000) + "}}"]
    jobs, errors = [], []
    for number, line in enumerate(lines, 1):
        try:
            jobs.append(parse_line(line, number, "b1"))
        except LineError as exc:
            errors.append(str(exc))
    assert len(jobs) == 1
    assert [e.split(":")[0] for e in errors] == ["line 2", "line 3", "line 4", "line 5"], errors
    assert "surrogate" in errors[0] and "U+2013" in errors[1] and "RFC 8259" in errors[2]


# -- intake and rpc: the configured auth header ----------------------------------------------

def test_intake_refuses_the_upstreams_own_auth_header_however_spelled():
    config = parse_config({"upstreams": {"p": {"base_url": "https://p.example", "auth_header": "X-Custom-Auth"}},
                           "pools": {"s": {"keys": [{"id": "k1", "secret": "env:K", "rps": 1}]}}})
    for name in ("X-Custom-Auth", "x-custom-auth", "X-CUSTOM-AUTH"):
        with pytest.raises(JobRejected) as caught:
            validate_job(raw_job({"headers": {name: "mine"}}), config)
        assert caught.value.code == ErrorCode.FORBIDDEN_TARGET, caught.value.message
    with pytest.raises(JobRejected, match="not an RFC 9110 token"):  # not a header name at all
        validate_job(raw_job({"headers": {"X-Custom-Auth:": "mine"}}), config)
    with pytest.raises(JobRejected) as caught:
        validate_job(b'{"request": {"path": "/x", "json": NaN}}', config)
    assert caught.value.code == ErrorCode.INVALID_JOB
    assert validate_job(raw_job({"headers": {"X-Title": "Café"}}), config).request.headers == {"X-Title": "Café"}


# -- what the leader and workers write always serialises --------------------------------------

def test_a_result_with_a_lone_surrogate_in_the_answer_still_serialises_as_strict_json():
    result = Result(job_id="j1", status="succeeded", response=ResponseInfo(status=200, json={"t": "a" + LONE}),
                    metadata={"ok": "é"})
    data = json.loads(result.to_json().decode("utf-8"))
    assert data["response"]["json"]["t"] == "a\\ud83d" and data["metadata"] == {"ok": "é"}


def test_dead_letter_payloads_always_serialise_as_strict_json():
    letter = {"payload": {"a": LONE, LONE: float("nan"), "n": [math.inf, 2 ** 9000], "deep": json.loads(nested(400)),
                          "odd": {1, 2}}}
    text = dumps_safe(letter).decode("utf-8")
    data = json.loads(text, parse_constant=lambda c: pytest.fail(f"{c} in strict JSON"))
    assert data["payload"]["a"] == "\\ud83d" and data["payload"]["\\ud83d"] == "nan"
    assert json_problem(data) is None


# -- the worker's request building (defence in depth behind the model) ------------------------

UPSTREAM = UpstreamConfig(base_url="https://api.example.test")


def unvalidated(**request) -> Job:
    """A job as a leader of another version might hand it over: never validated by this model."""
    model = Job.model_validate({"request": {"path": "/v1/x"}})
    return Job.model_construct(request=model.request.model_copy(update=request), metadata={})


@pytest.mark.anyio
@pytest.mark.parametrize("request_fields, why", [
    ({"headers": {"X-Title": "Café – 日本語"}}, "U+2013"),
    ({"headers": {"Authorization:": "Bearer sk-caller"}}, "set by ratefleet"),
    ({"headers": {"authorization": "Bearer sk-caller"}}, "set by ratefleet"),
    ({"json_body": {"t": float("nan")}}, "ValueError"),
    ({"json_body": {"t": {1, 2}}}, "TypeError"),
    ({"body": "x" + LONE}, "UnicodeEncodeError"),
])
async def test_a_request_that_cannot_be_built_raises_invalid_request_and_calls_nothing(request_fields, why):
    calls = []
    executor = UpstreamExecutor(httpx.AsyncClient(transport=httpx.MockTransport(
        lambda r: calls.append(r) or httpx.Response(200, json={}))))
    with pytest.raises(InvalidRequest) as caught:
        await executor.call(unvalidated(**request_fields), UPSTREAM, "sk-test-SECRET-123456")
    assert why in str(caught.value) and "sk-test-SECRET" not in str(caught.value)
    assert calls == []


@pytest.mark.anyio
async def test_obs_text_header_values_go_out_as_latin_1_bytes_and_the_key_once():
    seen = []
    executor = UpstreamExecutor(httpx.AsyncClient(transport=httpx.MockTransport(
        lambda r: seen.append(r.headers.raw) or httpx.Response(200, json={}))))
    job = Job.model_validate({"request": {"path": "/v1/x", "headers": {"X-Title": "Café"}}})
    result = await executor.call(job, UPSTREAM, "sk-test-SECRET-123456")
    assert result.kind == "ok"
    assert (b"X-Title", b"Caf\xe9") in seen[0]
    assert [v for k, v in seen[0] if k.lower() == b"authorization"] == [b"Bearer sk-test-SECRET-123456"]


@pytest.mark.parametrize("field", ["cost", "cache_ttl_s"])
@pytest.mark.parametrize("number", ["Infinity", "-Infinity", "NaN", "1e400"])
def test_a_job_field_that_is_not_a_finite_number_is_refused_by_every_entry_point(field, number):
    """`"cost": Infinity` passed the Client and `submit` and ended `invalid` only at intake
    (pydantic writes inf as null); NaN was refused with a misleading "greater than or equal
    to 0". Every entry point now refuses it as not finite, before anything is sent."""
    text = '{"request": {"path": "/v1/x"}, "%s": %s}' % (field, number)
    error = rejected(text.encode())  # intake and rpc
    assert error.code == ErrorCode.INVALID_JOB and field in error.message and "finite" in error.message, error.message
    with pytest.raises(JobInvalid, match=rf"{field}.*finite"):  # the Client (`as_job`), `ratefleet request`
        as_job({"request": {"path": "/v1/x"}, field: float(number)})
    with pytest.raises(LineError, match=rf"{field}.*finite"):  # `ratefleet submit`
        parse_line(text, 1, "b")


@pytest.mark.parametrize("line", ["rps = inf", "rps = nan", "rps = 5\nburst = inf",
                                  "rps = 5\ncost_per_minute = inf"])
def test_a_config_limit_that_is_not_a_finite_number_is_refused(line):
    """TOML has `inf` and `nan`: `rps = inf` was accepted (pydantic's `gt=0` lets inf through)."""
    import tomllib

    doc = tomllib.loads('[upstreams.u]\nbase_url = "http://127.0.0.1:9"\n[[pools.p.keys]]\nid = "k"\n'
                       f'secret = "env:X"\n{line}\n')
    with pytest.raises(Exception, match=r"pools\.p\.keys\.0\.\w+: Input should be a finite number"):
        parse_config(doc)


def test_a_header_line_pasted_as_a_name_does_not_quote_its_value():
    """`{"Authorization: Bearer sk-...": ""}` (a curl header pasted as a name) was refused with the
    whole name quoted: the key went into the Result, the dead letter and `submit --rejects`'
    file, which promises never to hold a line's headers. The name is quoted up to its ':'."""
    with pytest.raises(JobRejected, match="RFC 9110 token") as caught:
        parse_job(json.dumps({"request": {"path": "/x", "headers": {"Authorization: Bearer sk-SECRET": ""}}}).encode())
    assert "sk-SECRET" not in caught.value.message and "'Authorization: ...'" in caught.value.message
    with pytest.raises(LineError) as caught_line:
        parse_line(json.dumps({"request": {"path": "/x", "headers": {"X-Api-Key:sk-SECRET": "1"}}}), 1, "b")
    assert "sk-SECRET" not in str(caught_line.value)
