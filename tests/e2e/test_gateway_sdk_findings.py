"""What an application developer hit driving the gateway with the official `openai` SDK, over
real processes (nats-server, the mock upstream, a dispatcher, a worker, `ratefleet gateway`):
each test is one defect found that way, and fails without its fix."""

from __future__ import annotations

import io
import json
import socket
import sys
import time

import anyio
import httpx
import openai
import pytest
from fleetkit import FleetKit, mock_keys
from gatewaykit import CALLER_KEYS, caller_env, callers, fleet_with_gateway, sdk

from ratefleet.mock import MockSettings, running_mock

pytestmark = [pytest.mark.timeout(180), pytest.mark.anyio]


def chat_line(custom_id: str, text: str) -> dict:
    return {"custom_id": custom_id, "method": "POST", "url": "/v1/chat/completions",
            "body": {"model": "mock", "messages": [{"role": "user", "content": text}]}}


def jsonl(lines: list) -> bytes:
    return "".join(json.dumps(line) + "\n" for line in lines).encode()


@pytest.fixture
def upstream():
    with running_mock(MockSettings(keys=mock_keys(rps=200, burst=20), accept_unknown=False)) as mock:
        yield mock


@pytest.fixture
def slow_gateway(tmp_path, nats_server, upstream, monkeypatch):
    """One key at 2 calls a second, so a batch stays in progress a while."""
    caller_env(monkeypatch)
    with fleet_with_gateway(FleetKit(tmp_path, nats_server.url, upstream.url, keys=[{"id": "k1", "rps": 2, "burst": 1}],
                                     overrides={"callers": callers(), "dispatcher": {"window": 4}})) as kit:
        yield kit


async def test_another_callers_file_in_use_is_not_found_and_names_no_batch(slow_gateway):
    async with sdk(slow_gateway) as alice, sdk(slow_gateway, "bob") as bob:
        uploaded = await alice.files.create(file=("in.jsonl", io.BytesIO(jsonl([chat_line(f"r{i}", "x")
                                                                                 for i in range(20)]))),
                                            purpose="batch")
        batch = await alice.batches.create(input_file_id=uploaded.id, endpoint="/v1/chat/completions",
                                           completion_window="24h")
        with pytest.raises(openai.NotFoundError) as other:
            await bob.files.delete(uploaded.id)
        await alice.batches.cancel(batch.id)
    assert batch.id not in other.value.message
    assert other.value.body["message"] == f"No such File object: {uploaded.id}"


async def test_the_gateways_409s_are_not_retried_by_the_sdk(slow_gateway):
    """A 409 (a running batch's input file, cancelling an ended batch) is no different a moment
    later: the SDK (max_retries 2, its default) raises it after one request, not three."""
    sent = []

    async def count(request):
        sent.append(request.url.path)

    http = httpx.AsyncClient(event_hooks={"request": [count]})
    async with openai.AsyncOpenAI(base_url=slow_gateway.gateway_url + "/v1", api_key=CALLER_KEYS["alice"],
                                  http_client=http) as ai:
        running = await ai.files.create(file=("in.jsonl", io.BytesIO(jsonl([chat_line(f"r{i}", "x")
                                                                          for i in range(20)]))), purpose="batch")
        batch = await ai.batches.create(input_file_id=running.id, endpoint="/v1/chat/completions",
                                        completion_window="24h")
        bad = await ai.files.create(file=("bad.jsonl", io.BytesIO(b"{not json\n")), purpose="batch")
        failed = await ai.batches.create(input_file_id=bad.id, endpoint="/v1/chat/completions", completion_window="24h")
        for _ in range(100):
            if (await ai.batches.retrieve(failed.id)).status == "failed":
                break
            await anyio.sleep(0.1)
        sent.clear()
        with pytest.raises(openai.ConflictError):
            await ai.files.delete(running.id)
        with pytest.raises(openai.ConflictError):
            await ai.batches.cancel(failed.id)
        requests = list(sent)
        await ai.batches.cancel(batch.id)
    assert requests == [f"/v1/files/{running.id}", f"/v1/batches/{failed.id}/cancel"]


@pytest.fixture
def small_answers_gateway(tmp_path, nats_server, upstream, monkeypatch):
    """Workers read at most 20,000 bytes of an answer (workers.max_response_bytes)."""
    caller_env(monkeypatch)
    with fleet_with_gateway(FleetKit(tmp_path, nats_server.url, upstream.url,
                                     overrides={"callers": callers(), "workers": {"max_response_bytes": 20000}})) as kit:
        yield kit


def _calls(upstream) -> int:
    return sum(key["calls"] for key in upstream.stats()["keys"].values())


