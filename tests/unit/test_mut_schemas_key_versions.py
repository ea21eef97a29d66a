"""Key versions (schemas/key_versions.py), the edges tests/unit/test_key_versions.py leaves:
the shortest valid secret references, two scheduled versions, and the account of versions an
error gives for every state. Deterministic, no clock."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from ratefleet.schemas.key_versions import KeyVersion, current_version, describe_versions, secret_ref_problem

T0 = datetime(2026, 12, 1, 0, 0, tzinfo=UTC)
T1, T2, T3 = (T0 + timedelta(hours=h) for h in (1, 2, 3))


def v(id_: str, status: str = "active", not_before=None, not_after=None) -> KeyVersion:
    return KeyVersion(id=id_, secret=f"env:{id_.upper()}", status=status, not_before=not_before, not_after=not_after)


@pytest.mark.parametrize("ref", ["env:A", "file:a", "file:/", "sk-1", "e", "env", "file"])
def test_the_shortest_references_are_valid(ref):
    assert secret_ref_problem(ref) is None


@pytest.mark.parametrize("ref, words", [
    ("", "must not be empty"), ("env:", "env: needs a variable name, e.g. env:X_VAR"),
    ("file:", "file: needs a path, e.g. file:/x/path"),
])
def test_a_malformed_reference_says_why_with_the_callers_example(ref, words):
    assert words in secret_ref_problem(ref, "X_VAR", "/x/path")


@pytest.mark.parametrize("versions, chosen", [
    ([v("v1", not_before=T0), v("v2", not_before=T1)], "v2"),  # two scheduled: the later start
    ([v("v2", not_before=T1), v("v1", not_before=T0)], "v2"),
    ([v("v1", not_before=T0), v("v2")], "v1"),  # a start beats none
    ([v("v1"), v("v2", not_before=T0), v("v3", not_before=T0)], "v3"),  # a tie: the later-listed
])
def test_the_newest_active_version_among_scheduled_ones(versions, chosen):
    assert current_version(versions, T2).id == chosen


@pytest.mark.parametrize("version, text", [
    (v("v1", status="draining"), "v1 draining"),  # no end time to name
    (v("v1", status="draining", not_before=T0), "v1 draining"),
    (v("v1", status="draining", not_after=T3), "v1 draining"),  # drained by status, not by its end
    (v("v1", status="retired", not_after=T1), "v1 retired"),
    (v("v1", status="retired", not_before=T3), "v1 retired"),
    (v("v1", not_before=T0), "v1 active"),
    (v("v1", not_after=T1), "v1 draining since 2026-12-01T01:00:00+00:00"),
    (v("v1", not_before=T3), "v1 pending until 2026-12-01T03:00:00+00:00"),
])
def test_describe_versions_for_every_state(version, text):
    assert describe_versions([version], T2) == text
