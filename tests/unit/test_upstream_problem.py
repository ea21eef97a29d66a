"""schemas.job.upstream_problem: the one check of a job's upstream, run by the dispatcher's
intake and by `ratefleet submit` against the live config."""

from __future__ import annotations

from ratefleet.schemas import ErrorCode, Job
from ratefleet.schemas.job import UpstreamRoutes, upstream_problem

ONE = {"openai": "Authorization"}
TWO = {"openai": "Authorization", "anthropic": "x-api-key"}


def job(**fields) -> Job:
    return Job.model_validate({"request": {"path": "/v1/x", **fields.pop("request", {})}, **fields})


def test_one_upstream_is_the_default():
    assert upstream_problem(job(), ONE) is None
    assert upstream_problem(job(upstream="openai"), ONE) is None


def test_several_upstreams_need_a_name_and_a_known_one():
    assert upstream_problem(job(), TWO) == (
        ErrorCode.UNKNOWN_UPSTREAM,
        "upstream is required: several are configured (['anthropic', 'openai']) and none is the default_upstream")
    assert upstream_problem(job(upstream="gemini"), TWO) == (
        ErrorCode.UNKNOWN_UPSTREAM, "unknown upstream 'gemini'; configured: ['anthropic', 'openai']")
    assert upstream_problem(job(upstream="anthropic"), TWO) is None
    # "" names no configured upstream; it was taken for "none named" and the first one used
    assert upstream_problem(job(upstream=""), TWO) == (
        ErrorCode.UNKNOWN_UPSTREAM, "unknown upstream ''; configured: ['anthropic', 'openai']")


def test_a_default_upstream_takes_the_jobs_that_name_none():
    """`default_upstream`: a job naming none goes there (given, or carried by UpstreamRoutes, as the
    dispatcher's intake and `ratefleet submit` pass the live config's)."""
    routes = UpstreamRoutes(TWO, "openai")
    assert upstream_problem(job(), routes) is None
    assert upstream_problem(job(), TWO, "openai") is None
    assert upstream_problem(job(upstream="anthropic"), routes) is None
    custom = UpstreamRoutes({"internal": "X-Custom-Token", "anthropic": "x-api-key"}, "internal")
    assert upstream_problem(job(request={"headers": {"x-custom-token": "t"}}), custom) == (
        ErrorCode.FORBIDDEN_TARGET, "header 'X-Custom-Token' is set by ratefleet")  # the default's own header
    assert upstream_problem(job(), UpstreamRoutes(TWO, ""))[0] == ErrorCode.UNKNOWN_UPSTREAM  # "": none


def test_the_upstreams_own_auth_header_is_the_workers_to_set():
    custom = {"internal": "X-Custom-Token"}
    problem = upstream_problem(job(request={"headers": {"x-custom-token": "t"}}), custom)
    assert problem == (ErrorCode.FORBIDDEN_TARGET, "header 'X-Custom-Token' is set by ratefleet")
    assert upstream_problem(job(request={"headers": {"x-other": "t"}}), custom) is None


def test_submit_names_the_fix_a_line_can_take():
    """parse_line with the fleet's upstreams: a Job line is told to add "upstream"; an OpenAI
    Batch API line, which has no such field, is told what it can do instead."""
    import json

    import pytest

    from ratefleet.batchfile import LineError, parse_line

    with pytest.raises(LineError, match=r'line 1: upstream is required.*add "upstream": "<name>" to the line'):
        parse_line(json.dumps({"request": {"path": "/v1/x"}}), 1, "b", TWO)
    openai_line = {"custom_id": "c1", "method": "POST", "url": "/v1/chat/completions", "body": {"model": "m"}}
    with pytest.raises(LineError, match="line 2: upstream is required.*an OpenAI Batch API line cannot name one"):
        parse_line(json.dumps(openai_line), 2, "b", TWO)
    assert parse_line(json.dumps(openai_line), 2, "b", ONE).upstream is None  # one upstream: the default
