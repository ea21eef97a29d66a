"""A `Client.request` that times out because nothing can run the job says so. Before, a
service calling with no dispatcher running, or with a leader but no worker, waited its whole
timeout and got the same RequestTimeout as for a slow call ("it is stored and still runs"),
while a raw rpc caller got no-responders at once: nothing told it what to fix or that the job
would be paid whenever a dispatcher or worker came back. Now the timeout path asks the fleet
(one status request, at most 0.5 s) and RequestTimeout carries `reason` and says what to start."""

from __future__ import annotations

import time

import pytest
from faultkit import chat, until, upstream, wait_exit, wait_workers
from fleetkit import FleetKit

from ratefleet import Client, RequestTimeout

pytestmark = [pytest.mark.timeout(90), pytest.mark.anyio]


async def test_a_timeout_names_a_missing_worker_then_a_missing_dispatcher(tmp_path, nats_server):
    with upstream() as mock:
        kit = FleetKit(tmp_path, nats_server.url, mock.url)
        try:
            d1 = kit.dispatcher("d1")
            async with await Client.connect(nats_server.url) as client:
                await until(lambda: _leads(client), 20, what="a leader")
                with pytest.raises(RequestTimeout) as no_worker:
                    await client.request(chat(1), "vip", timeout=1.0)
                assert no_worker.value.reason == "no_worker"
                assert "no worker" in str(no_worker.value) and "ratefleet worker" in str(no_worker.value)
                assert no_worker.value.job_id and no_worker.value.job_id in str(no_worker.value)

                d1.terminate()
                assert await wait_exit(d1, 15) is not None
                started = time.monotonic()
                with pytest.raises(RequestTimeout) as no_dispatcher:
                    await client.request(chat(2), "vip", timeout=1.0)
                assert time.monotonic() - started < 1.5, "the check after the timeout took too long"
                assert no_dispatcher.value.reason == "no_dispatcher"
                assert "no dispatcher is running" in str(no_dispatcher.value)
        finally:
            kit.stop()


async def _leads(client: Client) -> bool:
    try:
        return bool((await client.status(timeout=1.0)).get("leader"))
    except Exception:  # noqa: BLE001 - not up yet
        return False


async def test_a_timeout_while_every_key_answers_429_says_so(tmp_path, nats_server):
    with upstream() as mock:
        kit = FleetKit(tmp_path, nats_server.url, mock.url)
        try:
            kit.dispatcher("d1")
            kit.worker("w1")
            async with await Client.connect(nats_server.url) as client:
                await wait_workers(client, {"w1"})
                mock.configure(keys_status={"k1": 429, "k2": 429})
                with pytest.raises(RequestTimeout) as cooling:
                    await client.request(chat(3), "vip", timeout=3.0)
                assert cooling.value.reason == "no_key_ready", str(cooling.value)
                assert "cooling down" in str(cooling.value)
        finally:
            kit.stop()

