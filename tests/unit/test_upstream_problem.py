"""schemas.job.upstream_problem: the one check of a job's upstream, run by the dispatcher's
intake and by `ratefleet submit` against the live config."""

from __future__ import annotations

from ratefleet.schemas import ErrorCode, Job
from ratefleet.schemas.job import upstream_problem

ONE = {"openai": "Authorization"}
TWO = {"openai": "Authorization", "anthropic": "x-api-key"}


def job(**fields) -> Job:
    return Job.model_validate({"request": {"path": "/v1/x", **fields.pop("request", {})}, **fields})


def test_one_upstream_is_the_default():
    assert upstream_problem(job(), ONE) is None
    assert upstream_problem(job(upstream="openai"), ONE) is None


def test_several_upstreams_need_a_name_and_a_known_one():
    assert upstream_problem(job(), TWO) == (
        ErrorCode.UNKNOWN_UPSTREAM, "upstream is required: several are configured (['anthropic', 'openai'])")
    assert upstream_problem(job(upstream="gemini"), TWO) == (
        ErrorCode.UNKNOWN_UPSTREAM, "unknown upstream 'gemini'; configured: ['anthropic', 'openai']")
    assert upstream_problem(job(upstream="anthropic"), TWO) is None


def test_the_upstreams_own_auth_header_is_the_workers_to_set():
    custom = {"internal": "X-Custom-Token"}
    problem = upstream_problem(job(request={"headers": {"x-custom-token": "t"}}), custom)
    assert problem == (ErrorCode.FORBIDDEN_TARGET, "header 'X-Custom-Token' is set by ratefleet")
    assert upstream_problem(job(request={"headers": {"x-other": "t"}}), custom) is None
