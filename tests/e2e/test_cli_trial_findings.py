"""What a new user's batch trial (2026-12-02) met in the CLI, each against a real nats-server."""

from __future__ import annotations

import gzip
import json
import os
import subprocess
import sys

import anyio
import pytest

from ratefleet import Client
from ratefleet.runtime.streams import ensure_topology
from ratefleet.schemas.config import parse_config

pytestmark = [pytest.mark.timeout(120)]
JOB = {"request": {"path": "/v1/chat/completions", "json": {"model": "m", "messages": []}}}


def cli(*args: str, timeout: float = 60, **kw) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "ratefleet", *args], capture_output=True, text=True,
                          timeout=timeout, **kw)


@pytest.mark.parametrize(("pack", "what", "command"), [
    (gzip.compress, "gzip-compressed", "zcat"),
    (lambda data: b"BZh91AY&SY" + data, "bzip2-compressed", "bzcat"),
    (lambda data: b"PK\x03\x04" + data, "a zip archive", "unzip -p"),
])
def test_a_compressed_jobs_file_is_named_as_such_with_the_command_that_streams_it(tmp_path, nats_server, pack, what,
                                                                                    command):
    # it was "line 1: not UTF-8 (byte 0x8b at character 2); save the file as UTF-8"
    path = tmp_path / "jobs.jsonl.packed"
    path.write_bytes(pack((json.dumps(JOB) + "\n").encode() * 3))
    done = cli("submit", str(path), "--tier", "normal", "--batch", "nightly", "--nats", nats_server.url)
    assert done.returncode == 2, done.stderr
    assert f"error: {path} is {what}, not JSONL text" in done.stderr
    assert f"{command} {path} | ratefleet submit - --tier normal --batch nightly" in done.stderr
    dotted = cli("submit", f"./{path.name}", "--tier", "normal", "--nats", nats_server.url, cwd=tmp_path)
    assert "| ratefleet submit - --tier normal" in dotted.stderr, dotted.stderr  # (not the file again: a review)
    assert "nothing was submitted" in done.stderr and "not UTF-8" not in done.stderr
    anyio.run(_streams, nats_server.url)
    with path.open("rb") as stdin:
        piped = cli("submit", "-", "--tier", "normal", "--nats", nats_server.url, stdin=stdin)
    assert piped.returncode == 2 and f"standard input is {what}, not JSONL text" in piped.stderr, piped.stderr
    assert command in piped.stderr


async def _streams(url: str) -> None:
    async with await Client.connect(url) as client:
        await ensure_topology(client.js, parse_config({}))


async def _waiting_batch(url: str) -> None:
    """Batch `b` of three jobs with one Result stored: a wait for it waits on."""
    from ratefleet.batches import BatchRecord, save_record
    from ratefleet.runtime.store import store_result
    from ratefleet.schemas import Result
    async with await Client.connect(url) as client:
        await ensure_topology(client.js, parse_config({}))
        await save_record(client.js, client.subjects, BatchRecord(batch="b", tier="normal", state="submitted",
                                                                  jobs=3, lines=3))
        await store_result(client.js, client.subjects, Result(job_id="b-1-aaaaaaaaaa", status="succeeded", batch="b"))


@pytest.mark.parametrize("command", ["results", "submit"])
def test_a_wait_that_loses_nats_says_so_and_prints_how_to_carry_on(tmp_path, nats_server, command):
    # a trial: a restart of `ratefleet up` ended `results --wait` after 5 s with Client advice and no command
    import signal
    import time
    anyio.run(_waiting_batch, nats_server.url)
    out = tmp_path / "out.jsonl"
    if command == "results":
        args = ["results", "--batch", "b", "--wait", "--out", str(out)]
    else:
        jobs = tmp_path / "jobs.jsonl"
        jobs.write_text("".join(json.dumps({**JOB, "metadata": {"n": n}}) + "\n" for n in range(2)))
        args = ["submit", str(jobs), "--tier", "normal", "--batch", "s", "--wait", "--out", str(out)]
    proc = subprocess.Popen([sys.executable, "-m", "ratefleet", *args, "--nats", nats_server.url],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "RATEFLEET_WAIT_NATS_S": "3"})  # (default 300 s)
    time.sleep(5.0)  # (no fleet: it waits)
    assert proc.poll() is None
    nats_server.stop(signal.SIGKILL)
    _, stderr = proc.communicate(timeout=90)
    assert proc.returncode == 1, stderr
    assert "NATS is away (reconnecting" in stderr and "error: NATS has been away for 3 s while" in stderr, stderr
    assert "Client.connect" not in stderr and "in Python" not in stderr and "Traceback" not in stderr, stderr
    assert stderr.count('"event": "nats error"') <= 3, stderr  # each reconnect try's refusal once, not every 0.5 s
    if command == "results":
        assert ("while reading the Results of batch b; 2 jobs have no Result here yet (they keep running once NATS "
                "is back); carry on then with: ratefleet results --batch b --wait --out") in stderr, stderr
    else:
        assert "error: " in stderr and "while waiting for Results; what is stored stays stored" in stderr, stderr
        assert "stopped: 0 results written" in stderr and "collect them with: ratefleet results --batch s" in stderr
        assert "or re-run (stored lines are not sent again): ratefleet submit" in stderr


