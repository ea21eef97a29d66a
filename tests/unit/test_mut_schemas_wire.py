"""What can go on the wire (schemas/wire.py), rule by rule at its edges: header names and
values (RFC 9110 sections 5.1, 5.5), strict JSON (RFC 8259: no NaN/Infinity, UTF-8 text,
nesting capped at MAX_JSON_DEPTH) with the path of the first problem, and `json_safe` /
`dumps_safe`, which make anything writable for dead letters. Deterministic, no server."""

from __future__ import annotations

import json
import math

import pytest

from ratefleet.schemas.wire import (
    MAX_JSON_DEPTH,
    dumps_safe,
    header_value_problem,
    is_field_name,
    json_problem,
    json_safe,
    text_problem,
)

LONE = "\ud83d"
NAN_SAYS = "is nan (NaN or Infinity"


def nested_lists(levels: int, inner: object = 0) -> object:
    value = inner
    for _ in range(levels):
        value = [value]
    return value


def nested_dicts(levels: int, inner: object = 0) -> dict:
    """{"k0": {"k1": ... {"k<levels-1>": inner}}}: each level's path is distinct."""
    value = inner
    for level in reversed(range(levels)):
        value = {f"k{level}": value}
    return value


def path_to(levels: int) -> str:
    return "$" + "".join(f".k{level}" for level in range(levels))


def short(where: str) -> str:
    return where if len(where) <= 60 else f"{where[:36]}...{where[-20:]}"


# -- header names and values -----------------------------------------------------------------

@pytest.mark.parametrize("name, ok", [("X-Request-Id", True), ("a!#$%&'*+-.^_`|~9", True), ("a b", False),
                                      ("X-A:", False), ("", False), ("é", False)])
def test_header_names_are_tokens(name, ok):
    assert is_field_name(name) is ok


@pytest.mark.parametrize("value", ["Xyz", "a b", "a\tb", "\x80\xff", "~!", "", "X"])
def test_field_values_accepted(value):
    assert header_value_problem(value) is None


@pytest.mark.parametrize("value, facts", [
    ("ab\rc", ("line break", "character 2")), ("a\n", ("line break", "character 1")),
    ("ab\u0100", ("U+0100", "character 2", "ASCII")), ("\u20ac", ("U+20AC", "character 0")),
    ("ab\x01", ("control character U+0001", "character 2")), ("a\x1f", ("control character U+001F",)),
    ("a\x7fb", ("control character U+007F", "character 1")), ("\x00", ("control character U+0000",)),
    (" a", ("whitespace",)), ("\ta", ("whitespace",)), ("abc ", ("whitespace",)), ("abc\t", ("whitespace",)),
    (" ", ("whitespace",)),
])
def test_field_values_refused_with_the_character_and_where(value, facts):
    problem = header_value_problem(value)
    assert problem is not None
    for fact in facts:
        assert fact in problem


def test_lone_surrogate_named_with_its_code_point_and_position():
    assert text_problem("ok é \U0001f600") is None
    problem = text_problem("ab" + LONE + "c")
    assert "lone UTF-16 surrogate U+D83D at character 2" in problem


# -- strict JSON: the verdict and the path of the first problem -------------------------------

@pytest.mark.parametrize("value", [None, True, 1, 1.5, "é", [1, "a"], {"a": [None, {"b": 2}]}, (1, 2), {1: "a"}, {}])
def test_json_values_accepted(value):
    assert json_problem(value) is None


@pytest.mark.parametrize("value, message", [
    ([1, 2, math.nan], f"$[2] {NAN_SAYS}"),
    ([None, math.inf], "$[1] is inf (NaN or Infinity"),
    ({"a": 1, "b": math.nan}, f"$.b {NAN_SAYS}"),
    ({"a b": math.nan}, f"$['a b'] {NAN_SAYS}"),
    ({1: math.nan}, f"$['1'] {NAN_SAYS}"),
    ({"a": "x", "b": ["ok", "ab" + LONE]}, "$.b[1] contains a lone UTF-16 surrogate U+D83D at character 2"),
    ({(1, 2): 1}, "$ has the key (1, 2) (tuple); JSON object keys are strings"),
    ({"a" + LONE: 1}, "$ has a key that contains a lone UTF-16 surrogate U+D83D at character 1"),
    ({"a": {1, 2}}, "$.a is a set, not a JSON value"),
    ([10 ** 5000], "$[0] is an integer of 16610 bits, too large to write"),
])
def test_json_problem_names_the_first_bad_value_by_its_path(value, message):
    problem = json_problem(value)
    assert problem is not None and problem.startswith(message), problem


