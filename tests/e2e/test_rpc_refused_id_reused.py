"""A job id whose rpc request was refused, sent again fixed with the same id.

Refused to a caller waiting on a reply subject, nothing is stored (as `Client.request` and the
gateway store nothing for a job they refuse): the fixed job runs once and its Result is the
caller's. Before, the refusal's `invalid` Result was stored, and the fixed job got it back for
`results_max_age_s` (24 h) while the README said "nothing stored" (a break-it trial).

Refused to a publish without a reply subject, the `invalid` Result is stored (its producer's only
way to learn of it): the id has its one Result, so the fixed job gets that Result and nothing
is called. Before that, the fixed job was stored in JOBS and called (paid), its answer then
refused by the results stream (one Result per job) and dropped."""

from __future__ import annotations

import asyncio
import json

import pytest
from faultkit import calls, chat, one_worker_fleet

from ratefleet.runtime.store import read_result
from ratefleet.schemas import Result, Subjects

pytestmark = [pytest.mark.timeout(60), pytest.mark.anyio]


def refused(i: int, job_id: str) -> dict:
    bad = chat(i, id=job_id)
    bad["request"]["headers"] = {"X-Api-Key": "oops"}  # forbidden_target
    return bad


async def test_a_refused_rpc_request_leaves_its_id_free_for_the_fixed_job(tmp_path, nats_server):
    async with one_worker_fleet(tmp_path, nats_server.url) as (mock, raw, _client):
        first = Result.from_json((await raw.request("ratefleet.rpc.vip", json.dumps(refused(1, "refused-1")).encode(),
                                                    timeout=10)).data)
        assert first.status == "invalid"
        typo = Result.from_json((await raw.request("ratefleet.rpc.vpi", json.dumps(chat(1, id="refused-1")).encode(),
                                                   timeout=10)).data)
        assert (typo.status, typo.error.code) == ("invalid", "unknown_tier")
        again = Result.from_json((await raw.request("ratefleet.rpc.vip", json.dumps(chat(1, id="refused-1")).encode(),
                                                    timeout=10)).data)
        assert (again.job_id, again.status) == ("refused-1", "succeeded")
        assert calls(mock, path="/v1/chat/completions") == 1


async def test_a_refused_rpc_publish_keeps_its_result_and_the_fixed_job_is_not_called(tmp_path, nats_server):
    async with one_worker_fleet(tmp_path, nats_server.url) as (mock, raw, client):
        await raw.publish("ratefleet.rpc.vip", json.dumps(refused(1, "refused-2")).encode())  # no reply subject
        js, subjects = raw.jetstream(), Subjects()
        for _ in range(100):
            if await read_result(js, subjects, "refused-2") is not None:
                break
            await asyncio.sleep(0.1)
        again = Result.from_json((await raw.request("ratefleet.rpc.vip", json.dumps(chat(1, id="refused-2")).encode(),
                                                    timeout=10)).data)
        assert again.job_id == "refused-2" and again.status == "invalid"
        # a job that is called meanwhile shows the worker is there and calling
        assert (await client.request(chat(2, id="other-1"), "vip", timeout=10)).status == "succeeded"
        assert calls(mock, path="/v1/chat/completions") == 1, \
            "the re-sent job was called although its id already had its Result"
