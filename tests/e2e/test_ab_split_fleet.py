"""A/B routing over real processes: a tier whose `split` sends 30 % of its jobs to a pool whose
key the mock upstream counts apart (dispatcher/core/split.py). The mock's per-key call counts
must match the ids' sides exactly, and each Result must name its side."""

from __future__ import annotations

import httpx
import pytest
from fleetkit import FleetKit, chat_job, collect, mock_keys, wait_for_leader
from gatewaykit import CALLER_KEYS, caller_env, callers, free_port, start_gateway
from prometheus_client.parser import text_string_to_metric_families

from ratefleet import Client
from ratefleet.dispatcher.core.split import SplitSpec, variant_of
from ratefleet.mock import MockSettings, running_mock

pytestmark = [pytest.mark.timeout(180), pytest.mark.anyio]
JOBS = 200
SHARE = 0.3


@pytest.fixture
def upstream():
    keys = mock_keys(rps=500, burst=50, ids=("k1", "k2", "k3"))
    with running_mock(MockSettings(keys=keys, accept_unknown=False)) as mock:
        yield mock


def split_kit(tmp_path, nats_server, upstream, **overrides) -> FleetKit:
    alt = [{"id": "k3", "secret": "env:RF_TEST_K3", "rps": 200, "burst": 20}]
    tiers = {"premium": {"weight": 2, "pools": ["shared"], "split": {"pools": ["alt"], "share": SHARE}},
             "normal": {"weight": 1, "pools": ["shared"]}}
    kit = FleetKit(tmp_path, nats_server.url, upstream.url,
                   keys=[{"id": "k1", "rps": 200, "burst": 20}, {"id": "k2", "rps": 200, "burst": 20}],
                   overrides={"pools": {"alt": {"keys": alt}}, "tiers": tiers, **overrides})
    kit.dispatcher("d1")
    port = free_port()
    kit.spawn("worker", "--id", "w1", "--slots", "32", "--http", f"127.0.0.1:{port}", name="w1")
    kit.worker_metrics = f"http://127.0.0.1:{port}/metrics"  # type: ignore[attr-defined]
    return kit


def split_counts(url: str) -> dict[tuple[str, str, str], float]:
    """ratefleet_split_jobs_total by (tier, variant, status), scraped from a worker."""
    text = httpx.get(url, timeout=10, trust_env=False).text
    return {(s.labels["tier"], s.labels["variant"], s.labels["status"]): s.value
            for family in text_string_to_metric_families(text) if family.name == "ratefleet_split_jobs"
            for s in family.samples if s.name.endswith("_total")}


async def test_a_split_tier_sends_its_share_to_the_split_pool_and_results_say_which(tmp_path, nats_server, upstream):
    kit = split_kit(tmp_path, nats_server, upstream)
    try:
        async with await Client.connect(nats_server.url) as client:
            await wait_for_leader(client)
            ids = await client.submit_many([chat_job(i, id=f"ab-{i:04d}") for i in range(JOBS)], tier="premium",
                                           batch="ab")
            control = await client.submit_many([chat_job(i, id=f"ctl-{i:04d}") for i in range(50)], tier="normal",
                                               batch="ctl")
            results = await collect(client, "ab", JOBS, timeout=90)
            normal = await collect(client, "ctl", 50, timeout=60)
            counted = split_counts(kit.worker_metrics)
    finally:
        kit.stop()
    assert len(results) == JOBS and all(r.ok for r in results.values())
    expected = {job_id: variant_of(job_id, SplitSpec(("alt",), SHARE)) for job_id in ids}
    assert {job_id: r.variant for job_id, r in results.items()} == expected
    assert all((r.pool == "alt") == (r.variant == "split") for r in results.values())
    split_count = sum(v == "split" for v in expected.values())
    assert abs(split_count / JOBS - SHARE) < 0.1  # the share, within a generous margin for 200 ids
    keys = upstream.stats()["keys"]
    assert keys["k3"]["calls"] == split_count  # only split jobs reach the alt pool's key
    assert keys["k1"]["calls"] + keys["k2"]["calls"] == JOBS - split_count + len(control)
    # a tier without a split is routed as before: no variant, its own pool
    assert {(r.variant, r.pool) for r in normal.values()} == {(None, "shared")}
    # the worker's metrics carry the variant (tiers without a split are not counted there)
    assert counted == {("premium", "split", "succeeded"): split_count,
                       ("premium", "control", "succeeded"): JOBS - split_count}


async def test_gateway_requests_on_a_split_tier_carry_the_variant(tmp_path, nats_server, upstream, monkeypatch):
    import openai

    caller_env(monkeypatch)
    kit = split_kit(tmp_path, nats_server, upstream,
                    callers=callers(alice={"tier": "premium"}, bob={"tier": "normal"}, carol={"tier": "normal"}))
    try:
        url = start_gateway(kit)
        async with await Client.connect(nats_server.url) as client:
            await wait_for_leader(client)
            async with openai.AsyncOpenAI(base_url=url + "/v1", api_key=CALLER_KEYS["alice"], max_retries=0,
                                          timeout=30) as ai:
                job_ids = []
                for i in range(20):
                    raw = await ai.chat.completions.with_raw_response.create(
                        model="mock", messages=[{"role": "user", "content": f"ab {i}"}])
                    job_ids.append(raw.headers["x-ratefleet-job-id"])
            stored = [await client.stored_result(job_id) for job_id in job_ids]
    finally:
        kit.stop()
    split = SplitSpec(("alt",), SHARE)
    assert [r.variant for r in stored] == [variant_of(job_id, split) for job_id in job_ids]
    assert all((r.pool == "alt") == (r.variant == "split") for r in stored)
