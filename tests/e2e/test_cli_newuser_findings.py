"""A new user's first session with the real `ratefleet` command, a real nats-server and (where a
job must run) a real fleet with the mock upstream: resume hints, closed pipes, dlq replays in
`results`, `request` errors, key enable, and the small things around them."""

from __future__ import annotations

import json
import os
import re
import shlex
import signal
import subprocess
import sys
import time

import anyio
import pytest
from fleetkit import FleetKit, chat_job, mock_keys, wait_for_leader

from ratefleet import Client
from ratefleet.batches import BatchRecord, save_record
from ratefleet.batchfile import line_job_id
from ratefleet.mock import MockSettings, running_mock
from ratefleet.runtime.store import store_result
from ratefleet.runtime.streams import ensure_topology
from ratefleet.schemas import Result
from ratefleet.schemas.config import parse_config

pytestmark = [pytest.mark.timeout(240)]


def cli(*args: str, timeout: float = 90, **kw) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "ratefleet", *args], capture_output=True, text=True,
                          timeout=timeout, **kw)


def write_jobs(path, jobs) -> None:
    path.write_text("".join(json.dumps(job) + "\n" for job in jobs))


def wait_until(predicate, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.1)
    raise AssertionError(f"not within {timeout}s: {what}")


async def _streams(url: str) -> None:
    async with await Client.connect(url) as client:  # streams, but no fleet: nothing runs
        await ensure_topology(client.js, parse_config({}))


async def _stored_jobs(url: str) -> int:
    """How many messages RATEFLEET_JOBS holds now."""
    async with await Client.connect(url) as client:
        return (await client.js.stream_info("RATEFLEET_JOBS")).state.messages


async def _failed_and_lettered(client: Client, job_id: str, error: dict, attempts: int, n: int) -> None:
    """Job `job_id` of batch night (chat_job `n`) stored failed with `error`, and its dead letter."""
    await store_result(client.js, client.subjects, Result(job_id=job_id, status="failed", batch="night",
                                                          error=error, attempts=attempts))
    await client.js.publish(client.subjects.dead("normal"), json.dumps(
        {"job_id": job_id, "tier": "normal", "attempts": attempts, "reason": error,
         "job": chat_job(n, id=job_id, batch="night")}).encode())


async def _queued_job_ids(url: str) -> list[str]:
    """The ids of the jobs RATEFLEET_JOBS holds now (read by stream sequence, nothing consumed)."""
    async with await Client.connect(url) as client:
        state = (await client.js.stream_info("RATEFLEET_JOBS")).state
        ids = []
        for seq in range(state.first_seq, state.last_seq + 1):
            msg = await client.js.get_msg("RATEFLEET_JOBS", seq)
            ids.append(json.loads(msg.data)["id"])
        return ids


async def _store_replayed_batch(url: str, batch: str, lines: int) -> list[str]:
    """A batch of `lines` lines whose every line failed, then was replayed and succeeded (line 2
    was replayed twice: the first replay failed too). Returns the original ids in line order."""
    async with await Client.connect(url) as client:
        await ensure_topology(client.js, parse_config({}))
        ids = [line_job_id(batch, n, f"line {n}") for n in range(1, lines + 1)]
        for n, job_id in enumerate(ids, 1):
            await store_result(client.js, client.subjects, Result(job_id=job_id, status="failed", batch=batch,
                                                                  metadata={"row": n}))
        r2 = f"{ids[1]}-rdeadbeef"
        await store_result(client.js, client.subjects, Result(job_id=r2, status="failed", batch=batch,
                                                              metadata={"row": 2, "replay_of": ids[1]}))
        for n, job_id in reversed(list(enumerate(ids, 1))):  # replays come back in another order
            of = r2 if n == 2 else job_id
            await store_result(client.js, client.subjects,
                               Result(job_id=f"{of}-r{n:08x}", status="succeeded", batch=batch,
                                      metadata={"row": n, "replay_of": of}))
        await save_record(client.js, client.subjects,
                          BatchRecord(batch=batch, tier="normal", state="submitted", jobs=lines, lines=lines))
    return ids


