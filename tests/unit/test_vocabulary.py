"""One vocabulary (schemas/outcome.py, schemas/result.py, schemas/errors.py): each rule is
defined once, and these tests fail when a second copy drifts from it again. Outcome kinds
on the wire and in the core, the retry rule in the worker, rate-limit info across the wire,
error codes in Results, and the one exception tree."""

from __future__ import annotations

import ast
import importlib
import inspect
import re
import typing
from pathlib import Path

import pytest
from pydantic import ValidationError
from test_bite_worker import ACK, RecordingFinisher, assignment, make_worker

from ratefleet.dispatcher.core import Outcome, Reject, classify
from ratefleet.schemas import ErrorCode, ErrorInfo, ResponseInfo, Result
from ratefleet.schemas import errors as error_tree
from ratefleet.schemas.internal import OutcomeReport
from ratefleet.schemas.outcome import OutcomeKind, RateLimitInfo, is_retryable
from ratefleet.workers.executor import CallResult

ROOT = Path(__file__).resolve().parents[2]
PRODUCTION = [path for folder in ("schemas", "dispatcher", "workers", "ratefleet") for path in (ROOT / folder).rglob("*.py")
              if "mock" not in path.parts]
# what deployed workers and leaders send as OutcomeReport.kind: a rename breaks a rolling upgrade
WIRE_KINDS = {"ok", "rate_limited", "key_error", "denied", "upstream_error", "bad_request", "none"}
# every code a Result has ever been stored with (codes are only added): each must still parse
STORED_CODES = {"invalid_job", "unknown_tier", "unknown_upstream", "forbidden_target", "deadline_exceeded",
                "attempts_exhausted", "upstream_error", "no_key_available", "key_unavailable", "poison_message",
                "rate_limited", "response_too_large", "invalid_request", "request_denied", "result_not_stored",
                "request_too_large"}


def report(kind: str, **fields) -> OutcomeReport:
    return OutcomeReport(assignment="a1", worker="w1", key_id="k1", job_id="j1", kind=kind, **fields)


# -- outcome kinds --------------------------------------------------------------------------


def test_the_wire_values_of_outcome_kinds_are_the_deployed_ones():
    assert {kind.value for kind in OutcomeKind} == WIRE_KINDS


@pytest.mark.parametrize("kind", sorted(WIRE_KINDS))
def test_every_reported_kind_round_trips_to_the_same_member_of_the_core(kind):
    raw = report(kind, status=200).model_dump_json()
    assert f'"kind":"{kind}"' in raw  # the JSON value, as workers and leaders send it today
    parsed = OutcomeReport.model_validate_json(raw)
    assert Outcome.from_report(parsed).kind is OutcomeKind(kind) is parsed.kind


def test_the_wire_the_executor_and_the_core_annotate_the_one_enum():
    assert OutcomeReport.model_fields["kind"].annotation is OutcomeKind
    assert typing.get_type_hints(Outcome)["kind"] is OutcomeKind
    assert typing.get_type_hints(CallResult)["kind"] is OutcomeKind


def test_the_core_takes_no_kind_outside_the_vocabulary():
    with pytest.raises(ValueError):
        Outcome("lsot")
    with pytest.raises(ValidationError):
        report("lost call")
    assert Outcome("lost").kind is OutcomeKind.NONE  # the core's former spelling of "none"
    assert Outcome("ok").kind is OutcomeKind.OK


@pytest.mark.parametrize("status", [None, 200, 204, 400, 401, 402, 403, 404, 408, 409, 422, 429, 500, 503, 529])
@pytest.mark.parametrize("code", [None, "invalid_api_key", "insufficient_quota", "overloaded_error", "other"])
def test_classify_speaks_the_vocabulary(status, code):
    assert type(classify(status, None if status else "timeout", code)) is OutcomeKind


# -- one retry rule -------------------------------------------------------------------------


class OneCall:
    def __init__(self, kind: OutcomeKind, status: int):
        self.kind, self.status = kind, status

    async def call(self, job, upstream, secret) -> CallResult:
        return CallResult(kind=self.kind, response=ResponseInfo(status=self.status), error=None, retry_after_s=None,
                          ratelimit=None, actual_cost=None, latency_ms=1.0)


class NoHandbacks:
    async def rate_limited(self, seq, finisher, ack, delay):
        await finisher.nak(ack, delay)


STATUS = {OutcomeKind.OK: 200, OutcomeKind.RATE_LIMITED: 429, OutcomeKind.KEY_ERROR: 402, OutcomeKind.DENIED: 401,
          OutcomeKind.UPSTREAM_ERROR: 503, OutcomeKind.BAD_REQUEST: 400}