async def test_an_answer_too_large_to_keep_is_an_error_not_an_empty_success(small_answers_gateway, upstream):
    """Before: HTTP 200 with an empty body (the SDK raised a bare JSONDecodeError), and in a
    batch an output line `"status_code": 200, "body": null` counted as completed."""
    many = [f"text {i}" for i in range(400)]  # ~40 kB of embeddings
    async with openai.AsyncOpenAI(base_url=small_answers_gateway.gateway_url + "/v1", api_key=CALLER_KEYS["alice"],
                                  max_retries=2) as ai:
        with pytest.raises(openai.APIStatusError) as refused:
            await ai.embeddings.create(model="mock-embedding", input=many)
        calls_for_one_request = _calls(upstream)
        lines = [{"custom_id": "big", "method": "POST", "url": "/v1/embeddings",
                  "body": {"model": "mock-embedding", "input": many}},
                 {"custom_id": "small", "method": "POST", "url": "/v1/embeddings",
                  "body": {"model": "mock-embedding", "input": "x"}}]
        uploaded = await ai.files.create(file=("in.jsonl", io.BytesIO(jsonl(lines))), purpose="batch")
        batch = await ai.batches.create(input_file_id=uploaded.id, endpoint="/v1/embeddings", completion_window="24h")
        for _ in range(300):
            if (batch := await ai.batches.retrieve(batch.id)).status == "completed":
                break
            await anyio.sleep(0.2)
        output = [json.loads(line) for line in (await ai.files.content(batch.output_file_id)).text.splitlines()]
        errors = [json.loads(line) for line in (await ai.files.content(batch.error_file_id)).text.splitlines()]
    assert refused.value.status_code == 502 and refused.value.body["code"] == "response_too_large"
    assert calls_for_one_request == 1  # paid once; the SDK was told not to ask again
    assert (batch.request_counts.completed, batch.request_counts.failed) == (1, 1)
    assert [line["custom_id"] for line in output] == ["small"]
    assert [(line["custom_id"], line["response"], line["error"]["code"]) for line in errors] == [
        ("big", None, "response_too_large")]


async def test_a_streamed_answer_cut_at_max_response_bytes_does_not_end_as_complete(small_answers_gateway):
    """Before: the stream stopped after ~20 kB (mid-event) and ended like a whole answer: the
    SDK's loop finished normally with a quarter of the words."""
    words = " ".join(f"w{i}" for i in range(500))
    body = {"model": "mock", "messages": [{"role": "user", "content": words}], "stream": True}
    async with httpx.AsyncClient(timeout=30) as http:
        answer = await http.post(small_answers_gateway.gateway_url + "/v1/chat/completions", json=body,
                                 headers={"Authorization": f"Bearer {CALLER_KEYS['alice']}"})
    events = answer.text.split("\n\n")
    assert answer.status_code == 200 and events[-1] == "" and all(e.startswith("data: ") for e in events[:-1])
    # whole events only: the cut (at a chunk of the upstream's, anywhere) used to leave half an
    # event before the error event, which the SDK parsed and raised as a bare JSONDecodeError
    parsed = [json.loads(e.removeprefix("data: ")) for e in events[:-1]]
    error = parsed[-1]["error"]
    assert error["code"] == "response_too_large" and "ratefleet result" in error["message"]
    assert all(p["object"] == "chat.completion.chunk" for p in parsed[:-1]) and len(parsed) > 10
    received = []
    async with openai.AsyncOpenAI(base_url=small_answers_gateway.gateway_url + "/v1", api_key=CALLER_KEYS["alice"],
                                  max_retries=0) as ai:
        with pytest.raises(openai.APIError, match="response_too_large"):
            async for chunk in await ai.chat.completions.create(**body):
                received.append(chunk.choices[0].delta.content or "")
    assert 0 < len("".join(received).split()) < 500


@pytest.fixture
def gateway(tmp_path, nats_server, upstream, monkeypatch):
    caller_env(monkeypatch)
    with fleet_with_gateway(FleetKit(tmp_path, nats_server.url, upstream.url, overrides={"callers": callers()})) as kit:
        yield kit


