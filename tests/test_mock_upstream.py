"""The mock upstream: pure limit arithmetic first, then a real uvicorn server over HTTP."""

from __future__ import annotations

import asyncio
import hashlib
import json
import time
from collections.abc import Iterator
from contextlib import contextmanager

import httpx
import pytest

from ratefleet.mock import (
    KeyLimiter,
    MockKey,
    MockSettings,
    RunningMock,
    create_app,
    format_duration,
    parse_key_spec,
    running_mock,
    serve,
)
from ratefleet.mock.server import bind_socket

CHAT = "/v1/chat/completions"
HELLO = {"model": "gpt-test", "messages": [{"role": "system", "content": "x"}, {"role": "user", "content": "hello"}]}


def bearer(secret: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {secret}"}


@contextmanager
def mock_and_client(*keys: MockKey, **settings: object) -> Iterator[tuple[RunningMock, httpx.Client]]:
    with running_mock(MockSettings(keys=keys, **settings)) as mock:  # type: ignore[arg-type]
        with httpx.Client(base_url=mock.url, trust_env=False, timeout=10) as client:
            yield mock, client


# --- pure core: a fake clock, no server -------------------------------------------------


@pytest.mark.parametrize(
    ("seconds", "text"),
    [(0, "0s"), (0.02, "20ms"), (0.0201, "21ms"), (0.05, "50ms"), (1.5, "1.5s"), (360, "6m0s"), (3723.25, "1h2m3.25s")],
)
def test_format_duration_is_openai_style(seconds: float, text: str) -> None:
    assert format_duration(seconds) == text


def test_limiter_spends_only_when_every_limit_allows() -> None:
    key = MockKey(id="k", secret="s", rps=2, burst=2, concurrency=2, cost_per_minute=60)
    t0 = 100.0
    limiter = KeyLimiter(key, t0)
    first = limiter.admit(t0, cost=25)
    assert first.allowed and first.requests.remaining == 1 and first.tokens.remaining == 35
    second = limiter.admit(t0, cost=25)
    assert second.allowed and second.requests.remaining == 0
    limiter.release()
    limiter.release()
    refused = limiter.admit(t0 + 0.25, cost=25)  # half a request token back
    assert (refused.allowed, refused.reason, refused.retry_after_s) == (False, "requests", 0.25)
    assert refused.tokens.remaining == 10  # the refusal charged nothing
    short = limiter.admit(t0 + 0.5, cost=25)  # one request token back, but only 10.5 cost tokens
    assert (short.allowed, short.reason) == (False, "tokens")
    assert short.retry_after_s == pytest.approx(14.5)
    assert limiter.admit(t0 + 15, cost=25).allowed


def test_limiter_caps_calls_in_flight() -> None:
    limiter = KeyLimiter(MockKey(id="k", secret="s", rps=100, burst=10, concurrency=1), 0.0)
    assert limiter.admit(0.0).allowed
    assert limiter.admit(0.0).reason == "concurrency"
    limiter.release()
    assert limiter.admit(0.0).allowed


# --- parse_key_spec and settings ------------------------------------------------------------


def test_parse_key_spec_reads_every_field() -> None:
    key = parse_key_spec("k1=sk-abc:rps=20:burst=5:concurrency=4:cost_per_minute=9000:status=401")
    assert key == MockKey(id="k1", secret="sk-abc", rps=20, burst=5, concurrency=4, cost_per_minute=9000, status=401)
    assert parse_key_spec("k2=sk-def") == MockKey(id="k2", secret="sk-def", rps=20, burst=5)


@pytest.mark.parametrize(
    ("spec", "complaint"),
    [
        ("k1", "ID=SECRET"), ("=sk-hidden", "ID=SECRET"), ("k1=", "ID=SECRET"),
        ("k1=sk-hidden:rps=fast", "'rps'"), ("k1=sk-hidden:speed=3", "'speed'"),
        ("k1=sk-hidden:burst", "'burst'"), ("k1=sk-hidden:concurrency=2.5", "'concurrency'"),
        ("k1=sk-hidden:rps=1:rps=2", "given twice"), ("k1=sk-hidden:rps=-1", "rps"),
        ("k1=sk-hidden:burst=0.5", "burst"), ("k1=sk-hidden:status=99", "status"),
    ],
)
def test_parse_key_spec_names_the_bad_part_but_not_the_secret(spec: str, complaint: str) -> None:
    with pytest.raises(ValueError) as caught:
        parse_key_spec(spec)
    assert complaint in str(caught.value)
    assert "sk-hidden" not in str(caught.value)


def test_settings_repr_hides_secrets() -> None:
    settings = MockSettings(keys=[parse_key_spec("k1=sk-hidden")])
    assert "sk-hidden" not in repr(settings)


# --- the real server -----------------------------------------------------------------


def test_chat_completion_answers_with_usage_and_ratelimit_headers() -> None:
    key = MockKey(id="k1", secret="sk-one", rps=20, burst=5)
    with mock_and_client(key, tokens_per_call=7) as (mock, client):
        response = client.post(CHAT, headers=bearer("sk-one"), json=HELLO)
        assert response.status_code == 200
        body = response.json()
        assert body["object"] == "chat.completion" and body["model"] == "gpt-test"
        assert body["choices"][0]["message"] == {"role": "assistant", "content": "echo: hello"}
        assert body["choices"][0]["finish_reason"] == "stop"
        assert body["usage"]["total_tokens"] == 7
        assert body["usage"]["prompt_tokens"] + body["usage"]["completion_tokens"] == 7
        assert response.headers["x-ratelimit-limit-requests"] == "5"
        assert response.headers["x-ratelimit-remaining-requests"] == "4"
        assert response.headers["x-ratelimit-reset-requests"].endswith("ms")
        assert "retry-after" not in response.headers
        assert mock.stats()["keys"]["k1"]["ok"] == 1


def test_embeddings_models_and_unknown_paths() -> None:
    with mock_and_client(MockKey(id="k1", secret="sk-one", rps=100, burst=10)) as (_, client):
        vectors = client.post("/v1/embeddings", headers=bearer("sk-one"), json={"input": ["a", "b"]}).json()
        assert [item["index"] for item in vectors["data"]] == [0, 1]
        assert all(len(item["embedding"]) == 8 for item in vectors["data"])
        models = client.get("/v1/models", headers=bearer("sk-one")).json()
        assert "mock" in [model["id"] for model in models["data"]]
        missing = client.post("/v1/nothing/here", headers=bearer("sk-one"), json={})
        assert missing.status_code == 404 and missing.json()["error"]["code"] == "unknown_url"
        assert client.get("/elsewhere").status_code == 404


def test_missing_or_unknown_secret_gets_401_and_no_secret_is_ever_echoed() -> None:
    key = MockKey(id="k1", secret="sk-known-secret", rps=100, burst=10)
    with mock_and_client(key, accept_unknown=False) as (mock, client):
        answers = [
            client.post(CHAT, json=HELLO),
            client.post(CHAT, headers=bearer("sk-stranger-secret"), json=HELLO),
            client.post(CHAT, headers={"Authorization": "Basic sk-known-secret"}, json=HELLO),
        ]
        assert [answer.status_code for answer in answers] == [401, 401, 401]
        assert answers[1].json()["error"]["code"] == "invalid_api_key"
        assert client.post(CHAT, headers=bearer("sk-known-secret"), json=HELLO).status_code == 200
        seen = [a.text + json.dumps(dict(a.headers)) for a in answers]
        seen += [json.dumps(mock.stats()), json.dumps(mock.log()), client.get("/_mock/config").text]
        assert not any("sk-stranger-secret" in text or "sk-known-secret" in text for text in seen)


def test_unknown_secret_gets_default_limits_under_a_hashed_id() -> None:
    with mock_and_client(default_rps=0.01, default_burst=2) as (mock, client):  # no refill within the test
        statuses = [client.post(CHAT, headers=bearer("sk-walk-in"), json=HELLO).status_code for _ in range(3)]
        assert statuses == [200, 200, 429]
        key_id = "unknown-" + hashlib.sha256(b"sk-walk-in").hexdigest()[:8]
        assert mock.stats()["keys"][key_id]["calls"] == 3


def test_burst_passes_then_429_with_retry_after() -> None:
    with mock_and_client(MockKey(id="k1", secret="sk-one", rps=0.01, burst=3)) as (mock, client):  # no refill
        answers = [client.post(CHAT, headers=bearer("sk-one"), json=HELLO) for _ in range(5)]
        assert [a.status_code for a in answers] == [200, 200, 200, 429, 429]
        assert [a.headers["x-ratelimit-remaining-requests"] for a in answers] == ["2", "1", "0", "0", "0"]
        refused = answers[3]
        assert int(refused.headers["retry-after"]) >= 1
        assert refused.json()["error"]["code"] == "rate_limit_exceeded"
        stats = mock.stats()["keys"]["k1"]
        assert (stats["calls"], stats["ok"], stats["rate_limited"]) == (5, 3, 2)


def test_bucket_refills_after_one_over_rps_and_429s_spend_nothing() -> None:
    # 1 rps: a token comes back after 1 s, so the three refusals hold on a loaded machine
    # (at 20 rps, three calls taking over 50 ms had already earned the next token)
    with mock_and_client(MockKey(id="k1", secret="sk-one", rps=1, burst=1)) as (_, client):
        assert client.post(CHAT, headers=bearer("sk-one"), json=HELLO).status_code == 200
        refused = [client.post(CHAT, headers=bearer("sk-one"), json=HELLO) for _ in range(3)]
        assert [r.status_code for r in refused] == [429, 429, 429]
        assert refused[0].headers["x-ratelimit-reset-requests"].endswith("ms")
        time.sleep(1 + 0.02)
        assert client.post(CHAT, headers=bearer("sk-one"), json=HELLO).status_code == 200


def test_concurrency_cap_refuses_calls_beyond_it() -> None:
    key = MockKey(id="k1", secret="sk-one", rps=100, burst=100, concurrency=2)

    async def four_slow_calls(url: str) -> list[int]:
        slow = {**HELLO, "mock": {"sleep_ms": 300}}
        async with httpx.AsyncClient(base_url=url, trust_env=False, timeout=10) as client:
            answers = await asyncio.gather(*(client.post(CHAT, headers=bearer("sk-one"), json=slow) for _ in range(4)))
        return sorted(answer.status_code for answer in answers)

    with mock_and_client(key) as (mock, client):
        assert asyncio.run(four_slow_calls(mock.url)) == [200, 200, 429, 429]
        stats = mock.stats()["keys"]["k1"]
        assert (stats["max_in_flight"], stats["in_flight"], stats["rate_limited"]) == (2, 0, 2)
        assert client.post(CHAT, headers=bearer("sk-one"), json=HELLO).status_code == 200


def test_cost_per_minute_limits_tokens() -> None:
    key = MockKey(id="k1", secret="sk-one", rps=0.01, burst=100, cost_per_minute=25)  # no request refill
    with mock_and_client(key, tokens_per_call=10) as (_, client):
        answers = [client.post(CHAT, headers=bearer("sk-one"), json=HELLO) for _ in range(3)]
        assert [a.status_code for a in answers] == [200, 200, 429]
        assert [a.headers["x-ratelimit-remaining-tokens"] for a in answers] == ["15", "5", "5"]
        refused = answers[2]
        assert refused.json()["error"]["type"] == "tokens"
        assert int(refused.headers["retry-after"]) >= 11  # 5 tokens short at 25/60 per second
        assert refused.headers["x-ratelimit-remaining-requests"] == "98"  # the 429 took no request token
        assert client.get("/v1/models", headers=bearer("sk-one")).status_code == 200  # listing costs no tokens


def test_fail_rate_one_answers_500_counted_as_errors() -> None:
    with mock_and_client(MockKey(id="k1", secret="sk-one", rps=100, burst=10), fail_rate=1.0) as (mock, client):
        answers = [client.post(CHAT, headers=bearer("sk-one"), json=HELLO) for _ in range(3)]
        assert [a.status_code for a in answers] == [500, 500, 500]
        assert answers[0].json()["error"]["type"] == "server_error"
        mock.configure(fail_status=503)
        assert client.post(CHAT, headers=bearer("sk-one"), json=HELLO).status_code == 503
        stats = mock.stats()["keys"]["k1"]
        assert (stats["errors"], stats["ok"]) == (4, 0)


def test_request_body_can_force_one_answer_and_bad_bodies_spend_nothing() -> None:
    with mock_and_client(MockKey(id="k1", secret="sk-one", rps=0.01, burst=4)) as (_, client):
        post = lambda **kw: client.post(CHAT, headers=bearer("sk-one"), **kw)  # noqa: E731
        assert post(json={**HELLO, "mock": {"status": 503}}).status_code == 503
        forced = post(json={**HELLO, "mock": {"status": 429, "retry_after": 3}})
        assert (forced.status_code, forced.headers["retry-after"]) == (429, "3")
        assert post(content=b"{not json").status_code == 400
        assert post(json={**HELLO, "mock": {"sleep_ms": "long"}}).status_code == 400
        started = time.perf_counter()
        assert post(json={**HELLO, "mock": {"sleep_ms": 200}}).status_code == 200
        assert time.perf_counter() - started >= 0.2
        # Four tokens: 503, 429, the slow call, and this one; the two 400s took none.
        assert post(json=HELLO).status_code == 200
        assert post(json=HELLO).status_code == 429


def test_config_changes_behaviour_and_reset_clears_stats_and_refills() -> None:
    with mock_and_client(MockKey(id="k1", secret="sk-one", rps=0.01, burst=2)) as (mock, client):
        mock.configure(keys_status={"k1": 401})
        assert client.post(CHAT, headers=bearer("sk-one"), json=HELLO).status_code == 401
        mock.configure(keys_status={"k1": None}, latency_ms=150)
        started = time.perf_counter()
        assert client.post(CHAT, headers=bearer("sk-one"), json=HELLO).status_code == 200
        assert time.perf_counter() - started >= 0.15
        with pytest.raises(httpx.HTTPStatusError):
            mock.configure(fail_rate=2)
        with pytest.raises(httpx.HTTPStatusError):
            mock.configure(keys_status={"nobody": 401})
        assert mock.configure(latency_ms=0)["latency_ms"] == 0
        assert client.post(CHAT, headers=bearer("sk-one"), json=HELLO).status_code == 200
        assert client.post(CHAT, headers=bearer("sk-one"), json=HELLO).status_code == 429
        assert mock.stats()["keys"]["k1"]["calls"] == 4
        mock.reset()
        stats = mock.stats()
        assert stats["requests"] == 0 and stats["keys"]["k1"]["calls"] == 0 and mock.log() == []
        assert client.post(CHAT, headers=bearer("sk-one"), json=HELLO).status_code == 200


def test_stats_count_hosts_and_log_keeps_recent_requests() -> None:
    with mock_and_client(MockKey(id="k1", secret="sk-one", rps=100, burst=10)) as (mock, client):
        for host in ["api.openai.com", "api.openai.com", "other.example"]:
            client.post(CHAT, headers={**bearer("sk-one"), "Host": host}, json=HELLO)
        client.post(CHAT, json=HELLO)
        stats = mock.stats()
        assert stats["requests"] == 4
        assert stats["hosts"]["api.openai.com"] == 2 and stats["hosts"]["other.example"] == 1
        last_two = mock.log(limit=2)
        assert [(row["key"], row["status"], row["host"]) for row in last_two] == [
            ("k1", 200, "other.example"),
            (None, 401, f"127.0.0.1:{mock.port}"),
        ]
        assert last_two[0]["t"] <= last_two[1]["t"] and last_two[0]["path"] == CHAT


def test_control_plane_refuses_remote_callers() -> None:
    async def stats_status(allow_remote: bool) -> int:
        app = create_app(MockSettings(control_allow_remote=allow_remote))
        transport = httpx.ASGITransport(app=app, client=("10.1.2.3", 40000))
        async with httpx.AsyncClient(transport=transport, base_url="http://mock") as client:
            return (await client.get("/_mock/stats")).status_code

    assert asyncio.run(stats_status(False)) == 403
    assert asyncio.run(stats_status(True)) == 200


def test_control_plane_refuses_requests_carrying_an_api_key() -> None:
    """A gateway trial: a caller's POST /_mock/config went through the fleet (a worker on loopback,
    with the key) and changed the mock's latency for everyone."""
    async def statuses() -> list[int]:
        app = create_app(MockSettings())
        transport = httpx.ASGITransport(app=app, client=("127.0.0.1", 40000))
        async with httpx.AsyncClient(transport=transport, base_url="http://mock") as client:
            keyed = [(await client.post("/_mock/config", headers={name: "sk-x"}, json={"latency_ms": 7})).status_code
                     for name in ("Authorization", "api-key", "x-api-key")]
            return [*keyed, (await client.get("/_mock/stats")).status_code,
                    (await client.get("/_mock/config")).json()["latency_ms"]]

    assert asyncio.run(statuses()) == [403, 403, 403, 200, 0]


def test_serve_runs_on_the_callers_loop_until_cancelled() -> None:
    async def scenario() -> None:
        sock = bind_socket("127.0.0.1", 0)
        port = sock.getsockname()[1]
        started = asyncio.Event()
        server = asyncio.create_task(serve(MockSettings(), started=started, sock=sock))
        await asyncio.wait_for(started.wait(), 5)
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", trust_env=False) as client:
            assert (await client.post(CHAT, headers=bearer("sk-any"), json=HELLO)).status_code == 200
        server.cancel()
        with pytest.raises(asyncio.CancelledError):
            await server
        with pytest.raises(OSError):
            await asyncio.open_connection("127.0.0.1", port)

    asyncio.run(scenario())


def test_without_tokens_per_call_a_call_is_charged_its_size_and_corrected_to_its_usage() -> None:
    """A sized mock (the CLI's default) charges what a provider's tokens/min limit charges on
    entry, the prompt's tokens plus max_tokens, and keeps what the answer used; before, every
    call cost 10 tokens whatever its prompt, so uneven jobs could not be tried against it."""
    key = MockKey(id="k1", secret="sk-one", rps=100, burst=100, cost_per_minute=1000)
    prompt = {"model": "m", "max_tokens": 300, "messages": [{"role": "user", "content": "x" * 400}]}  # 100 tokens
    with mock_and_client(key, tokens_per_call=None) as (mock, client):
        first = client.post(CHAT, headers=bearer("sk-one"), json=prompt)
        assert first.status_code == 200
        assert first.headers["x-ratelimit-remaining-tokens"] == "600"  # 100 + 300 charged on entry
        usage = first.json()["usage"]
        assert usage == {"prompt_tokens": 100, "completion_tokens": 102, "total_tokens": 202}  # "echo: " + 400
        second = client.post(CHAT, headers=bearer("sk-one"), json={**prompt, "mock": {"completion_tokens": 5}})
        assert second.json()["usage"]["completion_tokens"] == 5
        assert 390 <= int(second.headers["x-ratelimit-remaining-tokens"]) <= 400  # 1000 - 202 - 400 (+ refill)
        stats = mock.stats()["keys"]["k1"]
        assert (stats["tokens"], stats["max_tokens_per_minute"]) == (307, 307)


def test_a_request_larger_than_the_whole_budget_gets_request_too_large() -> None:
    key = MockKey(id="k1", secret="sk-one", rps=100, burst=100, cost_per_minute=1000)
    huge = {"model": "gpt-x", "max_tokens": 900, "messages": [{"role": "user", "content": "x" * 800}]}
    with mock_and_client(key, tokens_per_call=None) as (mock, client):
        refused = client.post(CHAT, headers=bearer("sk-one"), json=huge)
        assert refused.status_code == 429 and "retry-after" not in refused.headers
        error = refused.json()["error"]
        assert error["type"] == "tokens" and error["code"] == "rate_limit_exceeded"
        assert error["message"].startswith("Request too large for gpt-x on tokens per min (TPM): Limit 1000, "
                                           "Requested 1100.")
        assert refused.headers["x-ratelimit-remaining-tokens"] == "1000"  # nothing spent
        assert mock.stats()["keys"]["k1"]["tokens"] == 0


def test_completion_tokens_directive_is_checked() -> None:
    with mock_and_client(MockKey(id="k1", secret="sk-one", rps=100, burst=100)) as (_, client):
        bad = client.post(CHAT, headers=bearer("sk-one"), json={**HELLO, "mock": {"completion_tokens": -1}})
        assert bad.status_code == 400 and "completion_tokens" in bad.json()["error"]["message"]
