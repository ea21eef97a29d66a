"""The gateway driven by the official OpenAI SDK (base_url http://HOST:PORT/v1), over real
processes: nats-server, the mock upstream, a dispatcher, a worker, `ratefleet gateway`."""

from __future__ import annotations

import anyio
import openai
import pytest
from fleetkit import FleetKit, mock_keys, wait_for_leader
from gatewaykit import CALLER_KEYS, caller_env, callers, fleet_with_gateway, sdk, start_gateway

from ratefleet import Client
from ratefleet.mock import MockSettings, running_mock

pytestmark = [pytest.mark.timeout(120), pytest.mark.anyio]


@pytest.fixture
def upstream():
    settings = MockSettings(keys=mock_keys(rps=200, burst=20), accept_unknown=False, tokens_per_call=500)
    with running_mock(settings) as mock:
        yield mock


@pytest.fixture
def gateway(tmp_path, nats_server, upstream, monkeypatch):
    caller_env(monkeypatch)
    with fleet_with_gateway(FleetKit(tmp_path, nats_server.url, upstream.url, overrides={"callers": callers()})) as kit:
        yield kit


async def test_sdk_chat_embeddings_and_models_run_as_jobs_on_the_callers_tier(gateway, nats_server, upstream):
    async with await Client.connect(nats_server.url) as client:
        await wait_for_leader(client)
        async with sdk(gateway) as ai:
            raw = await ai.chat.completions.with_raw_response.create(
                model="mock", messages=[{"role": "user", "content": "hello gateway"}])
            chat = raw.parse()
            assert chat.choices[0].message.content == "echo: hello gateway"
            job_id = raw.headers["x-ratefleet-job-id"]
            assert float(raw.headers["x-ratefleet-queued-ms"]) >= 0
            vectors = await ai.embeddings.create(model="mock-embedding", input=["a", "b"])
            assert [len(item.embedding) for item in vectors.data] == [8, 8]
            models = await ai.models.list()
            assert {m.id for m in models.data} == {"mock", "mock-embedding"}
        stored = await client.stored_result(job_id)
    assert stored is not None and stored.ok
    assert stored.tier == "vip" and stored.metadata == {"caller": "alice"}
    assert stored.key_id in {"k1", "k2"}  # called with the fleet's key, not the caller's
    assert upstream.stats()["keys"]["k1"]["calls"] + upstream.stats()["keys"]["k2"]["calls"] == 3


async def test_unknown_key_is_an_authentication_error_and_never_logged(gateway, upstream):
    wrong = "rk-not-a-caller-5f5f5f5f5f"
    async with sdk(gateway, key=wrong) as ai:
        with pytest.raises(openai.AuthenticationError) as caught:
            await ai.chat.completions.create(model="mock", messages=[{"role": "user", "content": "hi"}])
    assert caught.value.status_code == 401
    assert caught.value.code == "invalid_api_key" and caught.value.type == "invalid_request_error"
    async with sdk(gateway) as ai:  # a good key still works afterwards
        await ai.chat.completions.create(model="mock", messages=[{"role": "user", "content": "hi"}])
    calls = sum(key["calls"] for key in upstream.stats()["keys"].values())
    assert calls == 1
    logs = gateway.logs()
    assert '"status": 401' in logs and '"caller": "alice"' in logs
    for secret in [wrong, *CALLER_KEYS.values()]:
        assert secret not in logs


async def test_a_caller_over_its_request_rate_gets_a_rate_limit_error_with_retry_after(gateway, upstream):
    async with sdk(gateway, "bob") as ai:
        await ai.chat.completions.create(model="mock", messages=[{"role": "user", "content": "one"}])
        with pytest.raises(openai.RateLimitError) as caught:
            await ai.chat.completions.create(model="mock", messages=[{"role": "user", "content": "two"}])
    error = caught.value
    assert error.status_code == 429 and error.code == "rate_limit_exceeded" and error.type == "requests"
    assert 1 <= int(error.response.headers["retry-after"]) <= 5  # 1 request per 5 s
    assert sum(key["calls"] for key in upstream.stats()["keys"].values()) == 1  # the refused one was never queued
    async with sdk(gateway, "alice") as ai:  # another caller is not held back by bob's limit
        await ai.chat.completions.create(model="mock", messages=[{"role": "user", "content": "three"}])


