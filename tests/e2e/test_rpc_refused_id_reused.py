"""A job id whose rpc request was refused (`invalid`: its Result is stored, nothing in JOBS)
sent again, fixed, over rpc: the id has its one Result already, so the caller gets that
Result and nothing is called. Before, the fixed job was stored in JOBS and called (paid),
its answer was then refused by the results stream (one Result per job) and dropped, and the
caller got the old `invalid` Result anyway."""

from __future__ import annotations

import json

import pytest
from faultkit import calls, chat, one_worker_fleet

from ratefleet.schemas import Result

pytestmark = [pytest.mark.timeout(60), pytest.mark.anyio]


async def test_a_refused_rpc_job_id_sent_again_is_not_called(tmp_path, nats_server):
    async with one_worker_fleet(tmp_path, nats_server.url) as (mock, raw, client):
        bad = chat(1, id="refused-1")
        bad["request"]["headers"] = {"X-Api-Key": "oops"}
        first = Result.from_json((await raw.request("ratefleet.rpc.vip", json.dumps(bad).encode(), timeout=10)).data)
        assert first.status == "invalid"
        again = Result.from_json((await raw.request("ratefleet.rpc.vip", json.dumps(chat(1, id="refused-1")).encode(),
                                                    timeout=10)).data)
        assert again.job_id == "refused-1" and again.status == "invalid"
        # a job that is called meanwhile shows the worker is there and calling
        assert (await client.request(chat(2, id="other-1"), "vip", timeout=10)).status == "succeeded"
        assert calls(mock, path="/v1/chat/completions") == 1, \
            "the re-sent job was called although its id already had its Result"
