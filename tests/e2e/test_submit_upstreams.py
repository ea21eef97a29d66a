"""`ratefleet submit` checks each line's upstream against the fleet's live config (the pushed
one) before anything is sent, as the dispatcher would: in a fleet of several upstreams a line
that names none, or names one the fleet lacks, is a bad line (exit 2, nothing sent; with
--skip-invalid the rest is sent). Before, every such line was stored, refused by the
dispatcher one by one (`invalid`, unknown_upstream) and dead-lettered."""

from __future__ import annotations

import json
import time

import nats
import pytest
from faultkit import cli

from ratefleet.runtime.config_kv import push_config
from ratefleet.runtime.streams import ensure_topology
from ratefleet.schemas import Subjects
from ratefleet.schemas.config import parse_config
from ratefleet.schemas.config_store import storable

pytestmark = [pytest.mark.anyio, pytest.mark.timeout(60)]
FLEET = {"upstreams": {"openai": {"base_url": "http://127.0.0.1:9"},
                       "anthropic": {"base_url": "http://127.0.0.1:9", "auth_header": "x-api-key", "auth_scheme": ""}},
         "pools": {"o": {"upstream": "openai", "keys": [{"id": "k1", "secret": "env:K1", "rps": 5}]},
                   "a": {"upstream": "anthropic", "keys": [{"id": "k2", "secret": "env:K2", "rps": 5}]}}}


def line(**fields) -> str:
    return json.dumps({"request": {"path": "/v1/chat/completions", "json": {"model": "m"}}, **fields}) + "\n"


async def queued(url: str) -> int:
    nc = await nats.connect(url)
    try:
        return (await nc.jetstream().stream_info("RATEFLEET_JOBS")).state.messages
    finally:
        await nc.close()


async def fleet_streams(url: str, *, push: bool) -> None:
    """The fleet's streams on the server, and with `push` FLEET stored as its live config."""
    nc = await nats.connect(url)
    try:
        js = nc.jetstream()
        await ensure_topology(js, parse_config(FLEET))
        if push:
            await push_config(js, Subjects(), storable(FLEET, source="fleet.toml", pushed_at=time.time()))
    finally:
        await nc.close()


async def test_lines_the_fleet_cannot_route_are_refused_before_sending(nats_server, tmp_path):
    await fleet_streams(nats_server.url, push=True)
    jobs = tmp_path / "jobs.jsonl"
    jobs.write_text(line() + line(upstream="openai") + line(upstream="gemini") + line(upstream="anthropic"))

    refused = cli("submit", str(jobs), "--tier", "normal", "--nats", nats_server.url)
    assert refused.returncode == 2, refused.stderr
    assert "line 1: upstream is required: several are configured (['anthropic', 'openai'])" in refused.stderr
    assert 'add "upstream": "<name>" to the line' in refused.stderr
    assert "line 3: unknown upstream 'gemini'" in refused.stderr
    assert "2 valid jobs on 4 lines, 2 invalid" in refused.stderr
    assert await queued(nats_server.url) == 0

    skipped = cli("submit", str(jobs), "--tier", "normal", "--nats", nats_server.url, "--skip-invalid", "--batch", "b1")
    assert skipped.returncode == 1, skipped.stderr  # not every line was submitted
    assert "stored 2 jobs" in skipped.stderr and "2 invalid lines were skipped (not submitted)" in skipped.stderr
    assert await queued(nats_server.url) == 2


async def test_without_a_pushed_config_lines_are_sent_as_before(nats_server, tmp_path):
    """Nothing to check against (a fleet started from its files): the dispatcher checks."""
    await fleet_streams(nats_server.url, push=False)
    jobs = tmp_path / "jobs.jsonl"
    jobs.write_text(line() + line(upstream="gemini"))
    sent = cli("submit", str(jobs), "--tier", "normal", "--nats", nats_server.url)
    assert sent.returncode == 0, sent.stderr
    assert await queued(nats_server.url) == 2