def test_json_problem_path_starts_where_the_caller_says():
    assert json_problem([math.nan], "$.metadata").startswith(f"$.metadata[0] {NAN_SAYS}")


def test_long_paths_are_shortened_keeping_both_ends():
    fits, too_long = "k" * 58, "k" * 50 + "tail" + "z" * 5
    assert json_problem({fits: math.nan}).startswith(f"$.{fits} {NAN_SAYS}")  # 60 characters: whole
    assert json_problem({too_long: math.nan}).startswith(f"{short('$.' + too_long)} {NAN_SAYS}")
    assert short("$." + too_long) == "$." + "k" * 34 + "..." + "k" * 11 + "tail" + "z" * 5


@pytest.mark.parametrize("build", [nested_lists, nested_dicts])
def test_nesting_up_to_the_limit_is_accepted_even_with_brackets_in_strings(build):
    # the bracket count passes the limit (the strings add two), so the real depth is measured
    assert json_problem(build(MAX_JSON_DEPTH, "[{")) is None
    assert json_problem(build(MAX_JSON_DEPTH)) is None


def test_nesting_past_the_limit_is_refused_at_the_level_that_breaks_it():
    assert json_problem(nested_lists(MAX_JSON_DEPTH + 1)) == (
        f"{short('$' + '[0]' * MAX_JSON_DEPTH)} is nested more than {MAX_JSON_DEPTH} levels deep")
    assert json_problem(nested_dicts(MAX_JSON_DEPTH + 1)) == (
        f"{short(path_to(MAX_JSON_DEPTH))} is nested more than {MAX_JSON_DEPTH} levels deep")
    assert json_problem([nested_dicts(MAX_JSON_DEPTH)]) is not None  # a list around dicts counts too
    assert json_problem({"a": nested_lists(MAX_JSON_DEPTH)}) is not None


def test_a_bad_value_at_the_deepest_allowed_level_is_named_as_itself():
    problem = json_problem(nested_lists(MAX_JSON_DEPTH, math.nan))
    assert problem is not None and NAN_SAYS in problem and "nested" not in problem
    problem = json_problem(nested_dicts(MAX_JSON_DEPTH - 1, [math.nan]))
    assert problem is not None and NAN_SAYS in problem and "nested" not in problem


# -- json_safe / dumps_safe: anything, written as strict JSON ---------------------------------

def test_json_safe_keeps_json_values_as_they_are():
    value = {"a": [None, True, 5, 1.5, "é"], "b": {"c": []}}
    assert json_safe(value) == value
    assert json_safe(None) is None and json_safe(False) is False and json_safe(7) == 7


def test_json_safe_replaces_what_json_cannot_carry():
    assert json_safe([math.nan, -math.inf, 2.0]) == ["nan", "-inf", 2.0]
    assert json_safe("a" + LONE) == "a\\ud83d"
    assert json_safe({1: (2, 3), None: {4}}) == {"1": [2, 3], "None": "{4}"}
    assert json_safe(10 ** 5000) == "<integer of 16610 bits>"
    assert json_safe(2 ** 20_000 + 1) == "<integer of 20001 bits>"
    assert json_safe(10 ** 300) == 10 ** 300


def test_json_safe_cuts_nesting_at_the_limit():
    assert json_safe(nested_lists(MAX_JSON_DEPTH)) == nested_lists(MAX_JSON_DEPTH)
    marker = f"<nested more than {MAX_JSON_DEPTH} levels>"
    assert json_safe(nested_lists(MAX_JSON_DEPTH + 1)) == nested_lists(MAX_JSON_DEPTH, marker)
    assert json_safe(nested_dicts(MAX_JSON_DEPTH + 1)) == nested_dicts(MAX_JSON_DEPTH, marker)


def test_dumps_safe_writes_strict_utf8_json():
    assert dumps_safe({"a": "é", "b": math.nan, "c": "x" + LONE}) == '{"a": "é", "b": "nan", "c": "x\\\\ud83d"}'.encode()
    assert dumps_safe(None) == b"null"
    json.loads(dumps_safe([10 ** 5000, nested_lists(MAX_JSON_DEPTH + 5)]))
