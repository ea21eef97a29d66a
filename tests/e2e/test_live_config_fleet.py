"""A config push in the middle of a batch, over a real nats-server, the mock upstream and
real dispatcher and worker processes: a key is added, a limit changed and a key removed
while jobs run. Every job ends with exactly one Result, none is lost, the new key takes
calls after the push, the removed key takes none once the change is applied, and the mock
(which enforces each key's real limits) never answers 429. Prints what the reload cost."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import time

import pytest
import tomli_w
from fleetkit import FleetKit, chat_job, collect, mock_keys

from ratefleet import Client
from ratefleet.mock import MockSettings, running_mock

pytestmark = [pytest.mark.timeout(300)]
JOBS = 300
BEFORE = [{"id": "k1", "rps": 8, "burst": 3}, {"id": "k2", "rps": 8, "burst": 3}]
AFTER = [{"id": "k1", "rps": 12, "burst": 3}, {"id": "k3", "rps": 8, "burst": 3}]  # k1 changed, k2 out, k3 in


def cli(*args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "ratefleet", *args], capture_output=True, text=True, timeout=timeout)


@pytest.fixture
def fleet(tmp_path, nats_server):
    # the mock's own limits sit above anything the fleet is told, so any 429 is the fleet's fault
    settings = MockSettings(keys=mock_keys(rps=20, burst=6, ids=("k1", "k2", "k3")), accept_unknown=False,
                            latency_ms=40)
    with running_mock(settings) as upstream:
        kit = FleetKit(tmp_path, nats_server.url, upstream.url, keys=list(BEFORE))
        kit.write_config()
        try:
            yield kit, upstream
        finally:
            kit.stop()


def push(kit: FleetKit, keys: list[dict], name: str) -> subprocess.CompletedProcess:
    kit.keys = keys
    data = kit.config()
    path = kit.tmp / name
    path.write_text(tomli_w.dumps(data))
    return cli("config", "push", str(path), "--nats", kit.nats_url)


async def push_in_process(kit: FleetKit, keys: list[dict]) -> tuple[int, float]:
    """Push like `config push` does, from this process: (revision, when it was stored)."""
    import nats

    from ratefleet.runtime.config_kv import document_for, push_config
    from ratefleet.schemas import Subjects

    kit.keys = keys
    path = kit.tmp / "r2.toml"
    path.write_text(tomli_w.dumps(kit.config()))
    nc = await nats.connect(kit.nats_url)
    try:
        revision, changed = await push_config(nc.jetstream(), Subjects(), document_for(path))
        assert changed
        return revision, time.monotonic()
    finally:
        await nc.close()


async def wait_revision(client: Client, revision: int, workers: int, timeout: float = 30.0) -> dict:
    """Until the leader and `workers` workers run `revision`; the status seen then."""
    deadline = time.monotonic() + timeout
    status: dict = {}
    while time.monotonic() < deadline:
        try:
            status = await client.status(timeout=1.0)
        except Exception:  # noqa: BLE001 - no leader yet
            status = {}
        seen = [w.get("config_revision") for w in status.get("workers") or []]
        if status.get("config_revision") == revision and len(seen) == workers and set(seen) == {revision}:
            return status
        await asyncio.sleep(0.05)
    raise AssertionError(f"revision {revision} not applied everywhere within {timeout}s: {json.dumps(status)[:2000]}")


@pytest.mark.anyio
async def test_a_push_mid_batch_loses_nothing_and_uses_the_new_keys(tmp_path, nats_server, fleet):
    kit, upstream = fleet
    assert push(kit, BEFORE, "r1.toml").returncode == 0
    kit.dispatcher("d1"), kit.worker("w1", slots=8), kit.worker("w2", slots=8)
    async with await Client.connect(nats_server.url) as client:
        await wait_revision(client, 1, workers=2)
        await client.submit_many([chat_job(i) for i in range(JOBS)], tier="normal", batch="live")
        deadline = time.monotonic() + 60
        while upstream.stats()["requests"] < JOBS // 4 and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        before = await client.status(timeout=2.0)
        unacked = sum(t.get("unacked") or 0 for t in before["tiers"].values())  # delivered, no Result yet
        calls_at_push = upstream.stats()["requests"]
        revision, pushed = await push_in_process(kit, AFTER)  # timed without a process start
        assert revision == 2
        after = await wait_revision(client, 2, workers=2)
        applied = time.monotonic()
        k2_at_apply = upstream.stats()["keys"]["k2"]["calls"]
        assert set(after["keys"]) == {"k1", "k3"}
        assert after["keys"]["k1"]["rps"] == 12

        bad = push(kit, [{"id": "k1", "rps": -1, "burst": 3}], "bad.toml")  # refused: nothing changes
        assert bad.returncode == 2 and "pools.shared.keys.0.rps" in bad.stderr

        results = await collect(client, "live", JOBS, timeout=120)
        status = await client.status(timeout=2.0)
    stats = upstream.stats()
    assert len(results) == JOBS, f"{JOBS - len(results)} jobs without a Result"
    assert {r.status for r in results.values()} == {"succeeded"}
    keys = stats["keys"]
    assert sum(k["rate_limited"] for k in keys.values()) == 0, keys
    assert keys["k3"]["calls"] > 0  # the new key took calls
    assert keys["k2"]["calls"] == k2_at_apply  # the removed key none once the change was applied everywhere
    assert stats["requests"] == JOBS  # one call per job: nothing was called twice
    assert status["config_revision"] == 2  # the refused push left the revision alone
    print(f"\nreload cost: {unacked} jobs delivered and unfinished at the push (upstream calls so far: "
          f"{calls_at_push}), {JOBS - len(results)} lost, 0 x 429; applied by the leader and both workers "
          f"{applied - pushed:.3f} s after the KV write")


@pytest.mark.anyio
async def test_push_says_where_the_revision_runs_and_which_keys_no_worker_can_use(tmp_path, nats_server, fleet):
    """`config push` waits (up to --wait-s) for the leader and the workers to run the revision
    and names each key no worker has the secret of (out of rotation until one has it)."""
    kit, _ = fleet
    alone = push(kit, BEFORE, "r1.toml")
    assert alone.returncode == 0, alone.stderr
    assert "no dispatcher is running: the fleet applies revision 1 when it starts" in alone.stdout, alone.stdout
    kit.dispatcher("d1"), kit.worker("w1", slots=2), kit.worker("w2", slots=2)
    async with await Client.connect(nats_server.url) as client:
        await wait_revision(client, 1, workers=2)
    pushed = push(kit, [*BEFORE, {"id": "k9", "rps": 1, "burst": 1}], "r2.toml")  # RF_TEST_K9 is set nowhere
    assert pushed.returncode == 0, pushed.stderr
    assert "pushed" in pushed.stdout and "config revision 2" in pushed.stdout
    assert "runs it; its 2 workers run it too" in pushed.stdout, pushed.stdout
    assert "warning: key k9 is out of rotation: no worker can call with it (" in pushed.stdout, pushed.stdout
    assert "RF_TEST_K9" in pushed.stdout and "key k1 " not in pushed.stdout, pushed.stdout
    same = cli("status", "--config", str(kit.tmp / "r2.toml"), "--nats", kit.nats_url)
    assert same.returncode == 0 and "note:" not in same.stdout, same.stdout
    broken = kit.tmp / "r2.toml"  # an edit `up --config`'s watch refuses: status says so (before: only up's log)
    broken.write_text(broken.read_text().replace("rps = 8", "rps = -8", 1))
    told = cli("status", "--config", str(broken), "--nats", kit.nats_url)
    assert told.returncode == 0, told.stderr
    assert f"note: {broken} has errors, so the fleet does not run it (it runs revision 2)" in told.stdout, told.stdout
    kit.stop()  # the workers gone, the leader keeps their last word for a while; then no dispatcher at all
    late = push(kit, BEFORE, "r3.toml")
    assert late.returncode == 0 and "no dispatcher is running" in late.stdout, late.stdout
