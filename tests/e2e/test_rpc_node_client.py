"""A Node service calling the fleet over plain NATS request/reply with the npm `nats` package
(nats.js), from the README's wire contract only (tests/e2e/node/rpc_retry.mjs).

Skipped when `node` or `npm` is missing, or the package cannot be installed (no network)."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest
from faultkit import calls, one_worker_fleet

pytestmark = [pytest.mark.timeout(120), pytest.mark.anyio]

SCRIPT = Path(__file__).parent / "node" / "rpc_retry.mjs"
NATS_JS = "nats@2"


@pytest.fixture(scope="module")
def node_dir(tmp_path_factory) -> Path:
    """A directory holding rpc_retry.mjs beside node_modules/nats."""
    if not shutil.which("node") or not shutil.which("npm"):
        pytest.skip("node and npm are needed")
    where = tmp_path_factory.mktemp("node")
    done = subprocess.run(["npm", "install", "--no-audit", "--no-fund", "--prefix", str(where), NATS_JS],
                          capture_output=True, text=True, timeout=120)
    if done.returncode != 0:
        pytest.skip(f"npm install {NATS_JS} failed: {done.stderr.strip()[-200:]}")
    shutil.copy(SCRIPT, where / SCRIPT.name)
    return where


def run_node(node_dir: Path, url: str, scenario: str) -> dict:
    done = subprocess.run(["node", str(node_dir / SCRIPT.name), url, scenario], capture_output=True, text=True,
                          timeout=60, cwd=node_dir)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.strip().splitlines()[-1])


async def test_a_node_retry_after_a_timeout_gets_the_answer_as_it_is_stored(tmp_path, nats_server, node_dir):
    """The first request times out at 1 s; its retry (same id, sent at ~1 s) is answered when the
    3 s call's Result is stored, not at the dispatcher's next read of the store (reads 0.25, 0.75,
    1.75 and 3.75 s after the retry: about 4.8 s before), and the job is called once."""
    async with one_worker_fleet(tmp_path, nats_server.url) as (mock, _, _client):
        out = await _in_thread(run_node, node_dir, nats_server.url, "retry")
        assert out["first_error"] == "TIMEOUT"
        assert out["retry_status"] == "succeeded" and out["retry_job_id"] == "node-retry-1"
        # 4.8 s before; the call's 3 s and a loaded machine's wake-ups since
        assert out["retry_at_ms"] < 4300, f"the retry was answered at {out['retry_at_ms']} ms for a 3 s call"
        assert calls(mock, path="/v1/chat/completions") == 1


async def test_no_dispatcher_is_no_responders_at_once(nats_server, node_dir):
    """As the README says: with no dispatcher running, nats.js raises its no-responders error
    ("503") at once, and nothing is stored."""
    out = await _in_thread(run_node, node_dir, nats_server.url, "no_dispatcher")
    assert out["error"] == "503" and out["ms"] < 2000


async def _in_thread(fn, *args):
    import anyio

    return await anyio.to_thread.run_sync(lambda: fn(*args))
