"""`ratefleet submit` with an OpenAI Batch API input file, as is, and OpenAI output lines in
input order (`--out-format openai --order input`); `ratefleet results` writes the same lines
(real nats-server, dispatcher and worker processes, the mock upstream, the real CLI)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from fleetkit import SECRETS, FleetKit, mock_keys, wait_for_leader

from ratefleet import Client
from ratefleet.mock import MockSettings, running_mock

pytestmark = [pytest.mark.timeout(120), pytest.mark.anyio]


def chat(custom_id: str, text: str, **extra) -> dict:
    return {"custom_id": custom_id, "method": "POST", "url": "/v1/chat/completions",
            "body": {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": text}], **extra}}


LINES = [
    chat("slow-first", "one", mock={"sleep_ms": 1500}),  # answered last: --order input still writes it first
    {"custom_id": "vectors", "method": "POST", "url": "/v1/embeddings", "body": {"model": "e", "input": ["a", "b"]}},
    chat("refused", "three", mock={"status": 400}),       # the provider's error, as OpenAI writes it
    chat("plain", "four"),
]


def cli(*args: str, timeout: float = 90) -> subprocess.CompletedProcess:
    env = {**os.environ}
    env.pop("RATEFLEET_NATS_URL", None)
    return subprocess.run([sys.executable, "-m", "ratefleet", *args], capture_output=True, text=True, timeout=timeout,
                          env=env)


async def test_submit_takes_openai_batch_lines_and_writes_openai_output_in_input_order(tmp_path, nats_server):
    with running_mock(MockSettings(keys=mock_keys(rps=100, burst=10), accept_unknown=False)) as upstream:
        kit = FleetKit(tmp_path, nats_server.url, upstream.url, overrides={"tiers": {"normal": {"max_attempts": 1}}})
        kit.dispatcher("d1")
        kit.worker("w1")
        try:
            async with await Client.connect(nats_server.url) as client:
                await wait_for_leader(client)
            source = tmp_path / "batchinput.jsonl"
            source.write_text("".join(json.dumps(line) + "\n" for line in LINES))
            out = tmp_path / "output.jsonl"
            sent = cli("submit", str(source), "--tier", "normal", "--batch", "oa1", "--wait", "--out", str(out),
                       "--out-format", "openai", "--order", "input", "--nats", nats_server.url)
            assert sent.returncode == 1, sent.stderr  # one line failed (the provider's 400)
            collected = cli("results", "--batch", "oa1", "--order", "input", "--out-format", "openai",
                            "--nats", nats_server.url)
        finally:
            kit.stop()
        calls = upstream.stats()["keys"]
    written = [json.loads(line) for line in out.read_text().splitlines()]
    assert [line["custom_id"] for line in written] == ["slow-first", "vectors", "refused", "plain"]
    by_id = {line["custom_id"]: line for line in written}
    assert by_id["slow-first"]["response"]["status_code"] == 200
    assert by_id["slow-first"]["response"]["body"]["choices"][0]["message"]["content"] == "echo: one"
    assert len(by_id["vectors"]["response"]["body"]["data"]) == 2
    assert by_id["refused"]["response"]["status_code"] == 400 and by_id["refused"]["error"] is None
    assert by_id["refused"]["response"]["body"]["error"]["message"] == "The mock upstream was told to answer 400."
    assert all(line["id"].startswith("batch_req_oa1-") and line["response"]["request_id"] for line in written)
    assert collected.returncode == 1, collected.stderr
    assert [json.loads(line) for line in collected.stdout.splitlines()] == written
    assert sum(key["calls"] for key in calls.values()) == 4
    assert SECRETS["k1"] not in out.read_text()
