"""The core's view of a worker's outcome report (dispatcher/core/types.py `Outcome`): every
field carried over as reported, a 429's scope kept only for a 429, and a kind given as its
JSON string turned into the enum (one outside the vocabulary refused)."""

from __future__ import annotations

import pytest

from ratefleet.dispatcher.core.types import Outcome
from ratefleet.schemas.internal import OutcomeReport
from ratefleet.schemas.outcome import OutcomeKind, RateLimitInfo


def report(kind: str, scope: str | None = "request") -> OutcomeReport:
    return OutcomeReport(assignment="a1", worker="w1", key_id="k1", job_id="j1", kind=kind, status=429,
                         retry_after_s=2.5, ratelimit=RateLimitInfo(remaining_requests=0.0, reset_requests_s=3.0),
                         actual_cost=12.0, latency_ms=340.0, code="rate_limit_exceeded", scope=scope)


def test_from_report_carries_every_field_of_a_429():
    got = Outcome.from_report(report("rate_limited"))
    assert got == Outcome(kind=OutcomeKind.RATE_LIMITED, status=429, retry_after_s=2.5,
                          ratelimit=RateLimitInfo(remaining_requests=0.0, reset_requests_s=3.0), actual_cost=12.0,
                          latency_ms=340.0, code="rate_limit_exceeded", scope="request")
    assert Outcome.from_report(report("rate_limited", "key")).scope == "key"
    assert Outcome.from_report(report("rate_limited", None)).scope is None


@pytest.mark.parametrize("kind", ["ok", "upstream_error", "denied", "key_error", "bad_request", "none"])
def test_a_scope_means_nothing_for_another_kind(kind):
    got = Outcome.from_report(report(kind))
    assert got.kind == OutcomeKind(kind) and got.scope is None
    assert (got.status, got.retry_after_s, got.actual_cost, got.latency_ms, got.code) == (
        429, 2.5, 12.0, 340.0, "rate_limit_exceeded")


@pytest.mark.parametrize("kind", ["ok", OutcomeKind.OK])
def test_a_kind_given_as_its_string_becomes_the_enum(kind):
    got = Outcome(kind=kind)
    assert type(got.kind) is OutcomeKind and got.kind is OutcomeKind.OK


def test_a_kind_outside_the_vocabulary_is_refused():
    with pytest.raises(ValueError, match="'fine'"):
        Outcome(kind="fine")  # type: ignore[arg-type]