async def test_tokens_per_minute_are_charged_from_the_answers_usage(gateway):
    # carol may use 400 tokens a minute; the upstream reports 500 per call: the first call is let
    # through on its estimate (~20 tokens), its real usage then puts carol 100 tokens in debt
    async with sdk(gateway, "carol") as ai:
        await ai.chat.completions.create(model="mock", messages=[{"role": "user", "content": "one"}])
        with pytest.raises(openai.RateLimitError) as caught:
            await ai.chat.completions.create(model="mock", messages=[{"role": "user", "content": "two"}])
    assert caught.value.type == "tokens"
    assert 10 <= int(caught.value.response.headers["retry-after"]) <= 25  # (100 + ~20) tokens at 400/min


async def test_provider_errors_pass_through_unchanged_and_model_limits_hold(gateway):
    async with sdk(gateway) as ai:
        with pytest.raises(openai.BadRequestError) as caught:
            await ai.chat.completions.create(model="mock", messages=[{"role": "user", "content": "x"}],
                                             extra_body={"mock": {"status": 400}})
        assert caught.value.body["message"] == "The mock upstream was told to answer 400."  # the upstream's own
        assert caught.value.response.headers["x-ratefleet-job-id"]
        with pytest.raises(openai.PermissionDeniedError) as denied:
            await ai.chat.completions.create(model="gpt-4o", messages=[{"role": "user", "content": "x"}])
    assert denied.value.code == "model_not_allowed" and denied.value.param == "model"


async def test_the_sdks_own_retries_do_not_repeat_what_the_fleet_retried_or_paid(tmp_path, nats_server, upstream,
                                                                               monkeypatch):
    """The OpenAI SDK retries 5xx and 429 answers twice by default. A 500 the fleet already
    retried max_attempts times came back as a 500, so the SDK sent the request twice more: new
    jobs, each retried again (15 upstream calls for one request); and a 504 at the caller's
    timeout, whose job may still be in its call, became a second paid job. The gateway now says
    `x-should-retry: false` (which the SDK obeys) on both."""
    caller_env(monkeypatch)
    overrides = {"callers": {"dave": {"key": "env:RF_CALLER_ALICE", "tier": "normal"},
                             "erin": {"key": "env:RF_CALLER_BOB", "tier": "normal", "timeout_s": 1.5}},
                 "tiers": {"normal": {"pools": ["shared"], "max_attempts": 3}}}
    kit = FleetKit(tmp_path, nats_server.url, upstream.url, overrides=overrides)
    kit.dispatcher("d1")
    kit.worker("w1")
    try:
        kit.gateway_url = start_gateway(kit)  # type: ignore[attr-defined]
        def sdk_with_retries(caller: str) -> openai.AsyncOpenAI:  # the SDK's default: 2 retries
            return openai.AsyncOpenAI(base_url=kit.gateway_url + "/v1", api_key=CALLER_KEYS[caller], timeout=30)

        async with sdk_with_retries("alice") as ai:
            with pytest.raises(openai.InternalServerError) as failed:
                await ai.chat.completions.create(model="mock", messages=[{"role": "user", "content": "x"}],
                                                 extra_body={"mock": {"status": 500}})
            assert failed.value.response.headers["x-should-retry"] == "false"
            assert sum(key["calls"] for key in upstream.stats()["keys"].values()) == 3  # before: 9
        async with sdk_with_retries("bob") as ai:
            with pytest.raises(openai.APIStatusError) as late:
                await ai.chat.completions.create(model="mock", messages=[{"role": "user", "content": "slow"}],
                                                 extra_body={"mock": {"sleep_ms": 2500}})
            assert late.value.status_code == 504 and late.value.code == "job_timeout"
            assert late.value.response.headers["x-should-retry"] == "false"
            await anyio.sleep(1.5)  # the slow call ends (paid); no retry made another
            assert sum(key["calls"] for key in upstream.stats()["keys"].values()) == 4  # one call: no second job
    finally:
        kit.stop()
