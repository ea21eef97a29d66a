"""Beyond one leader: two dispatcher groups (two `[nats] prefix`es) on one NATS server, each
with its own leader, lease, streams, KV buckets, workers and key pool (README "Beyond one
leader"). Both run flat out on the same upstream at once: each group calls only its own keys,
spends them within their limits (the mock enforces the same limits: a 429 is a broken limit),
and sees only its own jobs and Results, though both use the same batch name."""

from __future__ import annotations

import pytest
from fleetkit import FleetKit, chat_job, collect, mock_keys, wait_for_leader

from ratefleet import Client
from ratefleet.mock import MockSettings, running_mock

pytestmark = [pytest.mark.timeout(150), pytest.mark.anyio]
GROUPS = {"grp-a": ("k1", "k2"), "grp-b": ("k3", "k4")}
JOBS = 120


async def test_two_dispatcher_groups_share_a_nats_server_and_never_touch_each_others_keys(tmp_path, nats_server):
    limits = mock_keys(rps=20, burst=6, ids=("k1", "k2", "k3", "k4"))  # burst 6 vs the fleet's 3: see test_dispatch_limits
    kits: dict[str, FleetKit] = {}
    results: dict[str, dict] = {}
    leaders: dict[str, str] = {}
    with running_mock(MockSettings(keys=limits, accept_unknown=False, latency_ms=5)) as upstream:
        try:
            for group, ids in GROUPS.items():
                (tmp_path / group).mkdir()
                kit = kits[group] = FleetKit(tmp_path / group, nats_server.url, upstream.url,
                                             keys=[{"id": k, "rps": 20, "burst": 3} for k in ids],
                                             overrides={"nats": {"prefix": group}})
                kit.dispatcher(f"d-{group}"), kit.worker(f"w-{group}", slots=8)
            clients = {group: await Client.connect(nats_server.url, prefix=group) for group in GROUPS}
            try:
                for group, client in clients.items():
                    status = await wait_for_leader(client)
                    leaders[group] = status["leader"]
                    assert [w["id"] for w in status["workers"]] == [f"w-{group}"], status["workers"]
                for group, client in clients.items():  # both queues full before either drains
                    await client.submit_many([chat_job(i, id=f"{group}-{i}") for i in range(JOBS)], "normal",
                                             batch="nightly")
                for group, client in clients.items():
                    results[group] = await collect(client, "nightly", JOBS, timeout=60)
            finally:
                for client in clients.values():
                    await client.close()
        finally:
            for kit in kits.values():
                kit.stop()
        stats = upstream.stats()
    assert leaders == {"grp-a": "d-grp-a", "grp-b": "d-grp-b"}, leaders
    for group, ids in GROUPS.items():
        got = results[group]
        assert sorted(got) == sorted(f"{group}-{i}" for i in range(JOBS)), f"{group} saw other jobs or lost some"
        assert all(r.ok and r.key_id in ids and r.worker == f"w-{group}" for r in got.values()), \
            {r.job_id: (r.status, r.key_id, r.worker) for r in got.values() if not (r.ok and r.key_id in ids)}
        assert sum(stats["keys"][k]["calls"] for k in ids) == JOBS, (group, stats["keys"])
    assert sum(k["rate_limited"] for k in stats["keys"].values()) == 0, stats["keys"]
