"""A job id whose rpc request was refused (`invalid`: its Result is stored, nothing in JOBS)
sent again, fixed, over rpc: the id has its one Result already, so the caller gets that
Result and nothing is called. Before, the fixed job was stored in JOBS and called (paid),
its answer was then refused by the results stream (one Result per job) and dropped, and the
caller got the old `invalid` Result anyway."""

from __future__ import annotations

import json

import nats
import pytest
from faultkit import calls, chat, fast_keys, upstream, wait_workers
from fleetkit import FleetKit

from ratefleet import Client
from ratefleet.schemas import Result

pytestmark = [pytest.mark.timeout(60), pytest.mark.anyio]


async def test_a_refused_rpc_job_id_sent_again_is_not_called(tmp_path, nats_server):
    with upstream() as mock:
        kit = FleetKit(tmp_path, nats_server.url, mock.url, keys=fast_keys())
        raw = await nats.connect(nats_server.url)
        try:
            kit.dispatcher("d1")
            kit.worker("w1")
            async with await Client.connect(nats_server.url) as client:
                await wait_workers(client, {"w1"})
                bad = chat(1, id="refused-1")
                bad["request"]["headers"] = {"X-Api-Key": "oops"}
                first = Result.from_json((await raw.request("ratefleet.rpc.vip", json.dumps(bad).encode(),
                                                            timeout=10)).data)
                assert first.status == "invalid"
                again = Result.from_json((await raw.request("ratefleet.rpc.vip",
                                                            json.dumps(chat(1, id="refused-1")).encode(),
                                                            timeout=10)).data)
                assert again.job_id == "refused-1" and again.status == "invalid"
                # a job that is called meanwhile shows the worker is there and calling
                assert (await client.request(chat(2, id="other-1"), "vip", timeout=10)).status == "succeeded"
                assert calls(mock, path="/v1/chat/completions") == 1, \
                    "the re-sent job was called although its id already had its Result"
        finally:
            await raw.close()
            kit.stop()