def test_repeated_custom_ids_are_named_by_line_and_written_to_rejects(tmp_path, nats_server):
    # a trial: "2 lines repeat the custom_id of an earlier line", no line named, --rejects not written
    anyio.run(_streams, nats_server.url)
    path = tmp_path / "batch.jsonl"
    path.write_text("".join(json.dumps({"custom_id": f"req-{i % 4}", "method": "POST", "url": "/v1/chat/completions",
                                        "body": {"model": "m", "messages": []}}) + "\n" for i in range(6)))
    rejects = tmp_path / "rejects.jsonl"
    done = cli("submit", str(path), "--tier", "normal", "--skip-invalid", "--rejects", str(rejects),
               "--nats", nats_server.url)
    assert done.returncode == 2, done.stderr
    assert "line 5 repeats the custom_id 'req-0' of line 1" in done.stderr
    assert "line 6 repeats the custom_id 'req-1' of line 2" in done.stderr
    assert "2 lines repeat the custom_id of an earlier line; OpenAI's Batch API refuses" in done.stderr
    assert [json.loads(line) for line in rejects.read_text().splitlines()] == [
        {"line": 5, "error": "repeats the custom_id of line 1", "custom_id": "req-0"},
        {"line": 6, "error": "repeats the custom_id of line 2", "custom_id": "req-1"}]
    assert anyio.run(_queued_jobs, nats_server.url) == 0


async def _queued_jobs(url: str) -> int:
    async with await Client.connect(url) as client:
        return (await client.js.stream_info("RATEFLEET_JOBS")).state.messages


def test_dead_letters_of_a_tier_the_fleet_does_not_have_is_an_error_not_an_empty_table(nats_server):
    anyio.run(_streams, nats_server.url)
    done = cli("dlq", "list", "--tier", "nosuch", "--nats", nats_server.url)
    assert done.returncode == 2, done.stdout + done.stderr
    assert "unknown tier 'nosuch'; this fleet's tiers: " in done.stderr and "normal" in done.stderr
    known = cli("dlq", "list", "--tier", "normal", "--nats", nats_server.url)
    assert known.returncode == 0, known.stderr  # a tier it has, with no letters: an empty list


@pytest.mark.parametrize("command", ["results", "submit"])
def test_a_wait_rides_out_a_nats_restart_and_ends_with_every_result(tmp_path, command):
    # a trial: a restart of `ratefleet up` ended a nightly `--wait`; a command's connection gave up after ~30 s
    import signal
    import time

    from faultkit import restartable_nats
    server = restartable_nats(tmp_path / "nats")
    try:
        anyio.run(_waiting_batch, server.url)
        out = tmp_path / "out.jsonl"
        if command == "results":
            args, batch, ids = ["results", "--batch", "b", "--wait", "--out", str(out)], "b", ["b-2-bbbbbbbbbb",
                                                                                              "b-3-cccccccccc"]
        else:
            jobs = tmp_path / "jobs.jsonl"
            jobs.write_text("".join(json.dumps({"id": f"s-{n}", **JOB}) + "\n" for n in range(2)))
            args, batch, ids = ["submit", str(jobs), "--tier", "normal", "--batch", "s", "--wait", "--out",
                                str(out)], "s", ["s-0", "s-1"]
        proc = subprocess.Popen([sys.executable, "-m", "ratefleet", *args, "--nats", server.url],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        deadline = time.monotonic() + 60
        while not out.exists() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.1)  # --out is opened as the wait begins
        time.sleep(2.0)
        assert proc.poll() is None
        server.kill() if hasattr(server, "kill") else server.stop(signal.SIGKILL)
        # results: past the ~30 s a command's connection gave up after (nats-py's 60 reconnects 0.5 s apart)
        time.sleep(33.0 if command == "results" else 4.0)
        server.start()
        anyio.run(_store_results, server.url, batch, ids)  # the fleet's work, done after the restart
        _, stderr = proc.communicate(timeout=90)
    finally:
        server.stop()
    assert proc.returncode == 0, stderr
    assert "NATS is away (reconnecting" in stderr, stderr  # ("NATS is back" unless the Results came first)
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert {r["job_id"] for r in rows} >= set(ids)


async def _store_results(url: str, batch: str, ids: list[str]) -> None:
    from ratefleet.runtime.store import store_result
    from ratefleet.schemas import Result
    async with await Client.connect(url) as client:
        for job_id in ids:
            await store_result(client.js, client.subjects, Result(job_id=job_id, status="succeeded", batch=batch))
