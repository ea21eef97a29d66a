"""The answer cache over real processes: nats-server, the mock upstream, a dispatcher, a worker
and `ratefleet gateway`, driven by the official OpenAI SDK and by the Python client
(ratefleet/runtime/cache.py). The mock's per-key call counters say whether a call was made."""

from __future__ import annotations

import asyncio
import re

import httpx
import openai
import pytest
from fleetkit import FleetKit, chat_job, mock_keys, wait_for_leader
from gatewaykit import CALLER_KEYS, caller_env, callers, start_gateway
from prometheus_client.parser import text_string_to_metric_families

from ratefleet import Client
from ratefleet.mock import MockSettings, running_mock

pytestmark = [pytest.mark.timeout(150), pytest.mark.anyio]
CACHED_KEY = "rk-cached-0123456789abcdef"
BRIEF_KEY = "rk-brief-0123456789abcdef"
MESSAGES = [{"role": "user", "content": "cache me"}]


@pytest.fixture
def upstream():
    with running_mock(MockSettings(keys=mock_keys(rps=200, burst=20), accept_unknown=False)) as mock:
        yield mock


@pytest.fixture
def gateway(tmp_path, nats_server, upstream, monkeypatch):
    caller_env(monkeypatch)
    monkeypatch.setenv("RF_CALLER_CACHED", CACHED_KEY)
    monkeypatch.setenv("RF_CALLER_BRIEF", BRIEF_KEY)
    table = callers(cached={"key": "env:RF_CALLER_CACHED", "tier": "normal", "cache_ttl_s": 300},
                    brief={"key": "env:RF_CALLER_BRIEF", "tier": "normal", "cache_ttl_s": 1})
    kit = FleetKit(tmp_path, nats_server.url, upstream.url, overrides={"callers": table})
    kit.dispatcher("d1")
    kit.worker("w1")
    try:
        kit.gateway_url = start_gateway(kit)  # type: ignore[attr-defined]
        yield kit
    finally:
        kit.stop()


def calls(upstream) -> int:
    return sum(key["calls"] for key in upstream.stats()["keys"].values())


def sdk(kit, key: str) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=kit.gateway_url + "/v1", api_key=key, max_retries=0, timeout=30)


async def chat(ai: openai.AsyncOpenAI, content: str = "cache me", **extra):
    raw = await ai.chat.completions.with_raw_response.create(
        model="mock", messages=[{"role": "user", "content": content}], **extra)
    return raw, raw.parse()


async def test_the_same_chat_twice_is_answered_from_the_cache_without_a_call(gateway, nats_server, upstream):
    async with await Client.connect(nats_server.url) as client:
        await wait_for_leader(client)
        async with sdk(gateway, CACHED_KEY) as ai:
            first_raw, first = await chat(ai)
            assert first_raw.headers["x-ratefleet-cache"] == "miss"
            second_raw, second = await chat(ai)
        assert second_raw.headers["x-ratefleet-cache"] == "hit"
        assert second.choices[0].message.content == first.choices[0].message.content == "echo: cache me"
        assert calls(upstream) == 1  # the second answer cost no call
        paid = await client.stored_result(first_raw.headers["x-ratefleet-job-id"])
        hit = await client.stored_result(second_raw.headers["x-ratefleet-job-id"])
        status = await client.status()
    assert paid is not None and paid.ok and not paid.cached and paid.key_id in {"k1", "k2"}
    assert hit is not None and hit.ok and hit.cached and hit.key_id is None and hit.attempts == 0
    assert hit.response.json_body == paid.response.json_body and hit.metadata == {"caller": "cached"}
    # no key token spent: the leader dispatched one job in all
    assert sum(tier.get("dispatched", 0) for tier in status["tiers"].values()) == 1
    # the gateway's /metrics counts the lookup results
    scraped = httpx.get(gateway.gateway_url + "/metrics", timeout=10, trust_env=False).text
    lookups = {s.labels["result"]: s.value for family in text_string_to_metric_families(scraped)
               if family.name == "ratefleet_cache_requests" for s in family.samples if s.name.endswith("_total")}
    assert lookups == {"hit": 1.0, "miss": 1.0}, scraped
    # and every answer, by caller and status (an operations trial: the cache counters were all there was)
    async with sdk(gateway, "not-a-caller-key") as ai:
        with pytest.raises(openai.AuthenticationError):
            await chat(ai)
    scraped = httpx.get(gateway.gateway_url + "/metrics", timeout=10, trust_env=False).text
    answered = {(s.labels["caller"], s.labels["status"]): s.value for family in text_string_to_metric_families(scraped)
                if family.name == "ratefleet_gateway_requests" for s in family.samples if s.name.endswith("_total")}
    assert answered == {("cached", "200"): 2.0, ("unknown", "401"): 1.0}, scraped
    timed = {s.labels["caller"]: s.value for family in text_string_to_metric_families(scraped)
             if family.name == "ratefleet_gateway_request_duration_seconds" for s in family.samples
             if s.name.endswith("_count")}
    assert timed == {"cached": 2.0, "unknown": 1.0}, scraped
    # every gateway metric the Grafana dashboard queries is on a live gateway's /metrics
    from test_metrics_probes import dashboard_metrics
    declared = set(re.findall(r"^(ratefleet_gateway_\w+)(?:\{| )", scraped, re.M))
    wanted = {name for name in dashboard_metrics() if name.startswith("ratefleet_gateway_")}
    assert wanted and wanted <= declared, wanted - declared


