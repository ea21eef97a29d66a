"""`"stream": true` through the gateway with the OpenAI SDK: chunks relayed as server-sent
events while the worker reads them, the stored Result holding the whole answer."""

from __future__ import annotations

import time

import anyio
import openai
import pytest
from fleetkit import SECRETS, FleetKit, mock_keys, wait_for_leader
from gatewaykit import CALLER_KEYS, caller_env, callers, start_gateway

from ratefleet import Client
from ratefleet.mock import MockSettings, running_mock

pytestmark = [pytest.mark.timeout(120), pytest.mark.anyio]


@pytest.fixture
def gateway(tmp_path, nats_server, monkeypatch):
    caller_env(monkeypatch)
    with running_mock(MockSettings(keys=mock_keys(rps=200, burst=20), accept_unknown=False)) as upstream:
        kit = FleetKit(tmp_path, nats_server.url, upstream.url, overrides={"callers": callers()})
        kit.dispatcher("d1")
        kit.worker("w1")
        try:
            kit.gateway_url = start_gateway(kit)  # type: ignore[attr-defined]
            kit.upstream = upstream  # type: ignore[attr-defined]
            yield kit
        finally:
            kit.stop()


async def test_a_streamed_chat_arrives_chunk_by_chunk_and_its_result_holds_the_whole_answer(gateway, nats_server):
    async with await Client.connect(nats_server.url) as client:
        await wait_for_leader(client)
        async with openai.AsyncOpenAI(base_url=gateway.gateway_url + "/v1", api_key=CALLER_KEYS["alice"],
                                      max_retries=0, timeout=30) as ai:
            started = time.monotonic()
            raw = await ai.chat.completions.with_raw_response.create(
                model="mock", messages=[{"role": "user", "content": "one two three four"}], stream=True,
                extra_body={"mock": {"chunk_ms": 400}})
            job_id = raw.headers["x-ratefleet-job-id"]
            # the provider's request id (what its support asks for) comes with the stream, before any Result
            request_id = raw.headers.get("x-request-id")
            arrivals, text = [], []
            async for chunk in raw.parse():
                arrivals.append(time.monotonic() - started)
                text.append(chunk.choices[0].delta.content or "")
        stored = await client.stored_result(job_id)
    assert "".join(text) == "echo: one two three four"
    assert len(arrivals) == 7  # role, 5 words, finish: 6 pauses of 0.4 s after the first
    assert arrivals[-1] - arrivals[0] >= 2.0  # the first chunk came while the upstream was still sending
    assert stored is not None and stored.ok and stored.metadata == {"caller": "alice"}
    assert stored.response.headers["content-type"].startswith("text/event-stream")
    assert request_id is not None and request_id.startswith("req_") and raw.request_id == request_id
    assert stored.response.headers["x-request-id"] == request_id  # the very answer's, not another call's
    assert stored.response.body.count("data: ") == 8 and stored.response.body.endswith("data: [DONE]\n\n")
    assert gateway.upstream.stats()["keys"]["k1"]["calls"] + gateway.upstream.stats()["keys"]["k2"]["calls"] == 1


async def test_a_key_echoed_in_a_stream_reaches_the_caller_masked_as_in_the_result(gateway, nats_server):
    # a gateway trial: the stored Result had the serving key masked, the streamed bytes had it in clear
    async with await Client.connect(nats_server.url) as client:
        await wait_for_leader(client)
        async with openai.AsyncOpenAI(base_url=gateway.gateway_url + "/v1", api_key=CALLER_KEYS["alice"],
                                      max_retries=0, timeout=30) as ai:
            raw = await ai.chat.completions.with_raw_response.create(
                model="mock", messages=[{"role": "user", "content": f"{SECRETS['k1']} {SECRETS['k2']}"}], stream=True)
            text = "".join([chunk.choices[0].delta.content or "" async for chunk in raw.parse()])
        stored = await client.stored_result(raw.headers["x-ratefleet-job-id"])
    assert stored is not None and stored.key_id in ("k1", "k2")
    other = "k2" if stored.key_id == "k1" else "k1"  # the caller's own text, not the key this call used
    assert SECRETS[stored.key_id] not in text and text == f"echo: *** {SECRETS[other]}"
    assert SECRETS[stored.key_id] not in stored.response.body


