"""A request whose job id is already running (a service retrying with its idempotency key
after a client-side timeout) gets the job's Result as soon as it is stored: from
`Client.request` and from raw request/reply on `<prefix>.rpc.<tier>`. Before, the Client
waited its whole timeout before reading the stored Result, and raw rpc never answered."""

from __future__ import annotations

import asyncio
import json
import time

import nats
import pytest
from faultkit import calls, chat, fast_keys, upstream, wait_workers
from fleetkit import FleetKit

from ratefleet import Client
from ratefleet.schemas import Result

pytestmark = [pytest.mark.timeout(90), pytest.mark.anyio]


async def test_second_request_for_a_running_job_is_answered_when_it_ends(tmp_path, nats_server):
    with upstream() as mock:
        kit = FleetKit(tmp_path, nats_server.url, mock.url, keys=fast_keys())
        raw = await nats.connect(nats_server.url)
        try:
            kit.dispatcher("d1")
            kit.worker("w1")
            async with await Client.connect(nats_server.url) as client:
                await wait_workers(client, {"w1"})
                # Client.request twice with one id while the call (1.5 s) runs
                job = chat(1, {"sleep_ms": 1500}, id="inflight-1")
                first = asyncio.create_task(client.request(job, "vip", timeout=30))
                await asyncio.sleep(0.4)
                started = time.monotonic()
                second = await client.request(job, "vip", timeout=30)
                waited = time.monotonic() - started
                assert (await first).status == second.status == "succeeded"
                assert waited < 10, f"the second request waited {waited:.1f} s for a Result stored after ~1.1 s"

                # raw rpc twice with one id while the call runs
                payload = json.dumps(chat(2, {"sleep_ms": 1500}, id="inflight-2")).encode()
                r1 = asyncio.create_task(raw.request("ratefleet.rpc.vip", payload, timeout=30))
                await asyncio.sleep(0.4)
                started = time.monotonic()
                r2 = Result.from_json((await raw.request("ratefleet.rpc.vip", payload, timeout=15)).data)
                waited = time.monotonic() - started
                assert r2.job_id == "inflight-2" and r2.status == "succeeded"
                assert Result.from_json((await r1).data).status == "succeeded"
                assert waited < 10, f"the second rpc request waited {waited:.1f} s"
                assert calls(mock, path="/v1/chat/completions") == 2, "each job is called once"
        finally:
            await raw.close()
            kit.stop()
