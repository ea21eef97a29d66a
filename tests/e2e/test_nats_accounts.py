"""examples/nats-accounts.conf over a real nats-server: the fleet (dispatcher and worker
processes as the `fleet` user) serves an ordinary producer (the Client, raw rpc, the CLI),
and that producer can neither use the internal protocol nor write Results: each attack of
issue 9 section 5 is tried as the producer and refused by the server, with no effect on
the fleet."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import time
import tomllib
from pathlib import Path

import pytest
import tomli_w
from fleetkit import FleetKit, chat_job
from natsauth_kit import PASSWORDS, Intruder, Upstream, role_nats, serve, start_accounts_server

from ratefleet import Client
from ratefleet.schemas import Result, Subjects
from ratefleet.schemas.config_nats import NatsAuthConfig
from ratefleet.schemas.errors import NatsUnavailable

pytestmark = [pytest.mark.timeout(180), pytest.mark.anyio]
S = Subjects()


def auth(user: str) -> NatsAuthConfig:
    return NatsAuthConfig.model_validate(role_nats(user))


@pytest.fixture
def server(tmp_path):
    nats_server = start_accounts_server(tmp_path)
    yield nats_server
    nats_server.stop()


@pytest.fixture
async def upstream():
    up = Upstream()
    runner = await serve(up)
    yield up
    await runner.cleanup()


@pytest.fixture
def fleet(tmp_path, server, upstream):
    kit = FleetKit(tmp_path, server.url, upstream.url, overrides={"nats": role_nats("fleet")})
    kit.dispatcher("d1")
    kit.worker("w1")
    yield kit
    kit.stop()


async def leader_up(url: str, timeout: float = 30.0) -> dict:
    async with await Client.connect(url, auth=auth("operator")) as operator:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                status = await operator.status(timeout=1.0)
                if status.get("leader") and status.get("workers"):
                    return status
            except Exception:  # noqa: BLE001 - not up yet
                pass
            await asyncio.sleep(0.2)
    raise AssertionError("no leader with a worker")


async def results_of(client: Client, batch: str, count: int, timeout: float = 60.0) -> dict[str, Result]:
    found: dict[str, Result] = {}

    async def follow():
        async for result in client.results(batch, follow=True):
            found.setdefault(result.job_id, result)
            if len(found) >= count:
                return

    try:
        await asyncio.wait_for(follow(), timeout)
    except TimeoutError:
        pass
    return found


def run_cli(args: list[str], env: dict, timeout: float = 90) -> subprocess.CompletedProcess:
    try:
        return subprocess.run([sys.executable, "-m", "ratefleet", *args], capture_output=True, text=True,
                              timeout=timeout, env=env)
    except subprocess.TimeoutExpired as exc:
        raise AssertionError(f"ratefleet {args[0]} did not finish: {exc.stderr!r} {exc.stdout!r}") from None


async def test_an_ordinary_producer_gets_the_whole_fleet_through_the_account_config(fleet, server, upstream, tmp_path):
    await leader_up(server.url)
    async with await Client.connect(server.url, auth=auth("producer")) as producer:
        ids = await producer.submit_many([chat_job(i) for i in range(20)], "normal", batch="acct")
        results = await results_of(producer, "acct", 20)
        assert set(results) == set(ids) and all(r.ok for r in results.values())
        answer = await producer.request(chat_job(99), "vip", timeout=30)
        assert answer.ok and answer.worker == "w1"
        assert (await producer.stored_result(answer.job_id)).ok
        big = await producer.request({"request": {"method": "POST", "path": "/v1/x", "json": {"model": "big"}}},
                                     "vip", timeout=60)
        assert big.ok and big.response.json_body["data"] == "x" * (2 << 20)  # fetched from the Object Store
        reply = await producer.nc.request(S.rpc("normal"), json.dumps(chat_job(7)).encode(), timeout=30)
        assert Result.from_json(reply.data).ok  # raw rpc, as any NATS client does it
    # the CLI as the producer: [nats] user/password from its config
    config = tmp_path / "producer.toml"
    config.write_text(tomli_w.dumps({"nats": {"url": server.url, **role_nats("producer")},
                                     "tiers": {"vip": {}, "premium": {}, "normal": {}, "guest": {}}}))
    jobs = tmp_path / "jobs.jsonl"
    jobs.write_text("".join(json.dumps(chat_job(i)) + "\n" for i in range(5)))
    out = tmp_path / "out.jsonl"
    args = ["submit", str(jobs), "--tier", "normal", "--batch", "cli", "--wait", "--out", str(out), "--config", str(config)]
    done = await asyncio.to_thread(run_cli, args, fleet.env())  # in a thread: the upstream serves on this loop
    assert done.returncode == 0, done.stderr
    assert [json.loads(line)["status"] for line in out.read_text().splitlines()] == ["succeeded"] * 5
    assert PASSWORDS["producer"] not in done.stderr + done.stdout
    # submit's optional reads, which the producer may not do (the fleet config, for the lines'
    # upstreams; admin.status, "is a dispatcher running?"), are no warning: each run logged
    # "nats error ... permissions violation ... kv_ratefleet_config" and "... ratefleet.admin.status"
    assert "nats error" not in done.stderr and "ermissions" not in done.stderr, done.stderr
    cancelled = await asyncio.to_thread(run_cli, ["cancel", "--batch", "cli", "--config", str(config)], fleet.env())
    assert cancelled.returncode == 0, cancelled.stderr
    assert "nats error" not in cancelled.stdout + cancelled.stderr, cancelled.stderr  # its admin.status probe too
    # a permissions warning NATS sends the producer (`status` is the operator's) is a log line:
    # on stderr as JSON, never in the command's output on stdout (structlog's default printed it there)
    status = await asyncio.to_thread(run_cli, ["status", "--config", str(config)], fleet.env())
    assert status.returncode == 1 and "NATS refused this user" in status.stderr, status.stderr
    last = status.stderr.strip().splitlines()[-1]  # it ended "... is `ratefleet up` or `ratefleet dispatcher` running?"
    assert last.endswith("then: this user may not ask ratefleet.admin.status") and "running?" not in last, last
    switched = await asyncio.to_thread(run_cli, ["keys", "disable", "k1", "--config", str(config)], fleet.env())
    last = switched.stderr.strip().splitlines()[-1]
    assert switched.returncode == 1 and last.endswith("then: this user may not send ratefleet.admin.keys"), last
    assert "nats error" not in status.stdout and "ermissions" not in status.stdout, status.stdout
    logged = [json.loads(line) for line in status.stderr.splitlines() if line.startswith("{")]
    assert any(entry.get("event") == "nats error" for entry in logged), status.stderr


async def test_wrong_or_missing_credentials_are_refused_without_showing_them(server):
    wrong = NatsAuthConfig(user="producer", password="not-the-password-123")  # type: ignore[arg-type]
    with pytest.raises(NatsUnavailable) as refused:
        await Client.connect(server.url, auth=wrong)
    assert "not-the-password-123" not in str(refused.value) and "refused the credentials" in str(refused.value)
    with pytest.raises(NatsUnavailable):
        await Client.connect(server.url)  # no user: the account config admits nobody anonymous


async def test_the_producer_cannot_drive_the_fleet(fleet, server, upstream):
    """Each attack of the issue, as the producer user: refused by the server, no effect."""
    await leader_up(server.url)
    intruder = await Intruder().connect(server.url, "producer")
    try:
        async with await Client.connect(server.url, auth=auth("producer")) as producer:
            # a Result published ahead of the job must not become its Result
            fake = {"job_id": "early-1", "status": "succeeded", "tier": "normal", "attempts": 1}
            assert await intruder.publish_refused(S.results("_", "early-1"), fake)
            # fake assignments (any key; a key paired with another upstream)
            assignment = {"id": "a-forged", "job": chat_job(1), "job_id": "forged-1", "tier": "normal",
                          "upstream": "mock", "key_id": "k1", "pool": "shared", "ack": "_INBOX.producer.x",
                          "attempt": 1, "max_attempts": 1, "submitted_at": time.time(), "queued_ms": 0,
                          "epoch": [2**62, 2**62]}
            assert await intruder.publish_refused(S.assign("w1"), assignment)
            # a leader announce with a huge epoch
            assert await intruder.publish_refused(S.leader_announce, {"leader": "evil", "epoch": [2**62, 2**62]})
            # two fake 401 outcome reports, fake "ok" outcomes
            for kind, status in (("key_error", 401), ("key_error", 401), ("ok", 200)):
                report = {"assignment": "a-x", "worker": "w1", "key_id": "k1", "job_id": "j-x", "kind": kind,
                          "status": status}
                assert await intruder.publish_refused(S.outcome, report)
            # heartbeats under a fake worker id / faking w1's empty slots, then acks of deliveries
            assert await intruder.publish_refused(S.heartbeat, {"worker": "ghost", "slots": 64})
            assert await intruder.publish_refused(S.heartbeat, {"worker": "w1", "slots": 64})
            assert await intruder.publish_refused("$JS.ACK.RATEFLEET_JOBS.normal.1.1.1.1.0", b"+ACK")
            # the leader lease, the streams themselves, the work queue
            assert await intruder.publish_refused("$KV.ratefleet_leader.leader", {"leader": "evil"})
            for api in ("STREAM.DELETE.RATEFLEET_JOBS", "STREAM.PURGE.RATEFLEET_RESULTS",
                        "STREAM.UPDATE.RATEFLEET_JOBS", "CONSUMER.CREATE.RATEFLEET_JOBS.steal.ratefleet.jobs.normal",
                        "CONSUMER.DURABLE.CREATE.RATEFLEET_JOBS.steal", "STREAM.MSG.DELETE.RATEFLEET_RESULTS"):
                assert await intruder.publish_refused(f"$JS.API.{api}", {})
            # reading what is not the producer's: the protocol, rpc requests, other users' replies
            for subject in ("ratefleet.internal.>", "ratefleet.rpc.*", "_INBOX.>", "ratefleet.jobs.>",
                            "ratefleet.admin.status"):
                await intruder.nc.subscribe(subject)
                await intruder.nc.flush()
                assert await intruder.refused("subscription", subject), subject
            # the fleet is untouched: jobs run once each, on keys still enabled, the real Result wins
            ids = await producer.submit_many([chat_job(i, id=f"early-{i}") for i in range(1, 11)], "normal")
            results = await results_of(producer, None, 10)
            assert set(results) == set(ids) and all(r.ok and r.worker == "w1" for r in results.values())
            assert results["early-1"].response is not None  # the fleet's own Result, not the forged one
    finally:
        await intruder.close()
    status = await leader_up(server.url)
    assert status["leader"] != "evil"
    assert all(not key.get("disabled") for key in status["keys"].values()), status["keys"]
    assert [c for c in upstream.calls if c[0] != "k1" and c[0] != "k2"] == []
    assert len(upstream.calls) == 10  # no forged call was made


async def test_the_producer_cannot_use_the_operators_switches(fleet, server):
    await leader_up(server.url)
    intruder = await Intruder().connect(server.url, "producer")
    try:
        assert await intruder.publish_refused(S.admin_keys, {"action": "disable", "key": "k1", "reason": "evil"})
        assert await intruder.publish_refused("$JS.API.STREAM.MSG.DELETE.RATEFLEET_DEAD", {"seq": 1})
    finally:
        await intruder.close()
    status = await leader_up(server.url)
    assert not status["keys"]["k1"].get("disabled")


async def test_the_operator_pushes_the_fleet_config_and_the_producer_cannot(fleet, server, tmp_path):
    """`config push` / `config show` need the operator user; the fleet applies the revision."""
    await leader_up(server.url)
    fleet_config = tomllib.loads(fleet.config_path.read_text())

    def config_as(user: str, rps: float) -> Path:
        doc = {**fleet_config, "nats": {"url": server.url, **role_nats(user)}}
        doc["pools"] = json.loads(json.dumps(doc["pools"]))
        for pool in doc["pools"].values():
            for key in pool["keys"]:
                key["rps"] = rps
        path = tmp_path / f"{user}-push.toml"
        path.write_text(tomli_w.dumps(doc))
        return path

    refused = await asyncio.to_thread(run_cli, ["config", "push", str(config_as("producer", 7))], fleet.env())
    assert refused.returncode != 0 and PASSWORDS["producer"] not in refused.stderr + refused.stdout
    last = refused.stderr.strip().splitlines()[-1]  # it ended "error: unexpected TimeoutError: nats: timeout"
    assert last.lower().startswith("error: nats refused this user $js.api.") and "need the operator user" in last, last
    assert last.endswith("then: the command could not go on without it") and "unexpected" not in last, last
    pushed = await asyncio.to_thread(run_cli, ["config", "push", str(config_as("operator", 9))], fleet.env())
    assert pushed.returncode == 0, pushed.stderr + pushed.stdout
    shown = await asyncio.to_thread(run_cli, ["config", "show", "--json", "--config", str(config_as("operator", 9))],
                                    fleet.env())
    assert shown.returncode == 0, shown.stderr
    assert '"rps": 9' in shown.stdout.replace("9.0", "9") and PASSWORDS["operator"] not in shown.stdout
    deadline = asyncio.get_running_loop().time() + 30
    while True:  # the fleet (its own user) follows the bucket the operator wrote
        status = await leader_up(server.url)
        if all(key["rps"] == 9 for key in status["keys"].values()):
            break
        assert asyncio.get_running_loop().time() < deadline, status["keys"]
        await asyncio.sleep(0.5)