async def test_a_streamed_request_the_provider_refuses_gets_its_error_unchanged(gateway):
    async with openai.AsyncOpenAI(base_url=gateway.gateway_url + "/v1", api_key=CALLER_KEYS["alice"],
                                  max_retries=0, timeout=30) as ai:
        with pytest.raises(openai.BadRequestError) as caught:
            await ai.chat.completions.create(model="mock", messages=[{"role": "user", "content": "x"}], stream=True,
                                             extra_body={"mock": {"status": 400}})
    assert caught.value.body["message"] == "The mock upstream was told to answer 400."


async def test_a_streams_usage_corrects_the_callers_tokens_per_minute(gateway):
    """carol may use 400 tokens a minute. A stream asking max_tokens 300 is charged ~303 on
    entry; its usage chunk says 10, and the charge is corrected to that, so her next such
    request is let through at once (before, the estimate stayed and it was refused for ~30 s)."""
    ask = {"model": "mock", "messages": [{"role": "user", "content": "one"}], "max_tokens": 300, "stream": True,
           "stream_options": {"include_usage": True}}
    async with openai.AsyncOpenAI(base_url=gateway.gateway_url + "/v1", api_key=CALLER_KEYS["carol"],
                                  max_retries=0, timeout=30) as ai:
        usage = [chunk.usage async for chunk in await ai.chat.completions.create(**ask) if chunk.usage]
        assert usage[-1].total_tokens == 10
        deadline = time.monotonic() + 2.0  # the correction lands once the stream's last part is sent
        while True:
            try:
                second = [chunk async for chunk in await ai.chat.completions.create(**ask)]
                break
            except openai.RateLimitError as refused:
                assert refused.type == "tokens"
                if time.monotonic() > deadline:
                    raise
    assert second


async def test_a_stopping_gateway_ends_an_open_stream_with_an_error_event_naming_the_job(gateway, nats_server):
    """A gateway trial: SIGTERM to the gateway mid-stream cut the stream with a bare connection
    reset after uvicorn's 5 s graceful timeout (the SDK: `APIConnectionError`, no job named) and
    logged a ConnectionDrainingError traceback. Now the stream ends, STOP_GRACE_S after the stop,
    with the OpenAI-style error event the SDKs raise as an APIError naming the job; the job runs
    on and its Result is stored."""
    import signal

    from ratefleet.gateway.streaming import STOP_GRACE_S

    [proc] = [p for p in gateway.processes if p.name == "gateway"]
    async with await Client.connect(nats_server.url) as client:
        await wait_for_leader(client)
        async with openai.AsyncOpenAI(base_url=gateway.gateway_url + "/v1", api_key=CALLER_KEYS["alice"],
                                      max_retries=0, timeout=60) as ai:
            raw = await ai.chat.completions.with_raw_response.create(
                model="mock", messages=[{"role": "user", "content": "one two three four five six seven eight"}],
                stream=True, extra_body={"mock": {"chunk_ms": 1500}})  # 10 chunks over 13.5 s
            job_id = raw.headers["x-ratefleet-job-id"]
            text, stopped = [], None
            with pytest.raises(openai.APIError) as cut:
                async for chunk in raw.parse():
                    text.append(chunk.choices[0].delta.content or "")
                    if stopped is None:
                        proc.send_signal(signal.SIGTERM)
                        stopped = time.monotonic()
            ended = time.monotonic() - stopped
        stored = None
        for _ in range(100):
            if (stored := await client.stored_result(job_id)) is not None:
                break
            await anyio.sleep(0.2)
    assert cut.value.code == "stream_interrupted" and "the gateway is stopping" in cut.value.message
    assert f"ratefleet result {job_id}" in cut.value.message
    assert STOP_GRACE_S - 0.5 <= ended <= STOP_GRACE_S + 1.5, ended  # parts kept coming until then
    assert 2 <= len(text) < 10
    assert proc.wait(timeout=30) == 0
    logs = gateway.logs()
    assert "Traceback" not in logs and "ConnectionDrainingError" not in logs, logs[-3000:]
    assert stored is not None and stored.ok  # the job ran on
