"""One job whose request always gets 429 must not slow the fleet down.

Real processes (nats-server, a dispatcher and a worker as `python -m ratefleet` children)
against a small real HTTP upstream (aiohttp) that answers like OpenAI: every answer
carries the key's own x-ratelimit headers, and both keys have room throughout. Two
jobs are refused with 429 on every try: "huge" with OpenAI's "Request too large ...
Limit 30000, Requested 50000" body, "stuck" with a plain 429 whose headers show 4 requests
remaining. Meanwhile 30 ordinary jobs on the same 2 keys finish promptly, both keys keep
their configured 20 req/s with no cooldown, "huge" ends `request_too_large` after its one
call, and "stuck" ends `rate_limited` after its own budget with a message that says the
key had room.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import pytest
from aiohttp import web
from faultkit import Tracker, figure, until, wait_workers
from fleetkit import SECRETS, FleetKit, chat_job

from ratefleet import Client

pytestmark = [pytest.mark.timeout(150), pytest.mark.anyio]

KEY_OF = {secret: key_id for key_id, secret in SECRETS.items()}
TOO_LARGE = {"error": {
    "message": "Request too large for gpt-4o in organization org-test on tokens per min (TPM): Limit 30000, "
               "Requested 50000. The input or output tokens must be reduced in order to run successfully.",
    "type": "tokens", "param": None, "code": "rate_limit_exceeded"}}
STUCK = {"error": {"message": "Rate limit exceeded.", "type": "requests", "code": "rate_limit_exceeded"}}
BUDGET = 6  # tiers.normal.max_rate_limited


@dataclass
class Upstream:
    """Answers by model: "huge" and "stuck" get 429 (Retry-After: 0), "plain" a bare 429 (no
    headers), anything else 200."""

    log: list[tuple[str, str, int, float]] = field(default_factory=list)  # (key, model, status, monotonic)
    url: str = ""

    async def handle(self, request: web.Request) -> web.Response:
        key = KEY_OF.get(request.headers.get("Authorization", "").removeprefix("Bearer "), "?")
        model = (await request.json()).get("model", "")
        headers = {"x-ratelimit-limit-requests": "500", "x-ratelimit-limit-tokens": "30000",
                   "x-ratelimit-remaining-tokens": "29000"}
        status, answer = 200, {"choices": [{"message": {"content": "hi"}}], "usage": {"total_tokens": 3}}
        if model == "plain":  # a 429 with nothing else: no ratelimit headers, no Retry-After
            self.log.append((key, model, 429, time.monotonic()))
            return web.json_response(STUCK, status=429)
        if model in ("huge", "stuck"):
            status, answer = 429, TOO_LARGE if model == "huge" else STUCK
            headers |= {"x-ratelimit-remaining-requests": "4", "retry-after": "0"}
        else:
            headers["x-ratelimit-remaining-requests"] = "400"
        self.log.append((key, model, status, time.monotonic()))
        return web.json_response(answer, status=status, headers=headers)

    def calls(self, model: str) -> int:
        return sum(1 for _, m, _, _ in self.log if m == model)


@pytest.fixture
async def http_upstream():
    upstream = Upstream()
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


def job(i: int, model: str = "m", **extra) -> dict:
    payload = chat_job(i, **extra)
    payload["request"]["json"]["model"] = model
    return payload


async def timed(client: Client, tracker: Tracker, jobs: list[dict], batch: str, timeout: float):
    """Submit `jobs` to tier normal in `batch`; (their ids, seconds until all are stored, the
    keys' status then)."""
    started = time.monotonic()
    ids = await client.submit_many(jobs, "normal", batch=batch)
    await tracker.wait_stored(batch, ids, timeout=timeout)
    return ids, time.monotonic() - started, (await client.status())["keys"]


async def test_one_job_always_429_with_room_on_the_key_leaves_the_keys_alone(tmp_path, nats_server, http_upstream):
    kit = FleetKit(tmp_path, nats_server.url, http_upstream.url,
                   keys=[{"id": "k1", "rps": 20, "burst": 5}, {"id": "k2", "rps": 20, "burst": 5}],
                   overrides={"tiers": {"normal": {"max_rate_limited": BUDGET}}})
    kit.dispatcher("d1")
    kit.worker("w1")
    try:
        async with await Client.connect(nats_server.url) as client, Tracker(nats_server.url) as tracker:
            await wait_workers(client, {"w1"})
            bad = await client.submit_many([job(0, "huge", id="huge"), job(1, "stuck", id="stuck")], "normal",
                                           batch="scoped")
            await until(lambda: http_upstream.calls("stuck") >= 3, 30, what="three 429s for the stuck job")
            good, good_s, keys_then = await timed(client, tracker, [job(i) for i in range(2, 32)], "scoped", 60)
            await tracker.wait_stored("scoped", bad, timeout=60)
            results = await tracker.results([*bad, *good], "scoped")
            keys_after = (await client.status())["keys"]
    finally:
        kit.stop()
    huge, stuck = results["huge"], results["stuck"]
    figure("one job always 429 with room on the key", good_jobs=len(good), good_s=good_s,
           huge_calls=http_upstream.calls("huge"), stuck_calls=http_upstream.calls("stuck"),
           effective_rps={k: v["effective_rps"] for k, v in keys_then.items()},
           stuck_message=stuck.error.message if stuck.error else None)
    assert all(results[j].status == "succeeded" for j in good), sorted({results[j].status for j in good})
    assert good_s < 20, f"30 jobs on two 20 req/s keys took {good_s:.1f} s"
    for view in (keys_then, keys_after):
        for key_id in ("k1", "k2"):
            assert view[key_id]["effective_rps"] == 20.0 and view[key_id]["cooldown_s"] == 0.0, view[key_id]

    assert huge.status == "failed" and huge.error.code == "request_too_large", huge
    assert "30000" in huge.error.message and "50000" in huge.error.message, huge.error.message
    assert http_upstream.calls("huge") == 1 and huge.attempts == 1

    assert stuck.status == "failed" and stuck.error.code == "rate_limited", stuck
    assert http_upstream.calls("stuck") == BUDGET
    assert "not the key" in stuck.error.message and "never had room" not in stuck.error.message, stuck.error.message


async def test_a_few_top_tier_jobs_always_429_do_not_stall_the_pool(tmp_path, nats_server, http_upstream):
    """Four vip jobs answered a bare 429 on every call (no headers, nothing to tell whose it
    is), a backlog of 200 normal jobs on the same two keys: after the vip jobs' first 429s the
    backlog runs near the keys' rate (before: both keys near 1 % of their rate while the vip
    jobs lived, 25 of 300 normal jobs done in 300 s)."""
    kit = FleetKit(tmp_path, nats_server.url, http_upstream.url,
                   keys=[{"id": "k1", "rps": 20, "burst": 5}, {"id": "k2", "rps": 20, "burst": 5}])
    kit.dispatcher("d1")
    kit.worker("w1")
    try:
        async with await Client.connect(nats_server.url) as client, Tracker(nats_server.url) as tracker:
            await wait_workers(client, {"w1"})
            await client.submit_many([job(i, "plain", id=f"plain{i}") for i in range(4)], "vip", batch="loop")
            await until(lambda: http_upstream.calls("plain") >= 4, 30, what="the vip jobs' first 429s")
            good, good_s, keys = await timed(client, tracker, [job(i) for i in range(10, 210)], "loop", 90)
            results = await tracker.results(good, "loop")
    finally:
        kit.stop()
    figure("four vip jobs always 429 beside 200 normal jobs", good_s=good_s, plain_calls=http_upstream.calls("plain"),
           effective_rps={k: v["effective_rps"] for k, v in keys.items()})
    assert all(results[j].status == "succeeded" for j in good)
    # ~5 s without the vip jobs; about 30 s with them (each one's first 429 on each key halves that
    # key's rate once, and vip jobs take a cooled key's first tokens); before, most not done in 90 s
    assert good_s < 60, f"200 jobs on two 20 req/s keys took {good_s:.1f} s beside the looping vip jobs"
    assert http_upstream.calls("plain") >= 8  # the vip jobs kept being tried (and refused) meanwhile
