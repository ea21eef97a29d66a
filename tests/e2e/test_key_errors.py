"""Key-scoped versus request-scoped errors, key probes, operator decisions and missing
secrets, over real processes: nats-server, dispatchers and workers as `python -m ratefleet`
children, and a small real HTTP upstream (aiohttp) whose answers each test sets per key
and per model."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sys
from collections import Counter
from dataclasses import dataclass, field

import pytest
from aiohttp import web
from faultkit import Tracker, cli, until, wait_workers
from fleetkit import SECRETS, FleetKit, chat_job

from ratefleet import Client

pytestmark = [pytest.mark.timeout(120), pytest.mark.anyio]

KEY_OF = {secret: key_id for key_id, secret in SECRETS.items()}
# OpenAI-style and Anthropic-style error bodies (see schemas/signals.py)
BODIES = {
    "bare401": (401, {"error": {"message": "Unauthorized"}}),
    "invalid_api_key": (401, {"error": {"message": "Incorrect API key provided.", "type": "invalid_request_error",
                                        "code": "invalid_api_key"}}),
    "insufficient_quota": (429, {"error": {"message": "You exceeded your current quota.", "type": "insufficient_quota",
                                           "code": "insufficient_quota"}}),
}
FORBIDDEN = (403, {"type": "error", "error": {"type": "permission_error",
                                              "message": "Your API key does not have permission to use this model."}})
# a model (deployment) out of a key's reach: OpenAI and Azure OpenAI (schemas/signals.py)
MODEL_NOT_FOUND = (404, {"error": {"message": "The model `gpt-4o` does not exist or you do not have access to it.",
                                   "type": "invalid_request_error", "param": None, "code": "model_not_found"}})
DEPLOYMENT_NOT_FOUND = (404, {"error": {"code": "DeploymentNotFound", "message": (
    "The API deployment for this resource does not exist. If you created the deployment within the last 5 minutes, "
    "please wait a moment and try again.")}})


@dataclass
class Upstream:
    """A real HTTP upstream: `modes[key] = "ok" | "bare401" | ...`, `forbidden_models` get 403,
    `missing[(key or "*", model)] = (status, body)` answers that model on that key (every key)."""

    modes: dict[str, str] = field(default_factory=dict)
    forbidden_models: set[str] = field(default_factory=set)
    missing: dict[tuple[str, str], tuple[int, dict]] = field(default_factory=dict)
    log: list[tuple[str, str, int]] = field(default_factory=list)  # (key, model, status)
    url: str = ""

    async def handle(self, request: web.Request) -> web.Response:
        auth = request.headers.get("Authorization", "")
        key = KEY_OF.get(auth.removeprefix("Bearer "), "?")
        body = await request.json()
        model = body.get("model", "")
        status, answer = 200, {"choices": [{"message": {"content": "hi"}}], "usage": {"total_tokens": 3}}
        if key == "?":
            status, answer = BODIES["invalid_api_key"]
        elif self.modes.get(key, "ok") != "ok":
            status, answer = BODIES[self.modes[key]]
        elif model in self.forbidden_models:
            status, answer = FORBIDDEN
        elif (key, model) in self.missing or ("*", model) in self.missing:
            status, answer = self.missing.get((key, model)) or self.missing[("*", model)]
        self.log.append((key, model, status))
        return web.json_response(answer, status=status)

    def calls(self, *, key: str | None = None, model: str | None = None) -> int:
        return sum(1 for k, m, _ in self.log if (key is None or k == key) and (model is None or m == model))


@pytest.fixture
async def http_upstream():
    upstream = Upstream()
    app = web.Application()
    app.router.add_post("/v1/chat/completions", upstream.handle)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]
    upstream.url = f"http://127.0.0.1:{port}"
    try:
        yield upstream
    finally:
        await runner.cleanup()


class KeyKit(FleetKit):
    """FleetKit whose next spawned process lacks the secrets named in `drop`."""

    drop: tuple[str, ...] = ()

    def env(self) -> dict[str, str]:
        env = super().env()
        for key_id in self.drop:
            env.pop(f"RF_TEST_{key_id.upper()}", None)
        return env


def kit_for(tmp_path, nats_url, upstream, keys: int = 2, **dispatcher) -> KeyKit:
    keys = [{"id": f"k{i}", "rps": 200, "burst": 20} for i in range(1, keys + 1)]
    return KeyKit(tmp_path, nats_url, upstream.url, keys=keys,
                  overrides={"dispatcher": {"key_probe_s": 2.0, "key_probe_max_s": 4.0, **dispatcher}})


def job(i: int, model: str = "m", **extra) -> dict:
    payload = chat_job(i, **extra)
    payload["request"]["json"]["model"] = model
    return payload


async def key_view(client, key_id: str) -> dict:
    return (await client.status())["keys"][key_id]


async def test_a_request_refused_on_two_keys_fails_alone_and_the_keys_stay(tmp_path, nats_server, http_upstream):
    http_upstream.forbidden_models.add("gpt-secret")
    kit = kit_for(tmp_path, nats_server.url, http_upstream)
    kit.dispatcher("d1"), kit.worker("w1")
    try:
        async with await Client.connect(nats_server.url) as client, Tracker(nats_server.url) as tracker:
            await wait_workers(client, {"w1"})
            await client.submit(job(0, model="gpt-secret", id="bad"), "normal", batch="b")
            bad_counts = await tracker.wait_stored("b", ["bad"], timeout=30)
            assert "bad" in bad_counts
            ids = await client.submit_many([job(i, id=f"good{i}") for i in range(10)], "normal", batch="b")
            await tracker.wait_stored("b", ids, timeout=30)
            results = await tracker.results(["bad", *ids], "b")
            status = await client.status()
    finally:
        kit.stop()
    bad = results["bad"]
    assert bad.status == "failed" and bad.error.code == "request_denied", bad
    assert bad.response.status == 403 and bad.response.json_body["error"]["type"] == "permission_error"
    assert bad.attempts == 2
    assert {k for k, m, _ in http_upstream.log if m == "gpt-secret"} == {"k1", "k2"}
    assert http_upstream.calls(model="gpt-secret") == 2
    assert all(results[i].status == "succeeded" for i in ids), [results[i].error for i in ids]
    assert not status["keys"]["k1"]["disabled"] and not status["keys"]["k2"]["disabled"]


async def test_a_key_without_the_model_passes_its_jobs_on_and_serves_its_other_models(tmp_path, nats_server,
                                                                                       http_upstream):
    """k1 of three answers 404 model_not_found (an OpenAI project key restricted to some models):
    before, a third of every batch failed after one call on k1. Now each such job goes on to another
    key; k1 is not disabled (it lacks one model only) and keeps serving the others."""
    http_upstream.missing[("k1", "gpt-4o")] = MODEL_NOT_FOUND
    kit = kit_for(tmp_path, nats_server.url, http_upstream, keys=3, key_probe_s=600.0, key_probe_max_s=600.0)
    kit.dispatcher("d1"), kit.worker("w1")
    try:
        async with await Client.connect(nats_server.url) as client, Tracker(nats_server.url) as tracker:
            await wait_workers(client, {"w1"})
            ids = await client.submit_many([job(i, model="gpt-4o") for i in range(60)], "normal", batch="m1")
            await tracker.wait_stored("m1", ids, timeout=40)
            first = await tracker.results(ids, "m1")
            k1_calls = http_upstream.calls(key="k1")
            later = await client.submit_many([job(i, model="gpt-4o-mini") for i in range(30)], "normal", batch="m2")
            await tracker.wait_stored("m2", later, timeout=40)
            second = await tracker.results(later, "m2")
            k1 = await key_view(client, "k1")
    finally:
        kit.stop()
    failed = {j: (r.status, r.error) for j, r in first.items() if r.status != "succeeded"}
    assert len(first) == 60 and failed == {}
    assert all(r.status == "succeeded" and r.key_id in ("k2", "k3") for r in first.values())
    assert 1 <= k1_calls <= 60  # at most one call per job before it goes on
    assert not k1["disabled"], k1
    assert all(r.status == "succeeded" for r in second.values()) and "k1" in {r.key_id for r in second.values()}


async def test_a_model_no_key_has_ends_after_two_calls_and_a_wrong_path_after_one(tmp_path, nats_server,
                                                                                http_upstream):
    http_upstream.missing[("*", "gpt-nope")] = DEPLOYMENT_NOT_FOUND
    kit = kit_for(tmp_path, nats_server.url, http_upstream, keys=3)
    kit.dispatcher("d1"), kit.worker("w1")
    try:
        async with await Client.connect(nats_server.url) as client, Tracker(nats_server.url) as tracker:
            await wait_workers(client, {"w1"})
            await client.submit(job(0, model="gpt-nope", id="nope"), "normal", batch="b")
            wrong = job(1, id="path")
            wrong["request"]["path"] = "/v1/chat/complete"
            await client.submit(wrong, "normal", batch="b")
            await tracker.wait_stored("b", ["nope", "path"], timeout=30)
            ids = await client.submit_many([job(i, id=f"good{i}") for i in range(9)], "normal", batch="b")
            await tracker.wait_stored("b", ids, timeout=30)
            results = await tracker.results(["nope", "path", *ids], "b")
            status = await client.status()
    finally:
        kit.stop()
    nope, path = results["nope"], results["path"]
    assert nope.status == "failed" and nope.error.code == "request_denied", nope.error
    assert "HTTP 404 (DeploymentNotFound)" in nope.error.message
    assert nope.response.json_body["error"]["code"] == "DeploymentNotFound"
    assert nope.attempts == 2 and http_upstream.calls(model="gpt-nope") == 2
    assert len({k for k, m, _ in http_upstream.log if m == "gpt-nope"}) == 2
    assert path.status == "failed" and path.error.code == "upstream_error" and path.attempts == 1  # as before
    assert path.response.status == 404
    assert all(results[i].status == "succeeded" for i in ids)
    assert not any(status["keys"][k]["disabled"] for k in ("k1", "k2", "k3"))


async def test_a_key_answering_401_on_different_jobs_goes_out_and_the_jobs_succeed(tmp_path, nats_server,
                                                                                  http_upstream):
    http_upstream.modes["k1"] = "bare401"  # no provider code: only evidence across jobs disables it
    kit = kit_for(tmp_path, nats_server.url, http_upstream, key_probe_s=600.0, key_probe_max_s=600.0)
    kit.dispatcher("d1"), kit.worker("w1")
    try:
        async with await Client.connect(nats_server.url) as client, Tracker(nats_server.url) as tracker:
            await wait_workers(client, {"w1"})
            ids = await client.submit_many([job(i) for i in range(30)], "normal", batch="b401")
            await tracker.wait_stored("b401", ids, timeout=40)
            results = await tracker.results(ids, "b401")
            k1 = await key_view(client, "k1")
    finally:
        kit.stop()
    assert len(results) == 30 and all(r.status == "succeeded" and r.key_id == "k2" for r in results.values())
    assert k1["disabled"] and k1["disabled_by"] == "provider"
    assert "401 on 2 different jobs" in k1["disabled_reason"] and k1["probe_in_s"] > 0
    assert 2 <= http_upstream.calls(key="k1") < 30
    assert kit.logs().count("KEY DISABLED") == 1


async def test_out_of_credit_takes_the_key_out_and_a_probe_brings_it_back(tmp_path, nats_server, http_upstream):
    http_upstream.modes["k1"] = "insufficient_quota"  # a 429 that no cooldown cures
    kit = kit_for(tmp_path, nats_server.url, http_upstream)
    kit.dispatcher("d1"), kit.worker("w1")
    try:
        async with await Client.connect(nats_server.url) as client, Tracker(nats_server.url) as tracker:
            await wait_workers(client, {"w1"})
            ids = await client.submit_many([job(i) for i in range(20)], "normal", batch="quota")
            await tracker.wait_stored("quota", ids, timeout=30)
            first = await tracker.results(ids, "quota")
            k1 = await key_view(client, "k1")
            calls_while_out = http_upstream.calls(key="k1")
            assert k1["disabled"] and k1["disabled_reason"] == "insufficient_quota (HTTP 429)", k1
            http_upstream.modes["k1"] = "ok"  # credit topped up
            later: list[str] = []
            for round_ in range(40):  # a job every 0.25 s until the probe has brought k1 back
                later += await client.submit_many([job(1000 + round_)], "normal", batch="later")
                await asyncio.sleep(0.25)
                if not (await key_view(client, "k1"))["disabled"]:
                    break
            more = await client.submit_many([job(2000 + i) for i in range(20)], "normal", batch="later")
            await tracker.wait_stored("later", [*later, *more], timeout=30)
            second = await tracker.results([*later, *more], "later")
            k1_after = await key_view(client, "k1")
    finally:
        kit.stop()
    assert all(r.status == "succeeded" and r.key_id == "k2" for r in first.values())
    assert calls_while_out <= 16  # the calls in flight when the first answer came back (16 slots), no retries
    assert k1_after["state"] == "enabled", k1_after
    assert all(r.status == "succeeded" for r in second.values())
    assert any(r.key_id == "k1" for r in second.values())  # back in rotation
    assert "key enabled again" in kit.logs()


async def test_operator_disable_and_enable_through_the_cli_survive_a_leader_failover(tmp_path, nats_server,
                                                                                    http_upstream):
    kit = kit_for(tmp_path, nats_server.url, http_upstream, key_probe_s=1.0, key_probe_max_s=1.0)
    d1, _ = kit.dispatcher("d1"), kit.worker("w1")
    try:
        async with await Client.connect(nats_server.url) as client, Tracker(nats_server.url) as tracker:
            await wait_workers(client, {"w1"})
            done = cli("keys", "disable", "k1", "--reason", "leaked in a CI log", "--nats", nats_server.url)
            assert done.returncode == 0, done.stderr
            assert "k1: disabled (leaked in a CI log)" in done.stdout
            kit.dispatcher("d2")
            await asyncio.sleep(2.0)  # longer than key_probe_s: an operator's decision is never probed
            d1.send_signal(signal.SIGKILL)
            status = await until(_led_by("d2", client), 30, 0.2, "d2 leading")
            assert status["keys"]["k1"]["disabled_by"] == "operator"
            assert status["keys"]["k1"]["disabled_reason"] == "leaked in a CI log"
            await wait_workers(client, {"w1"})
            ids = await client.submit_many([job(i) for i in range(15)], "normal", batch="op")
            await tracker.wait_stored("op", ids, timeout=30)
            while_out = await tracker.results(ids, "op")
            calls_k1 = http_upstream.calls(key="k1")
            unknown = cli("keys", "enable", "k9", "--nats", nats_server.url)
            done = cli("keys", "enable", "k1", "--nats", nats_server.url)
            assert done.returncode == 0 and "k1: enabled" in done.stdout, done.stderr
            back = await client.submit_many([job(100 + i) for i in range(20)], "normal", batch="op2")
            await tracker.wait_stored("op2", back, timeout=30)
            after = await tracker.results(back, "op2")
    finally:
        kit.stop()
    assert all(r.status == "succeeded" and r.key_id == "k2" for r in while_out.values())
    assert calls_k1 == 0
    assert unknown.returncode == 1 and "unknown key 'k9'" in unknown.stderr
    assert all(r.status == "succeeded" for r in after.values())
    assert Counter(r.key_id for r in after.values())["k1"] > 0


def _led_by(name: str, client):
    async def check():
        status = await client.status(timeout=1.0)
        return status if status.get("leader") == name and "keys" in status else None
    return check


async def test_a_secret_missing_on_a_worker_sends_its_key_to_workers_that_have_it(tmp_path, nats_server,
                                                                                  http_upstream):
    kit = kit_for(tmp_path, nats_server.url, http_upstream)
    kit.dispatcher("d1")
    kit.drop = ("k1",)
    kit.worker("w1")  # no RF_TEST_K1
    kit.drop = ()
    w2 = kit.worker("w2")
    try:
        async with await Client.connect(nats_server.url) as client, Tracker(nats_server.url) as tracker:
            await wait_workers(client, {"w1", "w2"})
            ids = await client.submit_many([job(i) for i in range(40)], "normal", batch="mixed")
            await tracker.wait_stored("mixed", ids, timeout=30)
            mixed = await tracker.results(ids, "mixed")
            w2.send_signal(signal.SIGTERM)
            k1 = await until(_secret_missing("k1", client), 20, 0.2, "k1 without a worker holding its secret")
            alone = await client.submit_many([job(100 + i) for i in range(10)], "normal", batch="alone")
            await tracker.wait_stored("alone", alone, timeout=30)
            only_w1 = await tracker.results(alone, "alone")
    finally:
        kit.stop()
    assert all(r.status == "succeeded" and r.attempts == 1 for r in mixed.values())
    assert all(r.worker == "w2" for r in mixed.values() if r.key_id == "k1")
    assert "job handed back" not in kit.logs()  # k1's jobs were never sent to w1 in the first place
    assert k1["disabled_by"] == "secret" and k1["disabled_reason"] == "no worker has its secret (RF_TEST_K1 not set)"
    assert all(r.status == "succeeded" and r.attempts == 1 and r.key_id == "k2" for r in only_w1.values())
    assert SECRETS["k1"] not in kit.logs()


def _secret_missing(key_id: str, client):
    async def check():
        view = (await client.status(timeout=1.0))["keys"][key_id]
        return view if view.get("disabled_by") == "secret" else None
    return check


async def test_a_job_no_key_can_run_says_why_in_its_result_and_dead_letter(tmp_path, nats_server, http_upstream):
    kit = kit_for(tmp_path, nats_server.url, http_upstream)
    kit.drop = ("k1", "k2")
    kit.dispatcher("d1"), kit.worker("w1")
    try:
        async with await Client.connect(nats_server.url) as client, Tracker(nats_server.url) as tracker:
            await wait_workers(client, {"w1"})
            await client.submit(job(0, id="stuck"), "normal", batch="none")
            await tracker.wait_stored("none", ["stuck"], timeout=30)
            result = await tracker.result("stuck", "none")
            await tracker.letters_of(["stuck"])  # written after the Result
            letters = [x for x in await tracker.dead_letters("normal") if x.get("job_id") == "stuck"]
    finally:
        kit.stop()
    assert result.status == "failed" and result.error.code == "no_key_available"
    assert "RF_TEST_K1 not set" in result.error.message and "RF_TEST_K2 not set" in result.error.message
    assert "stopped mid-call" not in result.error.message
    assert http_upstream.calls() == 0
    assert len(letters) == 1 and letters[0]["last_error"] and "RF_TEST_K1 not set" in letters[0]["last_error"]["message"]


def test_up_refuses_to_start_when_no_key_has_a_usable_secret(tmp_path):
    config = tmp_path / "ratefleet.toml"
    config.write_text('[upstreams.u]\nbase_url = "http://127.0.0.1:9"\n[pools.p]\n'
                      'keys = [{ id = "k1", secret = "env:RF_UNSET_KEY_1", rps = 1 },'
                      ' { id = "k2", secret = "file:/nonexistent/rf-k2", rps = 1 }]\n'
                      f'[nats]\nurl = "nats://127.0.0.1:9"\nembedded_dir = "{tmp_path / "nats"}"\n')
    assert "RF_UNSET_KEY_1" not in os.environ
    done = cli("up", "--config", str(config), timeout=30)
    assert done.returncode == 2
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "RF_UNSET_KEY_1 not set" in lines[0] and "/nonexistent/rf-k2" in lines[0], done.stderr
    assert not (tmp_path / "nats").exists()  # nothing was started


@pytest.mark.parametrize("follower", ["submit --wait", "results --wait"])
async def test_submit_wait_says_which_keys_went_out_of_use(tmp_path, nats_server, http_upstream, follower):
    """A nightly-batch trial: a key disabled mid-batch showed only in `ratefleet status`; `submit
    --wait` just went slower, or stopped with every key out. It now prints each key going out of
    use (its reason and what to do) and a pool with no key left (a key back in use: the unit tests,
    as this batch ends as soon as the probe succeeds). `results --wait`, following a batch sent
    by an earlier `submit`, says the same."""
    http_upstream.modes.update(k1="invalid_api_key", k2="invalid_api_key")
    kit = kit_for(tmp_path, nats_server.url, http_upstream, key_probe_s=6.0, key_probe_max_s=6.0)
    kit.dispatcher("d1"), kit.worker("w1")
    jobs = tmp_path / "jobs.jsonl"
    jobs.write_text("".join(json.dumps(job(i)) + "\n" for i in range(10)))
    env = {**os.environ, "RATEFLEET_LOG_FORMAT": "json"}
    env.pop("RATEFLEET_NATS_URL", None)
    lines: list[str] = []
    try:
        async with await Client.connect(nats_server.url) as client:
            await wait_workers(client, {"w1"})
            send = ("submit", str(jobs), "--tier", "normal", "--batch", "kw", "--nats", nats_server.url)
            if follower == "submit --wait":
                command = (*send, "--wait")
            else:  # the batch sent first (its jobs queued behind the failing keys), then followed
                sent = await asyncio.create_subprocess_exec(sys.executable, "-m", "ratefleet", *send, env=env,
                                                            stdout=asyncio.subprocess.PIPE,
                                                            stderr=asyncio.subprocess.STDOUT)
                out, _ = await asyncio.wait_for(sent.communicate(), 60)
                assert sent.returncode == 0, out.decode()
                command = ("results", "--batch", "kw", "--wait", "--out", str(tmp_path / "out.jsonl"),
                           "--nats", nats_server.url)
            submit = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "ratefleet", *command, stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.STDOUT, env=env)
            try:
                async def read_until(text: str) -> None:
                    while not any(text in line for line in lines):
                        line = await submit.stdout.readline()
                        assert line, f"submit ended before saying {text!r}: {lines}"
                        lines.append(line.decode())
                await asyncio.wait_for(read_until("no key of pool"), 60)
                http_upstream.modes.clear()  # the keys are fixed: the next probe brings them back
                rest, _ = await asyncio.wait_for(submit.communicate(), 60)
                lines.extend(rest.decode().splitlines(keepends=True))
            finally:
                if submit.returncode is None:
                    submit.kill()
    finally:
        kit.stop()
    said = "".join(lines)
    assert submit.returncode == 0, said
    for key_id in ("k1", "k2"):
        assert f"key {key_id} (pool " in said and "is out of use: DISABLED by provider evidence: " in said, said
    assert "`ratefleet keys enable KEY`" in said
    assert said.count("no key of pool") == 1, said
    assert "succeeded 10" in said or "10 succeeded" in said, said  # (`results`: "10 of 10 results (succeeded 10)")