@pytest.mark.anyio
@pytest.mark.parametrize("denial_final", [False, True])
@pytest.mark.parametrize("kind", sorted(STATUS))
async def test_the_worker_requeues_exactly_what_is_retryable_says(monkeypatch, kind, denial_final):
    worker, nc, finisher = make_worker(monkeypatch)
    worker.finisher = finisher = RecordingFinisher()
    worker.handbacks = NoHandbacks()
    job = assignment(attempt=1, max_attempts=5).model_copy(update={"denial_final": denial_final})
    await worker._run_assignment(job, OneCall(kind, STATUS[kind]))
    requeued = [entry for entry in finisher.log if entry[0] == "nak"]
    expected = is_retryable(kind, denial_final=denial_final)
    assert (requeued != [] and finisher.finished == []) is expected, (finisher.log, finisher.finished)
    assert all(ack == ACK for _, ack, _ in requeued)
    assert [r.kind for r in nc.reports()][-1:] == [kind]


def test_no_module_keeps_its_own_set_of_retryable_kinds():
    for path in PRODUCTION:
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.Set, ast.Tuple, ast.List)) and len(node.elts) >= 3:
                names = {e.value for e in node.elts if isinstance(e, ast.Constant)}
                assert not {"rate_limited", "upstream_error"} <= names, \
                    f"{path.relative_to(ROOT)}:{node.lineno} lists outcome kinds; use schemas.outcome.is_retryable"


# -- rate-limit info ------------------------------------------------------------------------


def test_rate_limit_info_crosses_the_wire_as_itself():
    info = RateLimitInfo(remaining_requests=4.0, remaining_tokens=29000.0, limit_requests=500.0, reset_tokens_s=0.5)
    parsed = OutcomeReport.model_validate_json(report("rate_limited", status=429, ratelimit=info).model_dump_json())
    assert parsed.ratelimit == info and Outcome.from_report(parsed).ratelimit == info
    assert OutcomeReport.model_fields["ratelimit"].annotation == RateLimitInfo | None
    assert typing.get_type_hints(Outcome)["ratelimit"] == RateLimitInfo | None
    assert typing.get_type_hints(CallResult)["ratelimit"] == RateLimitInfo | None


def test_a_report_of_an_older_or_newer_worker_still_reads():
    raw = ('{"assignment": "a1", "worker": "w1", "key_id": "k1", "job_id": "j1", "kind": "ok", "status": 200, '
           '"ratelimit": {"remaining_requests": 7, "remaining_tokens": null, "reset_requests_s": 1, '
           '"reset_tokens_s": null, "limit_requests": null, "limit_tokens": null, "limit_images": 5}}')
    outcome = Outcome.from_report(OutcomeReport.model_validate_json(raw))
    assert outcome.ratelimit == RateLimitInfo(remaining_requests=7.0, reset_requests_s=1.0)


# -- error codes ----------------------------------------------------------------------------


@pytest.mark.parametrize("code", sorted(STORED_CODES))
def test_results_stored_with_any_code_so_far_still_parse(code):
    raw = '{"job_id": "j1", "status": "failed", "error": {"code": "%s", "message": "m"}}' % code
    result = Result.from_json(raw)
    assert result.error.code is ErrorCode(code) and Result.from_json(result.to_json()) == result


def test_error_info_takes_only_error_codes():
    assert typing.get_type_hints(ErrorInfo)["code"] is ErrorCode
    assert typing.get_type_hints(Reject)["code"] is ErrorCode
    with pytest.raises(ValidationError):
        ErrorInfo(code="submit_faild", message="m")


def _calls(name: str):
    for path in PRODUCTION:
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Call) and getattr(node.func, "id", getattr(node.func, "attr", None)) == name:
                yield path, node


# where each writer takes its code: keyword `code`, or this positional argument
CODE_ARGUMENT = {"ErrorInfo": None, "Reject": 1, "refuse_incoming": 2, "_end_invalid": 1, "JobRejected": 0}