async def test_an_invalid_stored_config_is_named_not_skipped_in_silence(nats_server, tmp_path):
    """A config value written by other means than `config push` that does not validate: the
    lines go to the dispatcher as without a config, and submit says why it did not check them."""
    await fleet_streams(nats_server.url, push=True)
    nc = await nats.connect(nats_server.url)
    try:
        kv = await nc.jetstream().key_value(Subjects().config_bucket)
        stored = json.loads((await kv.get("current")).value)
        stored["config"]["pools"]["o"]["keys"][0]["rps"] = -5
        await kv.put("current", json.dumps(stored).encode())
    finally:
        await nc.close()
    jobs = tmp_path / "jobs.jsonl"
    jobs.write_text(line() + line(upstream="gemini"))
    sent = cli("submit", str(jobs), "--tier", "normal", "--nats", nats_server.url)
    assert sent.returncode == 0, sent.stderr
    assert "the fleet's stored config (revision 2) is invalid" in sent.stderr, sent.stderr
    assert "rps" in sent.stderr and "ratefleet config push FILE" in sent.stderr, sent.stderr
    assert await queued(nats_server.url) == 2


async def test_upstream_flag_routes_the_lines_that_name_none(nats_server, tmp_path):
    """`submit --upstream NAME`: lines without an upstream (an OpenAI Batch API line can name
    none) go to NAME and pass the check; a line's own upstream wins; a name the fleet lacks is
    refused before anything is sent; the resume command keeps the flag."""
    await fleet_streams(nats_server.url, push=True)
    jobs = tmp_path / "jobs.jsonl"
    openai_line = json.dumps({"custom_id": "c1", "method": "POST", "url": "/v1/chat/completions",
                              "body": {"model": "m", "messages": []}}) + "\n"
    jobs.write_text(openai_line + line() + line(upstream="anthropic"))

    refused = cli("submit", str(jobs), "--tier", "normal", "--nats", nats_server.url)
    assert refused.returncode == 2, refused.stderr
    assert "line 1: upstream is required" in refused.stderr and "pass --upstream NAME" in refused.stderr

    unknown = cli("submit", str(jobs), "--tier", "normal", "--nats", nats_server.url, "--upstream", "gemini")
    assert unknown.returncode == 2, unknown.stderr
    assert "--upstream 'gemini' is not one of this fleet's upstreams (anthropic, openai)" in unknown.stderr
    assert cli("submit", str(jobs), "--tier", "normal", "--upstream", " ").returncode == 2
    assert await queued(nats_server.url) == 0

    sent = cli("submit", str(jobs), "--tier", "normal", "--nats", nats_server.url, "--upstream", "openai",
               "--batch", "b1")
    assert sent.returncode == 0, sent.stderr
    assert "stored 3 jobs" in sent.stderr
    nc = await nats.connect(nats_server.url)
    try:
        js = nc.jetstream()
        upstreams = [json.loads((await js.get_msg("RATEFLEET_JOBS", seq)).data)["upstream"] for seq in (1, 2, 3)]
    finally:
        await nc.close()
    assert upstreams == ["openai", "openai", "anthropic"]


async def test_submit_without_a_dispatcher_says_so_and_out_without_wait_writes_nothing(nats_server, tmp_path):
    """A new user's findings: with no dispatcher running, submit stored the jobs without a word
    (--wait then sat 30 s before saying anything); `--out F` without `--wait` left an empty F
    that a pipeline would take for the (empty) Results."""
    await fleet_streams(nats_server.url, push=False)
    jobs = tmp_path / "jobs.jsonl"
    jobs.write_text(line(upstream="openai"))
    out = tmp_path / "r.jsonl"
    sent = cli("submit", str(jobs), "--tier", "normal", "--batch", "b9", "--out", str(out), "--nats", nats_server.url)
    assert sent.returncode == 0, sent.stderr
    assert "note: no dispatcher is running (nothing answers ratefleet.admin.status)" in sent.stderr, sent.stderr
    assert not out.exists()
    assert f"ratefleet results --batch b9 --wait --out {out}" in sent.stderr, sent.stderr


async def test_request_refuses_a_job_the_fleet_cannot_route_before_storing_it(nats_server):
    """`ratefleet request` checks the job's upstream as `submit` checks a line (a new user's
    finding: `request` stored the job, got `invalid` and left a dead letter marked replayable
    that no replay could help, where `submit` refused the same job with exit 2)."""
    await fleet_streams(nats_server.url, push=True)
    for job, why in ((line(upstream="gemini"), "unknown upstream 'gemini'"),
                     (line(), "upstream is required: several are configured")):
        refused = cli("request", job.strip(), "--tier", "normal", "--nats", nats_server.url, "--timeout", "3")
        assert refused.returncode == 2, refused.stdout + refused.stderr
        assert why in refused.stderr and "nothing was stored" in refused.stderr, refused.stderr
    assert await queued(nats_server.url) == 0
