"""Key rotation over real processes: nats-server, a dispatcher and a worker as `python -m
ratefleet` children, and a real HTTP upstream (aiohttp) that changes the secret it accepts
while a batch runs.

The provider side follows the rotation rule of schemas/key_versions.py: the new secret is
accepted from the switch time T, the old one until T + the upstream's timeout_s (a call picked
just before T reaches the provider a little later). Everything else is a 401."""

from __future__ import annotations

import asyncio
import os
import time
import tomllib
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta

import pytest
from aiohttp import web
from faultkit import Tracker, cli, until, wait_workers
from fleetkit import FleetKit, chat_job

from ratefleet import Client
from ratefleet.schemas.config import parse_config
from ratefleet.schemas.key_versions import KeyVersion

pytestmark = [pytest.mark.timeout(240), pytest.mark.anyio]

OLD, NEW, NEWER = "sk-rot-old-AAAA1111", "sk-rot-new-BBBB2222", "sk-rot-newer-CCCC3333"
TIMEOUT_S = 5.0  # the upstream's timeout_s in the fleet's config: the overlap the provider keeps


@dataclass
class SwitchingUpstream:
    """`accepts(secret, now)` decides; every call is logged as (secret, wall time, status)."""

    windows: dict[str, tuple[float, float]] = field(default_factory=dict)  # secret -> [from, until) epoch s
    log: list[tuple[str, float, int]] = field(default_factory=list)
    url: str = ""

    async def handle(self, request: web.Request) -> web.Response:
        secret = request.headers.get("Authorization", "").removeprefix("Bearer ")
        now = time.time()
        start, end = self.windows.get(secret, (0.0, 0.0))
        ok = start <= now < end
        self.log.append((secret if secret in self.windows else "?", now, 200 if ok else 401))
        if not ok:
            return web.json_response({"error": {"message": "Incorrect API key provided.", "code": "invalid_api_key",
                                                "type": "invalid_request_error"}}, status=401)
        return web.json_response({"choices": [{"message": {"content": "hi"}}], "usage": {"total_tokens": 3}})

    def count(self, secret: str | None = None, status: int | None = None) -> int:
        return sum(1 for s, _, st in self.log if (secret is None or s == secret) and (status is None or st == status))


@pytest.fixture
async def upstream():
    server = SwitchingUpstream()
    app = web.Application()
    app.router.add_post("/v1/chat/completions", server.handle)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    server.url = f"http://127.0.0.1:{site._server.sockets[0].getsockname()[1]}"
    try:
        yield server
    finally:
        await runner.cleanup()


class RotationKit(FleetKit):
    """One key `k1` with the given secret form (`versions` or `secret`), secrets in RF_ROT_*."""

    key: dict = {}

    def config(self) -> dict:
        data = super().config()
        data["pools"] = {"shared": {"keys": [{"id": "k1", "rps": 1000, "burst": 64, **self.key}]}}
        data["upstreams"]["mock"]["timeout_s"] = TIMEOUT_S
        data["workers"]["slots"] = 32
        return data

    def env(self) -> dict[str, str]:
        return {**super().env(), "RF_ROT_OLD": OLD, "RF_ROT_NEW": NEW}


async def submit_paced(client, count: int, start: float, end: float, batch: str) -> list[str]:
    """`count` jobs in 40 chunks spread evenly over wall time [start, end) (late chunks at once)."""
    ids: list[str] = []
    chunks = 40
    for chunk in range(chunks):
        due = start + (end - start) * chunk / chunks
        await asyncio.sleep(max(0.0, due - time.time()))
        size = count // chunks + (1 if chunk < count % chunks else 0)
        ids += await client.submit_many([chat_job(len(ids) + i) for i in range(size)], "normal", batch=batch)
    return ids


async def test_a_key_rotated_during_a_2000_job_batch_loses_no_job_and_gets_no_401(tmp_path, nats_server, upstream):
    """`ratefleet keys rotate --at T` on the fleet's config, then a batch across T and T + timeout_s."""
    # ahead by what the CLI and the fleet's start need here now (~5 s on a quiet 2-core machine,
    # over 17 s at load ~10; at load 25-30 one interpreter's start took 11-29 s and a fixed 40 s
    # was eaten before the fleet was up): 40 s, more when this machine starts a Python slowly
    started = time.monotonic()
    assert cli("--version").returncode == 0
    startup = time.monotonic() - started
    switch = datetime.now(UTC).replace(microsecond=0) + timedelta(seconds=min(100.0, max(40.0, 4 * startup + 10)))
    t = switch.timestamp()
    upstream.windows = {OLD: (0.0, t + TIMEOUT_S), NEW: (t, float("inf"))}
    kit = RotationKit(tmp_path, nats_server.url, upstream.url)
    kit.key = {"secret": "env:RF_ROT_OLD"}
    path = kit.write_config()
    done = cli("keys", "rotate", "k1", "--secret", "env:RF_ROT_NEW", "--at", switch.isoformat(), "--config", str(path))
    assert done.returncode == 0, done.stderr
    assert parse_config(tomllib.loads(path.read_text())).keys()["k1"].secret_versions() == [
        KeyVersion(id="v1", secret="env:RF_ROT_OLD", not_after=switch),
        KeyVersion(id="v2", secret="env:RF_ROT_NEW", not_before=switch)]
    kit.dispatcher("d1"), kit.worker("w1")
    try:
        async with await Client.connect(nats_server.url) as client, Tracker(nats_server.url) as tracker:
            await wait_workers(client, {"w1"}, timeout=t - time.time() - 8)
            # the batch straddles the switch and the end of the overlap: jobs keep coming until T + 8 s
            ids = await submit_paced(client, 2000, t - 6, t + TIMEOUT_S + 3, "rot")
            counts = await tracker.wait_stored("rot", ids, timeout=120)
            results = await tracker.results(ids, "rot")
    finally:
        kit.stop()
    assert set(counts) == set(ids) and len(ids) == 2000
    assert upstream.count(status=401) == 0, [entry for entry in upstream.log if entry[2] == 401][:5]
    assert all(r.status == "succeeded" for r in results.values()), {r.error for r in results.values() if not r.ok}
    by_version = {v: sum(1 for r in results.values() if r.key_version == v) for v in ("v1", "v2")}
    # both versions really served part of the batch, and each Result names the one its call used
    assert by_version["v1"] == upstream.count(OLD) > 0 and by_version["v2"] == upstream.count(NEW) > 0
    assert by_version["v1"] + by_version["v2"] == 2000
    # calls that picked v1 just before T reach the provider after T: what the overlap is for
    late = [when - t for secret, when, _ in upstream.log if secret == OLD and when >= t]
    print(f"\nrotation: v1 {by_version['v1']} calls, v2 {by_version['v2']}; v1 calls arriving after the switch: "
          f"{len(late)}, latest {max(late, default=0) * 1000:.0f} ms after it")
    assert all(when < t + TIMEOUT_S for secret, when, _ in upstream.log if secret == OLD)
    assert all(when >= t for secret, when, _ in upstream.log if secret == NEW)
    logs = kit.logs()
    assert OLD not in logs and NEW not in logs
    assert all(OLD not in r.model_dump_json() and NEW not in r.model_dump_json() for r in results.values())