@pytest.mark.anyio
async def test_results_count_a_replay_once_for_its_line(tmp_path, nats_server):
    ids = await _store_replayed_batch(nats_server.url, "rb", 5)
    done = cli("results", "--batch", "rb", "--wait", "--order", "input", "--nats", nats_server.url, timeout=60)
    assert done.returncode == 0, done.stderr
    assert "batch rb: 5 of 5 results (succeeded 5)" in done.stderr
    rows = [json.loads(line) for line in done.stdout.splitlines()]
    assert [r["metadata"]["row"] for r in rows] == [1, 2, 3, 4, 5]
    assert all(r["status"] == "succeeded" and r["metadata"]["replay_of"] for r in rows)
    assert rows[1]["job_id"].startswith(ids[1] + "-rdeadbeef-r")  # the latest replay of line 2
    assert "5 Results were replaced by a later `dlq replay`" in done.stderr

    dash = cli("results", "--batch", "rb", "--out", "-", "--nats", nats_server.url)  # `--out -` is stdout
    assert dash.returncode == 0 and len(dash.stdout.splitlines()) == 5, dash.stderr
    assert not (tmp_path / "-").exists()


@pytest.mark.anyio
async def test_results_of_a_batch_made_of_other_batches_ids_says_where_they_are(nats_server):
    async with await Client.connect(nats_server.url) as client:
        await ensure_topology(client.js, parse_config({}))
        await save_record(client.js, client.subjects,
                          BatchRecord(batch="b1", tier="normal", state="submitted", jobs=0, lines=4))
    done = cli("results", "--batch", "b1", "--nats", nats_server.url)
    assert "none of the 4 lines of batch b1" in done.stderr and "ratefleet result ID" in done.stderr, done.stderr


@pytest.mark.anyio
async def test_closed_pipe_ends_quietly(nats_server):
    await _store_replayed_batch(nats_server.url, "pipe", 3)
    read_end, write_end = os.pipe()
    os.close(read_end)  # like `| head -1` that has already gone
    try:
        done = subprocess.run([sys.executable, "-m", "ratefleet", "results", "--batch", "pipe", "--nats",
                               nats_server.url], stdout=write_end, stderr=subprocess.PIPE, text=True, timeout=60)
    finally:
        os.close(write_end)
    assert done.returncode == 141, done.stderr
    assert "error" not in done.stderr and "ExceptionGroup" not in done.stderr and "Traceback" not in done.stderr


