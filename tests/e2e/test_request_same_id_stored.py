"""`Client.request` with a job id that already has its stored Result: the README promises that
requesting the same `id` again "sends nothing new: it returns the stored Result". Before, the
client published the job to JOBS and only looked for a stored Result when JetStream called the
publish a duplicate, i.e. inside `streams.duplicate_window_s`: a retry after that window, or
after an rpc refusal (which stores the Result but no JOBS message), was called and paid a second
time, its answer refused by the results stream."""

from __future__ import annotations

import json

import anyio
import pytest
from faultkit import calls, chat, one_worker_fleet

from ratefleet.schemas import Result

pytestmark = [pytest.mark.timeout(60), pytest.mark.anyio]


async def test_a_request_repeated_after_the_dedup_window_is_not_called_again(tmp_path, nats_server):
    async with one_worker_fleet(tmp_path, nats_server.url, {"streams": {"duplicate_window_s": 1}}) as (mock, _, client):
        first = await client.request(chat(1, id="svc-retry-1"), "vip", timeout=10)
        assert first.status == "succeeded"
        await anyio.sleep(1.5)  # past the JOBS stream's dedup window
        again = await client.request(chat(1, id="svc-retry-1"), "vip", timeout=10)
        assert again.job_id == "svc-retry-1" and again.status == "succeeded"
        assert again.response.json_body == first.response.json_body, "not the stored Result"
        await anyio.sleep(0.5)  # a second call would be under way by now
        assert calls(mock, path="/v1/chat/completions") == 1, "the repeated request was called (paid) again"


async def test_an_id_refused_over_rpc_then_requested_with_the_client(tmp_path, nats_server):
    """Refused to a requester (a reply subject), nothing is stored: the fixed job, requested with
    the Client under the same id, runs once. Refused to a publish without a reply subject, the
    `invalid` Result is stored: the Client's request of that id gets it and nothing is called."""
    async with one_worker_fleet(tmp_path, nats_server.url) as (mock, raw, client):
        bad = chat(1, id="refused-py-1")
        bad["request"]["headers"] = {"X-Api-Key": "oops"}
        refused = Result.from_json((await raw.request("ratefleet.rpc.vip", json.dumps(bad).encode(), timeout=10)).data)
        assert refused.status == "invalid"
        fixed = await client.request(chat(1, id="refused-py-1"), "vip", timeout=10)
        assert fixed.job_id == "refused-py-1" and fixed.status == "succeeded"
        assert calls(mock, path="/v1/chat/completions") == 1

        bad["id"] = "refused-py-2"
        await raw.publish("ratefleet.rpc.vip", json.dumps(bad).encode())  # nobody to answer: stored
        for _ in range(100):
            if await client.stored_result("refused-py-2") is not None:
                break
            await anyio.sleep(0.1)
        again = await client.request(chat(1, id="refused-py-2"), "vip", timeout=10)
        assert again.job_id == "refused-py-2" and again.status == "invalid"
        assert (await client.request(chat(2, id="other-py-1"), "vip", timeout=10)).status == "succeeded"
        assert calls(mock, path="/v1/chat/completions") == 2, "the re-sent job was called although its id had a Result"


async def test_a_request_retried_past_the_dedup_window_while_its_call_runs_is_answered_by_that_call(
        tmp_path, nats_server):
    """The caller's first request timed out while its 3 s call ran; its retry with the same id
    came after `duplicate_window_s`, so JetStream stored the job again. Before, that second
    message was called too (paid twice). Now the leader ends it (the first is being called) and
    the retry gets the first call's Result when it is stored."""
    async with one_worker_fleet(tmp_path, nats_server.url, {"streams": {"duplicate_window_s": 1}}) as (mock, _, client):
        slow = chat(2, id="svc-slow-1", mock={"sleep_ms": 3000})
        with pytest.raises(Exception, match="no result for job svc-slow-1 within 1.5s"):
            await client.request(slow, "vip", timeout=1.5)
        again = await client.request(slow, "vip", timeout=15)
        assert again.job_id == "svc-slow-1" and again.status == "succeeded"
        await anyio.sleep(0.5)  # a second call would be under way by now
        assert calls(mock, path="/v1/chat/completions") == 1, "the retry was called (paid) again"