async def test_the_mock_answers_n_choices_and_streams_usage_when_asked(gateway):
    """Before: `n=3` got one choice and `stream_options.include_usage` no usage chunk, so neither
    an app's `n` handling nor the fleet's usage reading of a stream could be tried on the mock."""
    messages = [{"role": "user", "content": "a b"}]
    async with sdk(gateway) as ai:
        three = await ai.chat.completions.create(model="mock", messages=messages, n=3)
        chunks = [chunk async for chunk in await ai.chat.completions.create(
            model="mock", messages=messages, n=2, stream=True, stream_options={"include_usage": True})]
        with pytest.raises(openai.BadRequestError):
            await ai.chat.completions.create(model="mock", messages=messages, n=0)
    assert [(c.index, c.message.content) for c in three.choices] == [(0, "echo: a b"), (1, "echo: a b"),
                                                                       (2, "echo: a b")]
    streamed: dict[int, str] = {}
    for chunk in chunks[:-1]:
        assert chunk.usage is None
        for choice in chunk.choices:
            streamed[choice.index] = streamed.get(choice.index, "") + (choice.delta.content or "")
    assert streamed == {0: "echo: a b", 1: "echo: a b"}
    assert chunks[-1].choices == [] and chunks[-1].usage.total_tokens > 0


async def test_files_and_batches_answer_503_at_once_while_nats_is_away(gateway, nats_server):
    """Before: a 500 `internal_error` ("TimeoutError") after 5 s for each, while chat completions
    answered 503 `service_unavailable` with Retry-After at once."""
    async with sdk(gateway) as ai:
        await ai.files.list()
        nats_server.stop()
        try:
            await anyio.sleep(1)
            refusals = []
            for call in (ai.files.list, ai.batches.list):
                started = time.monotonic()
                with pytest.raises(openai.APIStatusError) as away:
                    await call()
                refusals.append((away.value.status_code, away.value.body["code"],
                                 away.value.response.headers.get("retry-after"), time.monotonic() - started))
        finally:
            nats_server.start()
    for status, code, retry_after, took_s in refusals:
        assert (status, code, retry_after) == (503, "service_unavailable", "2") and took_s < 2


async def test_a_bad_file_quoting_long_values_fails_instead_of_validating_forever(gateway):
    """Before: six lines repeating one 300 kB custom_id made `errors.data` quote it five times;
    the record passed NATS's max payload, every gateway sweep failed storing it, and the batch
    stayed `validating` for good."""
    custom_id = "x" * 300_000
    line = {"custom_id": custom_id, "method": "POST", "url": "/v1/chat/completions",
            "body": {"model": "mock", "messages": []}}
    async with sdk(gateway) as ai:
        uploaded = await ai.files.create(file=("in.jsonl", io.BytesIO(jsonl([line] * 6))), purpose="batch")
        batch = await ai.batches.create(input_file_id=uploaded.id, endpoint="/v1/chat/completions",
                                        completion_window="24h")
        for _ in range(150):
            if (batch := await ai.batches.retrieve(batch.id)).status != "validating":
                break
            await anyio.sleep(0.2)
    assert batch.status == "failed"
    assert [(error.code, error.line) for error in batch.errors.data] == [("duplicate_custom_id", n) for n in range(2, 7)]
    assert all(len(error.message) <= 1000 for error in batch.errors.data)


async def test_a_line_too_large_for_the_nats_server_fails_validation_not_the_batch_forever(gateway):
    """Before: a 1,045,000-byte line passed validation (1 MiB) but not the submit (the NATS
    server's max_payload less 8 kB): the batch stayed `in_progress` for good, the submit failing
    again at every gateway sweep."""
    def line(custom_id: str, size: int) -> dict:
        return {"custom_id": custom_id, "method": "POST", "url": "/v1/chat/completions",
                "body": {"model": "mock", "messages": [{"role": "user", "content": "y" * size}]}}

    async with sdk(gateway) as ai:
        uploaded = await ai.files.create(file=("in.jsonl", io.BytesIO(jsonl([line("a", 10), line("b", 1_045_000)]))),
                                         purpose="batch")
        batch = await ai.batches.create(input_file_id=uploaded.id, endpoint="/v1/chat/completions",
                                        completion_window="24h")
        for _ in range(150):
            if (batch := await ai.batches.retrieve(batch.id)).status in {"failed", "completed"}:
                break
            await anyio.sleep(0.2)
    assert batch.status == "failed"
    [error] = batch.errors.data
    assert error.line == 2 and "the limit is" in error.message and "max_payload" in error.message