async def test_a_file_secret_rewritten_mid_run_is_used_from_the_next_call(tmp_path, nats_server, upstream):
    secret_file = tmp_path / "k1.secret"
    secret_file.write_text(OLD + "\n")
    upstream.windows = {OLD: (0.0, float("inf"))}
    kit = RotationKit(tmp_path, nats_server.url, upstream.url)
    kit.key = {"secret": f"file:{secret_file}"}
    kit.dispatcher("d1"), kit.worker("w1")
    try:
        async with await Client.connect(nats_server.url) as client, Tracker(nats_server.url) as tracker:
            await wait_workers(client, {"w1"})
            start = time.time()
            submitting = asyncio.ensure_future(submit_paced(client, 600, start, start + 9, "file"))
            await asyncio.sleep(3)
            # rewritten in place; the provider keeps the old secret one second longer (calls in flight)
            upstream.windows[NEW] = (time.time(), float("inf"))
            secret_file.write_text(NEW + "\n")
            rewritten = time.time()
            upstream.windows[OLD] = (0.0, rewritten + 1.0)
            await asyncio.sleep(3)
            # then replaced atomically (a new inode), as a Kubernetes secret volume does
            upstream.windows[NEWER] = (time.time(), float("inf"))
            staged = tmp_path / ".k1.secret.new"
            staged.write_text(NEWER + "\n")
            os.replace(staged, secret_file)
            replaced = time.time()
            upstream.windows[NEW] = (rewritten, replaced + 1.0)
            ids = await submitting
            counts = await tracker.wait_stored("file", ids, timeout=90)
            results = await tracker.results(ids, "file")
    finally:
        kit.stop()
    assert set(counts) == set(ids)
    assert upstream.count(status=401) == 0, [entry for entry in upstream.log if entry[2] == 401][:5]
    assert all(r.status == "succeeded" for r in results.values())
    assert upstream.count(OLD) > 0 and upstream.count(NEW) > 0 and upstream.count(NEWER) > 0
    assert all(when < rewritten + 1.0 for secret, when, _ in upstream.log if secret == OLD)
    assert all(when >= replaced for secret, when, _ in upstream.log if secret == NEWER)
    assert {r.key_version for r in results.values()} == {"v1"}
    logs = kit.logs()
    assert OLD not in logs and NEW not in logs and NEWER not in logs


async def test_a_file_secret_that_appears_after_the_worker_started_brings_its_key_back(tmp_path, nats_server,
                                                                                      upstream):
    secret_file = tmp_path / "k1.secret"  # not there yet: the worker reports the key unusable
    upstream.windows = {NEW: (0.0, float("inf"))}
    kit = RotationKit(tmp_path, nats_server.url, upstream.url)
    kit.key = {"secret": f"file:{secret_file}"}
    kit.dispatcher("d1"), kit.worker("w1")
    try:
        async with await Client.connect(nats_server.url) as client, Tracker(nats_server.url) as tracker:
            await wait_workers(client, {"w1"})
            missing = await until(_k1_where(client, lambda view: view.get("disabled_by") == "secret"), 20, 0.2,
                                  "k1 reported without a usable secret")
            secret_file.write_text(NEW)
            await until(_k1_where(client, lambda view: not view.get("disabled")), 20, 0.2, "k1 back in rotation")
            ids = await client.submit_many([chat_job(i) for i in range(50)], "normal", batch="back")
            await tracker.wait_stored("back", ids, timeout=60)
            results = await tracker.results(ids, "back")
    finally:
        kit.stop()
    assert "unreadable" in missing["disabled_reason"] and str(secret_file) in missing["disabled_reason"]
    assert len(results) == 50 and all(r.status == "succeeded" for r in results.values())
    assert upstream.count(NEW, 200) == 50 and upstream.count(status=401) == 0
    assert NEW not in kit.logs()


def _k1_where(client, predicate):
    async def check():
        view = (await client.status(timeout=1.0))["keys"]["k1"]
        return view if predicate(view) else None
    return check
