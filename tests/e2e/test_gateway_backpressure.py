"""The gateway when the fleet cannot answer: a job outliving the caller's timeout is 504, a
full queue is 503 with Retry-After (real nats-server and gateway process; no fleet running)."""

from __future__ import annotations

import openai
import pytest
from fleetkit import FleetKit
from gatewaykit import CALLER_KEYS, caller_env, callers, start_gateway

from ratefleet import Client

pytestmark = [pytest.mark.timeout(120), pytest.mark.anyio]


@pytest.fixture
def stalled(tmp_path, nats_server, monkeypatch):
    """A gateway whose jobs are never served (no dispatcher, no worker) and whose queue holds one job."""
    caller_env(monkeypatch)
    kit = FleetKit(tmp_path, nats_server.url, "http://127.0.0.1:9",
                   overrides={"callers": callers(alice={"timeout_s": 2}), "streams": {"jobs_max_msgs": 1}})
    try:
        kit.gateway_url = start_gateway(kit)  # type: ignore[attr-defined]
        yield kit
    finally:
        kit.stop()


async def test_timeout_is_504_then_a_full_queue_is_503_with_retry_after(stalled, nats_server):
    async with openai.AsyncOpenAI(base_url=stalled.gateway_url + "/v1", api_key=CALLER_KEYS["alice"],
                                  max_retries=0, timeout=30) as ai:
        with pytest.raises(openai.InternalServerError) as late:
            await ai.chat.completions.create(model="mock", messages=[{"role": "user", "content": "one"}])
        assert late.value.status_code == 504 and late.value.code == "job_timeout" and late.value.type == "timeout"
        # why, as the Python Client's RequestTimeout says it (a gateway trial: a bare "may still run")
        assert "no dispatcher is running" in late.value.message, late.value.message
        job_id = late.value.response.headers["x-ratefleet-job-id"]
        with pytest.raises(openai.InternalServerError) as full:
            await ai.chat.completions.create(model="mock", messages=[{"role": "user", "content": "two"}])
    assert full.value.status_code == 503 and full.value.code == "queue_full"
    assert int(full.value.response.headers["retry-after"]) >= 1
    async with await Client.connect(nats_server.url) as client:  # the first job is stored, with the caller's deadline
        info = await client.js.stream_info(client.subjects.jobs_stream)
        assert info.state.messages == 1
        queued = await client.queued_job(info.state.first_seq)
    assert queued is not None and queued.id == job_id and queued.deadline is not None
