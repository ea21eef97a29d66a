"""Request-scoped 401s that are on the wire together must not take healthy keys out.

One tenant's jobs carry a wrong OpenAI-Organization header: OpenAI answers 401
`mismatched_organization`, which is the request's fault, not the key's. Real processes:
nats-server, a dispatcher and a worker as `python -m ratefleet` children, and a small real
HTTP upstream (aiohttp) that answers slowly enough for the bad jobs to be in flight at once.
"""

from __future__ import annotations

import asyncio
from collections import Counter

import pytest
from aiohttp import web
from faultkit import Tracker, wait_workers
from fleetkit import SECRETS, FleetKit, chat_job

from ratefleet import Client

pytestmark = [pytest.mark.timeout(150), pytest.mark.anyio]

KEY_OF = {secret: key_id for key_id, secret in SECRETS.items()}
WRONG_ORG = {"error": {"message": "OpenAI-Organization header should match organization for API key",
                       "type": "invalid_request_error", "param": None, "code": "mismatched_organization"}}
OK = {"choices": [{"message": {"content": "hi"}}], "usage": {"total_tokens": 3}}


GEMINI_BAD_KEY = {"error": {"code": 400, "message": "API key not valid. Please pass a valid API key.",
                            "status": "INVALID_ARGUMENT",
                            "details": [{"@type": "type.googleapis.com/google.rpc.ErrorInfo",
                                         "reason": "API_KEY_INVALID", "domain": "googleapis.com"}]}}


class OrgUpstream:
    """Answers 401 mismatched_organization to requests with the wrong organization, and
    `broken[key]` = (status, body) for every call with that key, after `delay_s`; logs
    (key, organization header, status)."""

    def __init__(self, delay_s: float = 0.3) -> None:
        self.delay_s = delay_s
        self.broken: dict[str, tuple[int, dict]] = {}
        self.log: list[tuple[str, str, int]] = []
        self.url = ""

    async def handle(self, request: web.Request) -> web.Response:
        key = KEY_OF.get(request.headers.get("Authorization", "").removeprefix("Bearer "), "?")
        org = request.headers.get("OpenAI-Organization", "")
        await request.read()
        await asyncio.sleep(self.delay_s)
        status, body = (401, WRONG_ORG) if org == "org-wrong" or key == "?" else (200, OK)
        status, body = self.broken.get(key, (status, body))
        self.log.append((key, org, status))
        return web.json_response(body, status=status)


@pytest.fixture
async def org_upstream():
    upstream = OrgUpstream()
    app = web.Application()
    app.router.add_post("/v1/chat/completions", upstream.handle)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    upstream.url = f"http://127.0.0.1:{site._server.sockets[0].getsockname()[1]}"
    try:
        yield upstream
    finally:
        await runner.cleanup()


def bad_job(i: int) -> dict:
    payload = chat_job(i, id=f"bad{i}")
    payload["request"]["headers"] = {"OpenAI-Organization": "org-wrong"}
    return payload


async def test_concurrent_request_scoped_401s_fail_alone_and_the_keys_stay(tmp_path, nats_server, org_upstream):
    keys = [{"id": "k1", "rps": 200, "burst": 20}, {"id": "k2", "rps": 200, "burst": 20}]
    kit = FleetKit(tmp_path, nats_server.url, org_upstream.url, keys=keys,
                   overrides={"dispatcher": {"key_probe_s": 600.0, "key_probe_max_s": 600.0}})
    kit.dispatcher("d1"), kit.worker("w1")
    try:
        async with await Client.connect(nats_server.url) as client, Tracker(nats_server.url) as tracker:
            await wait_workers(client, {"w1"})
            bad = await client.submit_many([bad_job(i) for i in range(4)], "normal", batch="b")
            good = await client.submit_many([chat_job(i, id=f"good{i}") for i in range(10)], "normal", batch="b")
            await tracker.wait_stored("b", [*bad, *good], timeout=60)
            first = await tracker.results([*bad, *good], "b")
            status = await client.status()
            later = await client.submit_many([chat_job(100 + i, id=f"later{i}") for i in range(10)], "normal",
                                             batch="c")
            await tracker.wait_stored("c", later, timeout=60)
            after = await tracker.results(later, "c")
    finally:
        kit.stop()
    bad_on = Counter(key for key, org, _ in org_upstream.log if org == "org-wrong")
    assert bad_on["k1"] >= 1 and bad_on["k2"] >= 1  # refused on both keys: the request is at fault
    for job_id in bad:
        result = first[job_id]
        assert result.status == "failed" and result.error.code == "request_denied", (job_id, result.error)
        assert result.attempts == 2 and result.response.status == 401
    assert all(first[j].status == "succeeded" for j in good), [first[j].error for j in good]
    assert {k: v["state"] for k, v in status["keys"].items()} == {"k1": "enabled", "k2": "enabled"}
    assert all(r.status == "succeeded" for r in after.values()), [r.error for r in after.values()]
    assert kit.logs().count("KEY DISABLED") == 0


async def test_a_key_gemini_calls_invalid_with_a_400_goes_out_and_its_jobs_succeed_elsewhere(
        tmp_path, nats_server, org_upstream):
    org_upstream.broken["k1"] = (400, GEMINI_BAD_KEY)  # a 400 that is about the key, not the request
    org_upstream.delay_s = 0.05
    keys = [{"id": "k1", "rps": 200, "burst": 20}, {"id": "k2", "rps": 200, "burst": 20}]
    kit = FleetKit(tmp_path, nats_server.url, org_upstream.url, keys=keys,
                   overrides={"dispatcher": {"key_probe_s": 600.0, "key_probe_max_s": 600.0}})
    kit.dispatcher("d1"), kit.worker("w1")
    try:
        async with await Client.connect(nats_server.url) as client, Tracker(nats_server.url) as tracker:
            await wait_workers(client, {"w1"})
            ids = await client.submit_many([chat_job(i) for i in range(30)], "normal", batch="g")
            await tracker.wait_stored("g", ids, timeout=60)
            results = await tracker.results(ids, "g")
            k1 = (await client.status())["keys"]["k1"]
    finally:
        kit.stop()
    assert all(r.status == "succeeded" and r.key_id == "k2" for r in results.values()), (
        Counter((r.status, r.error and r.error.code) for r in results.values()))
    assert k1["disabled_by"] == "provider" and k1["disabled_reason"] == "API_KEY_INVALID (HTTP 400)", k1
    assert 1 <= sum(1 for key, _, _ in org_upstream.log if key == "k1") <= 20  # those in flight, no retries on k1