def _send_half_and_hang_up(url: str, path: str, head: str, body: bytes) -> None:
    """Declare `body`'s length, send half of it over a raw socket, then close the connection."""
    host, port = url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=5) as conn:
        conn.sendall(f"POST {path} HTTP/1.1\r\nHost: {host}\r\nContent-Length: {len(body)}\r\n{head}\r\n".encode())
        conn.sendall(body[: len(body) // 2])
        time.sleep(0.3)


@pytest.mark.parametrize("path", ["/v1/files", "/v1/chat/completions"])
async def test_a_client_hanging_up_mid_upload_is_one_log_line_not_a_traceback(gateway, path):
    """Before: a client that closed its connection halfway through a request body left a full
    "Exception in ASGI application" traceback (starlette's ClientDisconnect) in the gateway's log,
    as if the gateway had failed. Now one info line says the client hung up; nothing else is kept."""
    auth = f"Authorization: Bearer {CALLER_KEYS['alice']}\r\n"
    if path == "/v1/files":
        boundary = "rfboundary"
        body = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"purpose\"\r\n\r\nbatch\r\n"
                f"--{boundary}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"in.jsonl\"\r\n"
                "Content-Type: application/jsonl\r\n\r\n").encode() + jsonl([chat_line("a", "x" * 2000)] * 200)
        head = auth + f"Content-Type: multipart/form-data; boundary={boundary}\r\n"
    else:
        body = json.dumps({"model": "mock", "messages": [{"role": "user", "content": "x" * 200_000}]}).encode()
        head = auth + "Content-Type: application/json\r\n"
    await anyio.to_thread.run_sync(_send_half_and_hang_up, gateway.gateway_url, path, head, body)
    deadline = time.monotonic() + 10
    while "hung up" not in gateway.logs() and time.monotonic() < deadline:
        await anyio.sleep(0.1)
    logs = gateway.logs()
    assert "hung up" in logs and "Traceback" not in logs and "Exception in ASGI application" not in logs, logs[-3000:]
    async with sdk(gateway) as ai:  # and the gateway serves on
        assert (await ai.files.list()).data == []


async def test_a_push_adding_an_upstream_reaches_the_running_gateway(gateway):
    """A new user's finding: the gateway kept the upstreams of its start. After a `config push`
    added a second one, requests naming none went on without one and the dispatcher ended them
    `unknown_upstream` (400 with no advice); now the gateway's own 400 `upstream_required` says
    which header names one, and a request naming one runs."""
    import tomli_w

    data = gateway.config()
    data["upstreams"]["other"] = {"base_url": gateway.upstream_url, "timeout_s": 10}
    data["pools"]["shared"]["upstream"] = "mock"
    path = gateway.tmp / "two.toml"
    path.write_text(tomli_w.dumps(data))
    pushed = await anyio.run_process([sys.executable, "-m", "ratefleet", "config", "push", str(path), "--nats",
                                      gateway.nats_url], check=False)
    assert pushed.returncode == 0, pushed.stderr.decode()
    messages = [{"role": "user", "content": "hi"}]
    async with sdk(gateway) as ai:
        deadline = time.monotonic() + 15
        while True:
            with pytest.raises(openai.BadRequestError) as refused:
                await ai.chat.completions.create(model="mock", messages=messages)
            if refused.value.body["code"] == "upstream_required" or time.monotonic() > deadline:
                break
            await anyio.sleep(0.5)
        named = await ai.chat.completions.create(model="mock", messages=messages,
                                                 extra_headers={"x-ratefleet-upstream": "mock"})
    assert refused.value.body["code"] == "upstream_required", refused.value.body
    assert "x-ratefleet-upstream" in refused.value.body["message"]
    assert "x-ratefleet-job-id" not in refused.value.response.headers  # nothing was stored under one
    assert named.choices[0].message.content == "echo: hi"


async def test_a_body_over_the_fleets_real_job_limit_is_a_413_naming_it(gateway):
    """A new user's finding: bodies between the NATS server's max_payload less the assignment's
    room (1,040,384 bytes here) and streams.max_job_bytes (1 MiB) got a 400 `invalid_job`, with an
    x-ratefleet-job-id for a job never stored; bigger ones a 413 naming only max_job_bytes."""
    content = "x" * 1_044_000
    async with httpx.AsyncClient(base_url=gateway.gateway_url, timeout=30) as http:
        answer = await http.post("/v1/chat/completions", json={"model": "mock", "messages": [
            {"role": "user", "content": content}]}, headers={"Authorization": f"Bearer {CALLER_KEYS['alice']}"})
        # under the limit as a body, over it as the job the gateway makes of it (id, caller, deadline)
        wrapped = await http.post("/v1/chat/completions", json={"model": "mock", "messages": [
            {"role": "user", "content": content[:1_040_230]}]}, headers={"Authorization": f"Bearer {CALLER_KEYS['alice']}"})
    assert wrapped.status_code == 413 and wrapped.json()["error"]["code"] == "request_too_large", wrapped.text[:500]
    assert "x-ratefleet-job-id" not in wrapped.headers
    assert answer.status_code == 413, answer.text[:500]
    assert answer.json()["error"]["code"] == "request_too_large" and "max_payload" in answer.json()["error"]["message"]
    assert "x-ratefleet-job-id" not in answer.headers