def test_every_code_a_writer_names_is_an_error_code_member():
    """A string literal as a Result's code bypasses the enum (rpc.py once answered with
    `"queue_full"`); every code given to ErrorInfo, Reject, a refusal or JobRejected is
    `ErrorCode.X` or a value already typed ErrorCode."""
    checked = 0
    for name, position in CODE_ARGUMENT.items():
        for path, call in _calls(name):
            values = [k.value for k in call.keywords if k.arg == "code"]
            if position is not None and len(call.args) > position:
                values.append(call.args[position])
            for value in values:
                checked += 1
                where = f"{path.relative_to(ROOT)}:{call.lineno}"
                assert not (isinstance(value, ast.Constant) and isinstance(value.value, str)), \
                    f"{where}: code {value.value!r} is a bare string; use ErrorCode"
                if isinstance(value, ast.Attribute) and getattr(value.value, "id", None) == "ErrorCode":
                    assert value.attr in ErrorCode.__members__, f"{where}: ErrorCode.{value.attr} does not exist"
    assert checked >= 20


def test_no_writer_passes_a_code_through_a_bare_string_variable():
    """`code = "queue_full" if ... else "submit_failed"; ErrorInfo(code=code, ...)` hides a
    bare string from the check above: in a module that writes codes, no code-shaped string
    literal is assigned to a variable named `code`."""
    writers = {path for name in CODE_ARGUMENT for path, _ in _calls(name)}
    for path in writers:
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Assign) and any(getattr(t, "id", None) == "code" for t in node.targets):
                literals = [c.value for c in ast.walk(node.value) if isinstance(c, ast.Constant)
                            and isinstance(c.value, str) and re.fullmatch(r"[a-z]+(_[a-z]+)+", c.value)]
                assert literals == [], f"{path.relative_to(ROOT)}:{node.lineno}: code {literals} as bare strings"


def test_no_key_available_is_defined_once():
    defined = [f"{path.relative_to(ROOT)}:{node.lineno}" for path in PRODUCTION
               for node in ast.walk(ast.parse(path.read_text()))
               if isinstance(node, ast.Assign) and any(getattr(t, "id", None) == "NO_KEY_AVAILABLE" for t in node.targets)]
    assert defined == ["schemas/result.py:" + str(_line_of("schemas/result.py", "NO_KEY_AVAILABLE ="))]


def _line_of(relative: str, text: str) -> int:
    return next(n for n, line in enumerate((ROOT / relative).read_text().splitlines(), 1) if text in line)


# -- one exception tree ---------------------------------------------------------------------


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts if parts[0] == "ratefleet" else ["ratefleet", *parts])


def test_every_exception_class_of_ratefleet_is_in_the_one_tree():
    """Every public exception class in production code derives from RatefleetError; a
    private marker (e.g. the breaker's `_CallFailed`, never raised out of its module) may not."""
    outside = []
    for path in PRODUCTION:
        if path.name == "__main__.py":
            continue
        module = importlib.import_module(_module_name(path))
        for name, cls in vars(module).items():
            if (inspect.isclass(cls) and issubclass(cls, BaseException) and cls.__module__ == module.__name__
                    and not name.startswith("_") and not issubclass(cls, error_tree.RatefleetError)):
                outside.append(f"{module.__name__}.{name}")
    assert outside == []


def test_the_tree_drawn_in_the_docstring_is_the_tree_in_the_code():
    classes = {name: cls for name, cls in vars(error_tree).items()
               if inspect.isclass(cls) and issubclass(cls, error_tree.RatefleetError)}
    drawn: dict[str, str] = {}
    stack: list[tuple[int, str]] = []
    for line in error_tree.__doc__.splitlines():
        stripped = line.lstrip(" │├└─")
        if not stripped or not stripped[0].isupper() or (line.strip() == stripped and not line.startswith("    R")):
            continue
        name, depth = stripped.split()[0], len(line) - len(stripped)
        while stack and stack[-1][0] >= depth:
            stack.pop()
        if stack:
            drawn[name] = stack[-1][1]
        stack.append((depth, name))
    assert set(drawn) | {"RatefleetError"} == set(classes)
    for name, parent in drawn.items():
        assert classes[name].__bases__ == (classes[parent],), f"{name} is drawn under {parent}"
    assert set(error_tree.__all__) == set(classes)


def test_every_error_code_is_explained_in_the_readme():
    """A service team's finding: Results said their codes were listed in the README, which named
    only a few; a caller in another language had no list of what `error.code` can be."""
    from pathlib import Path

    from ratefleet.schemas import ErrorCode

    readme = (Path(__file__).parents[2] / "README.md").read_text()
    table = readme[readme.index("| code | status | meaning, and what to do |"):]
    table = table[:table.index("\n\n")]
    listed = {row.split("|")[1].strip().strip("`") for row in table.splitlines()[2:]}
    assert listed == {code.value for code in ErrorCode}
