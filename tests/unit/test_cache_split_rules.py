"""The pure rules of the answer cache and A/B routing: the cache key (canonical JSON), the
`Cache-Control: no-cache` test, which jobs are looked up, and the config of both."""

from __future__ import annotations

import hashlib

import pytest

from ratefleet.dispatcher.core.split import SplitSpec
from ratefleet.dispatcher.spec import scheduler_spec
from ratefleet.gateway.translate import no_cache
from ratefleet.runtime.cache import cache_key, canonical_json, wants_lookup, wants_write
from ratefleet.schemas import ConfigError, Job
from ratefleet.schemas.config import parse_config


def job(body, **extra) -> Job:
    return Job.model_validate({"request": {"method": "POST", "path": "/v1/chat/completions", "json": body}, **extra})


def test_canonical_json_sorts_keys_and_drops_whitespace():
    assert canonical_json({"b": [1, {"d": 1, "c": "é"}], "a": None}) == '{"a":null,"b":[1,{"c":"é","d":1}]}'


def test_the_key_covers_upstream_method_path_query_and_body_but_not_order_or_ids():
    base = job({"model": "m", "messages": [{"role": "user", "content": "hi"}]})
    same = job({"messages": [{"content": "hi", "role": "user"}], "model": "m"}, id="other", metadata={"x": 1})
    assert cache_key("openai", base) == cache_key("openai", same)
    material = '["openai","POST","/v1/chat/completions",{},{"messages":[{"content":"hi","role":"user"}],"model":"m"}]'
    assert cache_key("openai", base) == hashlib.sha256(material.encode()).hexdigest()
    assert cache_key("other", base) != cache_key("openai", base)
    changed = [job({"model": "m2", "messages": [{"role": "user", "content": "hi"}]}),
               Job.model_validate({"request": {"method": "PUT", "path": "/v1/chat/completions", "json": base.request.json_body}}),
               Job.model_validate({"request": {"path": "/v1/embeddings", "json": base.request.json_body}}),
               Job.model_validate({"request": {"path": "/v1/chat/completions", "query": {"a": "1"},
                                               "json": base.request.json_body}})]
    assert len({cache_key("openai", j) for j in [base, *changed]}) == 5


def test_headers_that_can_change_the_answer_are_in_the_key_tracing_and_client_make_are_not():
    """A gateway trial: the same body with `OpenAI-Project: proj_B` was a hit on project A's entry."""
    body = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}

    def with_headers(**headers) -> Job:
        return Job.model_validate({"request": {"method": "POST", "path": "/v1/chat/completions", "json": body,
                                               "headers": headers}})

    keys = {cache_key("openai", with_headers(**headers)) for headers in (
        {}, {"OpenAI-Project": "proj_A"}, {"OpenAI-Project": "proj_B"}, {"OpenAI-Organization": "org_1"},
        {"OpenAI-Beta": "assistants=v2"}, {"anthropic-version": "2023-06-01"})}
    assert len(keys) == 6
    assert cache_key("openai", with_headers(**{"openai-project": "proj_A"})) == \
        cache_key("openai", with_headers(**{"OpenAI-Project": "proj_A"}))  # names in any case
    plain = cache_key("openai", with_headers())
    assert plain == cache_key("openai", job(body))  # no header: the key it had before headers counted
    assert cache_key("openai", with_headers(**{"traceparent": "00-" + "a" * 32 + "-" + "b" * 16 + "-01",
                                               "Idempotency-Key": "k-1", "User-Agent": "OpenAI/Python 3.57.0",
                                               "X-Stainless-Retry-Count": "2"})) == plain


def test_which_jobs_are_looked_up_and_written():
    assert not wants_lookup(job({"m": 1})) and not wants_write(job({"m": 1}))  # off by default
    assert wants_lookup(job({"m": 1}, cache_ttl_s=5)) and wants_write(job({"m": 1}, cache_ttl_s=5))
    refresh = job({"m": 1}, cache_ttl_s=5, cache_refresh=True)
    assert not wants_lookup(refresh) and wants_write(refresh)  # bypass the lookup, still write
    streamed = job({"m": 1, "stream": True}, cache_ttl_s=5)
    assert not wants_lookup(streamed) and not wants_write(streamed)
    with pytest.raises(ValueError):
        job({"m": 1}, cache_ttl_s=0)
    assert b"cache_ttl_s" not in job({"m": 1}).to_json()  # absent on the wire unless set: old readers keep working


@pytest.mark.parametrize("header, expected", [
    ("no-cache", True), ("No-Cache", True), ("max-age=0, no-cache", True), ('no-cache="set-cookie"', True),
    ("no-store", False), ("max-age=60", False), (None, False), ("", False)])
def test_cache_control_no_cache_is_a_directive_match(header, expected):
    assert no_cache(header) is expected


BASE = {"upstreams": {"u": {"base_url": "http://127.0.0.1:1"}},
        "pools": {"main": {"keys": [{"id": "k1", "secret": "env:K", "rps": 1}]},
                  "alt": {"keys": [{"id": "k2", "secret": "env:K", "rps": 1}]}}}


def test_split_config_reaches_the_scheduler_spec_and_unknown_pools_are_refused():
    config = parse_config({**BASE, "tiers": {"premium": {"pools": ["main"], "split": {"pools": ["alt"], "share": 0.1}},
                                             "normal": {"pools": ["main"]}}})
    tiers = {t.name: t for t in scheduler_spec(config).tiers}
    assert tiers["premium"].split == SplitSpec(("alt",), 0.1) and tiers["normal"].split is None
    with pytest.raises(ConfigError, match="tiers.premium.split.pools: unknown pool 'nope'"):
        parse_config({**BASE, "tiers": {"premium": {"pools": ["main"], "split": {"pools": ["nope"], "share": 0.1}}}})
    with pytest.raises(ConfigError, match="share"):
        parse_config({**BASE, "tiers": {"premium": {"pools": ["main"], "split": {"pools": ["alt"], "share": 1.5}}}})


def test_cache_config_defaults_and_caller_ttl():
    config = parse_config({**BASE, "callers": {"app": {"key": "env:APP", "tier": "normal", "cache_ttl_s": 30}}})
    assert config.callers["app"].cache_ttl_s == 30 and config.cache.max_ttl_s == 86400
    with pytest.raises(ConfigError, match="cache_ttl_s"):
        parse_config({**BASE, "callers": {"app": {"key": "env:APP", "tier": "normal", "cache_ttl_s": -1}}})