async def test_canonical_body_shares_the_entry_and_another_body_does_not(gateway, upstream):
    async with sdk(gateway, CACHED_KEY) as ai:
        await ai.chat.completions.create(model="mock", messages=MESSAGES, temperature=0.5, max_tokens=7)
        # the same JSON value, keys in another order and other spacing: the same entry
        text = ('{ "max_tokens": 7,\n "temperature": 0.5, "messages": [{"content": "cache me", "role": "user"}],'
                '  "model": "mock" }')
        async with httpx.AsyncClient(trust_env=False, timeout=30) as http:
            reordered = await http.post(gateway.gateway_url + "/v1/chat/completions", content=text,
                                        headers={"authorization": f"Bearer {CACHED_KEY}",
                                                 "content-type": "application/json"})
        assert reordered.status_code == 200 and reordered.headers["x-ratefleet-cache"] == "hit"
        other_raw, _ = await chat(ai, "something else")
    assert other_raw.headers["x-ratefleet-cache"] == "miss"
    assert calls(upstream) == 2


async def test_no_cache_bypasses_the_lookup_and_refreshes_the_entry(gateway, upstream):
    async with sdk(gateway, CACHED_KEY) as ai:
        await chat(ai)
        bypass_raw, _ = await chat(ai, extra_headers={"Cache-Control": "no-cache"})
        assert bypass_raw.headers["x-ratefleet-cache"] == "bypass"
        assert calls(upstream) == 2
        again_raw, _ = await chat(ai)
    assert again_raw.headers["x-ratefleet-cache"] == "hit"
    assert calls(upstream) == 2


async def test_a_non_2xx_answer_is_not_cached(gateway, upstream):
    async with sdk(gateway, CACHED_KEY) as ai:
        for _ in range(2):
            with pytest.raises(openai.BadRequestError) as caught:
                await ai.chat.completions.create(model="mock", messages=MESSAGES, extra_body={"mock": {"status": 400}})
            assert caught.value.response.headers["x-ratefleet-cache"] == "miss"
    assert calls(upstream) == 2


async def test_an_entry_past_its_ttl_is_a_miss(gateway, upstream):
    async with sdk(gateway, BRIEF_KEY) as ai:  # cache_ttl_s = 1
        await chat(ai)
        soon_raw, _ = await chat(ai)
        await asyncio.sleep(2.5)
        late_raw, _ = await chat(ai)
    assert soon_raw.headers["x-ratefleet-cache"] == "hit"
    assert late_raw.headers["x-ratefleet-cache"] == "miss"
    assert calls(upstream) == 2


async def test_without_cache_ttl_s_every_request_is_called(gateway, upstream):
    async with sdk(gateway, CALLER_KEYS["alice"]) as ai:  # no cache_ttl_s: off by default
        first_raw, _ = await chat(ai)
        second_raw, _ = await chat(ai)
    assert "x-ratefleet-cache" not in first_raw.headers and "x-ratefleet-cache" not in second_raw.headers
    assert calls(upstream) == 2


async def test_client_jobs_are_looked_up_by_the_dispatchers_intake(gateway, nats_server, upstream):
    """Jobs from the Python client (submit and request/reply) with cache_ttl_s: the second
    identical job gets one stored Result with cached: true and costs no call."""
    async with await Client.connect(nats_server.url) as client:
        await wait_for_leader(client)
        first = await client.request(chat_job(1, cache_ttl_s=60), tier="normal", timeout=30)
        second = await client.request(chat_job(1, cache_ttl_s=60), tier="normal", timeout=30)
        job_id = await client.submit(chat_job(1, cache_ttl_s=60, batch="cachedbatch"), tier="normal")
        stored = None
        for _ in range(100):
            stored = await client.stored_result(job_id)
            if stored is not None:
                break
            await asyncio.sleep(0.1)
        uncached = await client.request(chat_job(1), tier="normal", timeout=30)
        refreshed = await client.request(chat_job(1, cache_ttl_s=60, cache_refresh=True), tier="normal", timeout=30)
        status = await client.status()
    assert first.ok and not first.cached and first.attempts == 1
    assert second.ok and second.cached and second.attempts == 0 and second.key_id is None
    assert second.response.json_body == first.response.json_body
    assert stored is not None and stored.cached and stored.batch == "cachedbatch"
    assert not uncached.cached and not refreshed.cached
    assert calls(upstream) == 3  # first, the job without cache_ttl_s, the cache_refresh one
    assert status["cache"]["hits"] == 2 and status["cache"]["misses"] == 1