@pytest.mark.anyio
async def test_request_errors_match_submit_and_name_the_result_command(tmp_path, nats_server):
    await _streams(nats_server.url)
    job = json.dumps(chat_job(1, id="req-1"))
    tier = cli("request", job, "--tier", "nosuchtier", "--nats", nats_server.url)
    assert tier.returncode == 2 and "unknown tier 'nosuchtier'; this fleet's tiers: " in tier.stderr, tier.stderr
    write_jobs(tmp_path / "j.jsonl", [chat_job(1)])
    sub = cli("submit", str(tmp_path / "j.jsonl"), "--tier", "nosuchtier", "--nats", nats_server.url)
    assert sub.returncode == 2 and "unknown tier 'nosuchtier'; this fleet's tiers: " in sub.stderr

    bad = cli("request", json.dumps({"request": {"path": "/v1/x"}, "tier_hint": 1, "max_attempts": -3}),
              "--tier", "normal", "--nats", nats_server.url)
    assert bad.returncode == 2 and "invalid job" in bad.stderr, bad.stderr

    late = cli("request", job, "--tier", "normal", "--timeout", "1", "--nats", nats_server.url)
    assert late.returncode == 1 and "`ratefleet result req-1`" in late.stderr, late.stderr

    waiting = subprocess.Popen([sys.executable, "-m", "ratefleet", "request", json.dumps(chat_job(2, id="req-2")),
                                "--tier", "normal", "--timeout", "60", "--nats", nats_server.url],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    # interrupt only once it is connected and waiting: its job is stored (nothing runs it);
    # a fixed sleep interrupted the import itself on a loaded machine
    for _ in range(600):
        if await _stored_jobs(nats_server.url) >= 2:
            break
        await anyio.sleep(0.1)
    else:
        raise AssertionError("the waiting request's job was not stored within 60 s")
    waiting.send_signal(signal.SIGINT)
    _, err = waiting.communicate(timeout=30)
    assert waiting.returncode == 130 and "`ratefleet result req-2`" in err, err


@pytest.mark.anyio
async def test_submit_small_things(tmp_path, nats_server):
    await _streams(nats_server.url)
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    done = cli("submit", str(empty), "--tier", "normal", "--nats", nats_server.url)
    assert done.returncode == 2 and "1/1 bytes" not in done.stderr and "no jobs to submit" in done.stderr
    latin = tmp_path / "latin1.jsonl"
    latin.write_bytes(json.dumps(chat_job(1, metadata={"name": "X"})).replace("X", "\xe9").encode("latin-1") + b"\n")
    done = cli("submit", str(latin), "--tier", "normal", "--nats", nats_server.url)
    assert done.returncode == 2 and "line 1: not UTF-8 (byte 0xe9" in done.stderr, done.stderr
    assert "not valid JSON" not in done.stderr


@pytest.fixture
def fleet(tmp_path, nats_server):
    """A fleet whose upstream answers each call after 250 ms; 4 slots: about 16 calls a second."""
    settings = MockSettings(keys=mock_keys(rps=1000, burst=100), accept_unknown=False, latency_ms=250)
    with running_mock(settings) as upstream:
        kit = FleetKit(tmp_path, nats_server.url, upstream.url,
                       keys=[{"id": "k1", "rps": 500, "burst": 50}, {"id": "k2", "rps": 500, "burst": 50}])
        kit.dispatcher("d1"), kit.worker("w1", slots=4)
        try:
            yield kit, upstream
        finally:
            kit.stop()


@pytest.mark.anyio
async def test_ctrl_c_without_batch_prints_the_resume_command(tmp_path, nats_server, fleet):
    kit, upstream = fleet
    async with await Client.connect(nats_server.url) as client:
        await wait_for_leader(client)
    jobs, out = tmp_path / "jobs.jsonl", tmp_path / "r1.jsonl"
    write_jobs(jobs, [chat_job(i) for i in range(60)])
    command = ["submit", str(jobs), "--tier", "normal", "--wait", "--out", str(out), "--nats", nats_server.url]
    first = subprocess.Popen([sys.executable, "-m", "ratefleet", *command], stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True)
    wait_until(lambda: upstream.stats()["requests"] >= 10, 60, "10 upstream calls")
    first.send_signal(signal.SIGINT)
    _, err = first.communicate(timeout=30)
    assert first.returncode == 130, err
    name = re.match(r"batch (submit-\S+); re-run with --batch (\S+) to resume$", err.splitlines()[0])
    assert name and name[1] == name[2], err
    rerun = re.search(r"or re-run \(stored lines are not sent again\): ratefleet (submit .*)$", err, re.M)
    assert rerun and f"--batch {name[1]}" in rerun[1], err
    assert f"ratefleet results --batch {name[1]}" in err

    again = cli(*shlex.split(rerun[1]))  # the printed command, as printed
    assert again.returncode == 0, again.stderr
    assert re.search(rf"stored 60 jobs in tier 'normal', batch {name[1]}: 0 new", again.stderr), again.stderr
    assert upstream.stats()["requests"] == 60
    piped = _run_into_closed_pipe("submit", str(jobs), "--tier", "normal", "--batch", name[1], "--wait", "--out", "-",
                                  "--nats", nats_server.url)
    assert piped.returncode == 141 and "error" not in piped.stderr, piped.stderr

    skipping = tmp_path / "skip.jsonl"
    skipping.write_text(json.dumps(chat_job(100)) + "\n{not json\n")
    skipped = cli("submit", str(skipping), "--tier", "normal", "--skip-invalid", "--wait", "--nats", nats_server.url)
    assert skipped.returncode == 1, skipped.stderr
    assert "1 invalid lines were skipped" in skipped.stderr and "not written anywhere (no --out)" in skipped.stderr


@pytest.mark.anyio
async def test_keys_enable_says_why_a_key_stays_out_and_disable_again_keeps_the_reason(nats_server):
    import anyio
    import nats

    seen: list[dict] = []
    nc = await nats.connect(nats_server.url)

    async def leader(msg) -> None:  # a stand-in leader on the real admin subjects
        request = json.loads(msg.data)
        seen.append(request)
        state = ({"state": "disabled", "disabled_by": "secret", "secret_missing": "LOCAL_KEY_2 not set"}
                 if request["action"] == "enable" else
                 {"state": "disabled", "disabled_by": "operator", "disabled_reason": request["reason"]})
        await msg.respond(json.dumps({"ok": True, "key": request["key"], "changed": False, "state": state}).encode())

    async def status(msg) -> None:
        keys = {"k2": {"disabled": True, "disabled_by": "operator", "disabled_reason": "rotating the secret"}}
        await msg.respond(json.dumps({"keys": keys}).encode())

    await nc.subscribe("ratefleet.admin.keys", cb=leader)
    await nc.subscribe("ratefleet.admin.status", cb=status)
    await nc.flush()
    try:
        enable = await anyio.to_thread.run_sync(lambda: cli("keys", "enable", "k2", "--nats", nats_server.url))
        assert enable.returncode == 1, enable.stdout + enable.stderr
        assert "key k2 stays out of rotation: no worker has its secret (LOCAL_KEY_2 not set)" in enable.stderr
        assert "(no change)" not in enable.stdout
        again = await anyio.to_thread.run_sync(lambda: cli("keys", "disable", "k2", "--nats", nats_server.url))
        assert again.returncode == 0 and "disabled (rotating the secret)" in again.stdout, again.stderr
        assert seen[-1] == {"action": "disable", "key": "k2", "reason": "rotating the secret"}
    finally:
        await nc.close()


def _run_into_closed_pipe(*args: str) -> subprocess.CompletedProcess:
    read_end, write_end = os.pipe()
    os.close(read_end)  # the reader (`| head -1`) has gone
    try:
        return subprocess.run([sys.executable, "-m", "ratefleet", *args], stdout=write_end, stderr=subprocess.PIPE,
                              text=True, timeout=90)
    finally:
        os.close(write_end)


@pytest.mark.anyio
async def test_config_show_into_a_closed_pipe_exits_141_like_the_other_commands(nats_server, tmp_path):
    # typer turns an EPIPE into exit 1 (and rich's console does the same): `config show | head -1`
    # and `status | head -1` exited 1 with no message, unlike `results | head -1` (a break-it trial)
    config = tmp_path / "fleet.toml"
    config.write_text(f'[nats]\nurl = "{nats_server.url}"\n[upstreams.u]\nbase_url = "http://127.0.0.1:9"\n'
                      '[pools.p]\nkeys = [{id = "k1", rps = 1, secret = "env:UNUSED_K1"}]\n')
    async with await Client.connect(nats_server.url) as client:
        await ensure_topology(client.js, parse_config({}))
    assert cli("config", "push", str(config)).returncode == 0
    piped = _run_into_closed_pipe("config", "show", "--config", str(config))
    assert piped.returncode == 141 and "error" not in piped.stderr, piped.stderr



@pytest.mark.anyio
async def test_jobs_the_fleet_gave_up_on_are_named_with_the_replay_of_their_batch_alone(tmp_path, nats_server):
    """A nightly batch ending with 58 `attempts_exhausted` among 30,000 Results said only how to
    read each `error` with jq; `dlq replay` could replay one id or a whole tier (every batch's
    letters in it, other nights' included). `results` now counts the jobs the fleet gave up on
    and prints `ratefleet dlq replay --batch B`, and `dlq list|replay --batch B` take only that
    batch's letters."""
    async with await Client.connect(nats_server.url) as client:
        await ensure_topology(client.js, parse_config({}))
        for batch, n in (("night", 1), ("night", 2), ("other", 1)):
            job_id = line_job_id(batch, n, f"line {n}")
            error = {"code": "attempts_exhausted", "message": "gave up after 5 attempts; last: HTTP 503"}
            await store_result(client.js, client.subjects, Result(job_id=job_id, status="failed", batch=batch,
                                                                  error=error, attempts=5))
            letter = {"job_id": job_id, "tier": "normal", "attempts": 5, "reason": error,
                      "job": chat_job(n, id=job_id, batch=batch)}
            await client.js.publish(client.subjects.dead("normal"), json.dumps(letter).encode())
        await store_result(client.js, client.subjects, Result(job_id=line_job_id("night", 3, "x"), status="succeeded",
                                                              batch="night"))
        # a paid call whose answer NATS refused: lettered too, but not one the fleet gave up on, and
        # `dlq replay --batch night` alone would have paid for it again beside the two counted
        stored_not = line_job_id("night", 4, "y")
        error = {"code": "result_not_stored", "message": "NATS refused the answer"}
        await _failed_and_lettered(client, stored_not, error, 1, 4)
        await save_record(client.js, client.subjects,
                          BatchRecord(batch="night", tier="normal", state="submitted", jobs=4, lines=4))
    url = ["--nats", nats_server.url]
    done = cli("results", "--batch", "night", "--out", str(tmp_path / "out.jsonl"), *url)
    assert done.returncode == 1, done.stderr
    replay = f"ratefleet dlq replay --batch night --given-up --nats {nats_server.url}"
    assert (f"2 jobs of batch night the fleet gave up on (attempts_exhausted, no_key_available, poison_message, "
            f"rate_limited; not the request's fault); run them again with: {replay}") in done.stderr, done.stderr
    listed = cli("dlq", "list", "--batch", "night", "--given-up", "--json", *url)
    assert sorted(json.loads(x)["job"]["batch"] for x in listed.stdout.splitlines()) == ["night", "night"], listed
    listed = cli("dlq", "list", "--code", "result_not_stored", "--json", *url)
    assert [json.loads(x)["job_id"] for x in listed.stdout.splitlines()] == [stored_not], listed
    wrong = cli("dlq", "list", "--code", "attempts_exausted", *url)
    assert wrong.returncode == 2 and "is not a reason code ratefleet writes" in wrong.stderr, wrong.stderr
    # the code of a letter whose Result has no error (runtime/finish.py) is one ratefleet writes
    unknown = cli("dlq", "list", "--code", "unknown", "--json", *url)
    assert unknown.returncode == 0 and unknown.stdout == "", unknown.stderr
    again = cli("dlq", "replay", *shlex.split(replay)[3:])
    assert again.returncode == 0 and "replayed 2 dead letter(s)" in again.stdout, again.stdout + again.stderr
    left = cli("dlq", "list", "--json", *url)
    assert sorted(json.loads(x)["job_id"] for x in left.stdout.splitlines()) == sorted(
        [stored_not, line_job_id("other", 1, "line 1")]), left.stdout
    assert await _stored_jobs(nats_server.url) == 2  # the two replays, queued
    none = cli("dlq", "replay", "--batch", "other", "--code", "rate_limited", *url)
    assert none.returncode == 1 and "no replayable dead letter with batch 'other' and code rate_limited" in none.stderr


@pytest.mark.anyio
async def test_a_key_command_sent_during_a_failover_reaches_the_new_leader(nats_server):
    """An operator's trial: `keys disable` right after the leader's SIGKILL exited 1 saying no
    dispatcher ran, while the standby led 3 s later. While nobody listens ("no responders") the
    command is sent again until --timeout; it reaches a leader that comes up meanwhile."""
    import nats

    nc = await nats.connect(nats_server.url)
    seen: list[dict] = []

    async def leader(msg) -> None:
        request = json.loads(msg.data)
        seen.append(request)
        state = {"state": "disabled", "disabled_by": "operator", "disabled_reason": request["reason"]}
        await msg.respond(json.dumps({"ok": True, "key": request["key"], "changed": True, "state": state}).encode())

    try:
        async with anyio.create_task_group() as tg:
            done: list[subprocess.CompletedProcess] = []

            async def run_cli() -> None:
                done.append(await anyio.to_thread.run_sync(lambda: cli(
                    "keys", "disable", "k1", "--reason", "failover", "--timeout", "8", "--nats", nats_server.url)))

            tg.start_soon(run_cli)
            await anyio.sleep(2.0)  # the new leader takes over
            await nc.subscribe("ratefleet.admin.keys", cb=leader)
            await nc.flush()
    finally:
        await nc.close()
    nobody = await anyio.to_thread.run_sync(lambda: cli("keys", "disable", "k9", "--timeout", "1", "--nats",
                                                        nats_server.url))
    assert done[0].returncode == 0, done[0].stdout + done[0].stderr
    assert seen == [{"action": "disable", "key": "k1", "reason": "failover"}]  # sent to a listener once
    assert nobody.returncode == 1 and "within 1s" in nobody.stderr and "failover" in nobody.stderr, nobody.stderr


@pytest.mark.anyio
async def test_results_wait_after_a_replay_waits_for_the_replays_results(tmp_path, nats_server):
    """A nightly-batch trial: after `dlq replay --batch B --given-up`, `results --batch B --wait`
    ended at once on the Results the replays replace ("failed 5,360") and said to replay them
    again, while the replays ran; 20 s later all had succeeded. `dlq replay` now notes its jobs
    in the batch's record, and `--wait` waits for their Results too."""
    from ratefleet.batches import replays_sent

    original = line_job_id("night", 1, "line 1")
    error = {"code": "attempts_exhausted", "message": "gave up after 5 attempts; last: HTTP 503"}
    async with await Client.connect(nats_server.url) as client:
        await ensure_topology(client.js, parse_config({}))
        await _failed_and_lettered(client, original, error, 5, 1)
        await save_record(client.js, client.subjects,
                          BatchRecord(batch="night", tier="normal", state="submitted", jobs=1, lines=1))
        url = ["--nats", nats_server.url]
        replayed = cli("dlq", "replay", "--batch", "night", "--given-up", *url)
        assert replayed.returncode == 0, replayed.stderr
        assert await replays_sent(client.js, client.subjects, "night") == 1
        # a resumed submit rewriting the record keeps the count (a reviewer: a field of the record was lost)
        await save_record(client.js, client.subjects,
                          BatchRecord(batch="night", tier="normal", state="submitted", jobs=1, lines=1))
        replay_id = (await _queued_job_ids(nats_server.url))[0]
        assert replay_id.startswith(original + "-r")
        now = cli("results", "--batch", "night", *url)  # without --wait: what is stored, and what is coming
        assert "1 job of batch night was sent again by `ratefleet dlq replay` and has no Result yet" in now.stderr
        assert "run them again with" not in now.stderr, now.stderr  # before: told to replay them again
        out = tmp_path / "out.jsonl"
        waiting = subprocess.Popen([sys.executable, "-m", "ratefleet", "results", "--batch", "night", "--wait",
                                    "--out", str(out), *url], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        try:
            await anyio.sleep(4)
            assert waiting.poll() is None, waiting.communicate()  # before: ended at once, "failed 1"
            await store_result(client.js, client.subjects, Result(
                job_id=replay_id, status="succeeded", batch="night", attempts=1,
                metadata={"replay_of": original}))
            _, err = waiting.communicate(timeout=60)
        finally:
            if waiting.poll() is None:
                waiting.kill()
    assert waiting.returncode == 0, err
    assert "batch night: 1 of 1 results (succeeded 1)" in err, err
    # the original is written when it was read before its replay came (a process still starting on a
    # loaded machine read both at once and rightly wrote the replay's alone); the count has the line once
    assert [json.loads(line)["job_id"] for line in out.read_text().splitlines()] in ([original, replay_id],
                                                                                      [replay_id])


@pytest.mark.anyio
async def test_replays_counted_at_once_all_count_and_the_record_keeps_its_old_shape(nats_server):
    """A reviewer: replay ids kept in the record were lost by two replays at once (read, then
    written) and by a resumed submit rewriting it, grew past NATS' payload limit, and the new
    field made an older ratefleet's `BatchRecord(**json)` fail on every record."""
    import asyncio

    from ratefleet.batches import note_replays, replays_sent
    from ratefleet.runtime.cancels import open_batches_bucket

    async with await Client.connect(nats_server.url) as client:
        await ensure_topology(client.js, parse_config({}))
        record = BatchRecord(batch="night", tier="normal", state="submitted", jobs=3, lines=3)
        await save_record(client.js, client.subjects, record)
        assert not await note_replays(client.js, client.subjects, "no-record", 5)
        await asyncio.gather(*(note_replays(client.js, client.subjects, "night", 1000) for _ in range(10)))
        assert await replays_sent(client.js, client.subjects, "night") == 10_000
        kv = await open_batches_bucket(client.js, client.subjects, create=False)
        stored = json.loads((await kv.get("night")).value)
        assert set(stored) == {"batch", "tier", "state", "jobs", "lines", "gaps", "updated_at"}  # as c0f8010 reads it
