"""A config revision that adds a key version not yet active (what `ratefleet keys rotate
--at` writes and `ratefleet up --config` pushes) makes a running worker warn at once when it
cannot use that version's secret, not only at the switch when the key leaves rotation
(a real worker process, a real nats-server, the revision stored in the config bucket)."""

from __future__ import annotations

import time
from datetime import UTC, datetime, timedelta

import anyio
import nats
import pytest
from fleetkit import FleetKit

from ratefleet.runtime.config_kv import push_config
from ratefleet.schemas import Subjects
from ratefleet.schemas.config_store import storable

pytestmark = [pytest.mark.timeout(120), pytest.mark.anyio]


async def wait_for_log(kit: FleetKit, text: str, timeout: float = 60.0) -> None:
    with anyio.fail_after(timeout):
        while text not in kit.logs():
            await anyio.sleep(0.1)


async def test_worker_warns_of_an_unusable_pending_version_when_the_revision_arrives(tmp_path, nats_server):
    kit = FleetKit(tmp_path, nats_server.url, "http://127.0.0.1:9")
    kit.worker("w1")
    try:
        await wait_for_log(kit, '"worker started"')
        switch = (datetime.now(UTC) + timedelta(hours=1)).replace(microsecond=0)
        data = kit.config()
        data.pop("nats")
        data["pools"]["shared"]["keys"][0] = {"id": "k1", "rps": 50, "versions": [
            {"id": "v1", "secret": "env:RF_TEST_K1", "not_after": switch},
            {"id": "v2", "secret": "env:RF_TEST_K1_NOT_SET_HERE", "not_before": switch},
        ]}
        nc = await nats.connect(nats_server.url)
        try:
            revision, changed = await push_config(nc.jetstream(), Subjects(), storable(data, source="t.toml",
                                                                                           pushed_at=time.time()))
        finally:
            await nc.close()
        assert changed
        await wait_for_log(kit, '"event": "config revision applied"')
        logs = kit.logs()
        warning = next(line for line in logs.splitlines() if "not yet active" in line)
        assert '"key_version": "k1 v2"' in warning and "RF_TEST_K1_NOT_SET_HERE" in warning
        assert f'"revision": {revision}' in warning
        assert "sk-test-" not in logs
    finally:
        kit.stop()
