"""`ratefleet results --wait` while `dlq replay`'s jobs are still out: one line per job of the
batch, the replay in place of the Result it replays. A new user's trial: replaying the failed
lines and then collecting with --wait wrote both the original and the replay for each (5 lines
for 3 jobs), while the summary said the originals had been replaced."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time

import pytest

from ratefleet import Client
from ratefleet.batches import BatchRecord, note_replays, save_record
from ratefleet.batchfile import line_job_id
from ratefleet.runtime.store import store_result
from ratefleet.runtime.streams import ensure_topology
from ratefleet.schemas import Result
from ratefleet.schemas.config import parse_config

pytestmark = [pytest.mark.timeout(120), pytest.mark.anyio]
STATUSES = ["failed", "succeeded", "failed", "succeeded", "failed"]  # lines 1, 3 and 5 failed and were replayed


async def _batch(url: str, batch: str) -> list[str]:
    """A submitted batch of five lines, three of them failed and sent again by `dlq replay`."""
    async with await Client.connect(url) as client:
        await ensure_topology(client.js, parse_config({}))
        ids = [line_job_id(batch, n, f"line {n}") for n in range(1, 6)]
        await save_record(client.js, client.subjects,
                          BatchRecord(batch=batch, tier="normal", state="submitted", jobs=5, lines=5))
        for n, (job_id, status) in enumerate(zip(ids, STATUSES, strict=True), 1):
            await store_result(client.js, client.subjects, Result(job_id=job_id, status=status, batch=batch,
                                                                  metadata={"row": n}))
        assert await note_replays(client.js, client.subjects, batch, 3)
    return ids


async def _replays_back(url: str, batch: str, ids: list[str], status: str, rows=(5, 1, 3)) -> None:
    async with await Client.connect(url) as client:
        for n in rows:  # in another order than the lines
            await store_result(client.js, client.subjects, Result(
                job_id=f"{ids[n - 1]}-r0000000{n}", status=status, batch=batch,
                metadata={"row": n, "replay_of": ids[n - 1]}))


def _wait(url: str, batch: str, out, *extra: str) -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, "-m", "ratefleet", "results", "--batch", batch, "--wait", "--out",
                             str(out), "--nats", url, *extra], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    time.sleep(5.0)  # started and read what is stored (else the replays are met by its first scan, a path that worked)
    return proc


@pytest.mark.parametrize("order", ["arrival", "input"])
async def test_replays_that_come_during_the_wait_take_their_lines_place(tmp_path, nats_server, order):
    ids = await _batch(nats_server.url, "rw")
    out = tmp_path / "out.jsonl"
    proc = _wait(nats_server.url, "rw", out, "--order", order)
    assert proc.poll() is None  # waiting for the replays
    await _replays_back(nats_server.url, "rw", ids, "succeeded")
    _, stderr = proc.communicate(timeout=60)
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert proc.returncode == 0, stderr
    assert sorted(r["metadata"]["row"] for r in rows) == [1, 2, 3, 4, 5], rows  # one line per job
    assert all(r["status"] == "succeeded" for r in rows)
    assert {r["job_id"] for r in rows if r["metadata"]["row"] in (1, 3, 5)} == {
        f"{ids[n - 1]}-r0000000{n}" for n in (1, 3, 5)}
    if order == "input":
        assert [r["metadata"]["row"] for r in rows] == [1, 2, 3, 4, 5]
    assert "batch rw: 5 of 5 results (succeeded 5)" in stderr
    assert "3 Results were replaced by a later `dlq replay`" in stderr


async def test_replays_that_fail_again_still_leave_one_line_each(tmp_path, nats_server):
    ids = await _batch(nats_server.url, "rf")
    out = tmp_path / "out.jsonl"
    proc = _wait(nats_server.url, "rf", out, "--order", "input")
    await _replays_back(nats_server.url, "rf", ids, "failed")
    _, stderr = proc.communicate(timeout=60)
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["metadata"]["row"] for r in rows] == [1, 2, 3, 4, 5], stderr
    assert [r["job_id"].endswith(f"-r0000000{n}") for n, r in enumerate(rows, 1)] == [True, False, True, False, True]
    assert proc.returncode == 1 and "failed 3, succeeded 2" in stderr


async def test_stopped_while_replays_are_out_every_line_is_written_once_and_the_wait_counts_them(tmp_path, nats_server):
    ids = await _batch(nats_server.url, "ri")
    out = tmp_path / "out.jsonl"
    proc = _wait(nats_server.url, "ri", out)
    await _replays_back(nats_server.url, "ri", ids, "succeeded", rows=(3,))  # one of three back
    time.sleep(1.0)
    proc.send_signal(signal.SIGINT)
    _, stderr = proc.communicate(timeout=60)
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert sorted(r["metadata"]["row"] for r in rows) == [1, 2, 3, 4, 5], stderr  # the held lines as they stand
    assert proc.returncode == 130
    assert "2 jobs of batch ri were sent again by `ratefleet dlq replay` and have no Result yet" in stderr
    assert "interrupted: 2 jobs are still queued or running" in stderr


async def test_a_line_written_before_its_replay_was_sent_is_counted_as_written_twice():
    # `dlq replay` run while `results --wait` already wrote the line: it cannot be taken back
    import io

    from rich.console import Console

    from ratefleet.results_cmd import Collect, _report
    sink = io.StringIO()
    record = BatchRecord(batch="b", tier="normal", state="submitted", jobs=1, lines=1)
    run = Collect("b", sink, None, record, wait=True)
    await run.take(None, Result(job_id="b-1-aaaaaaaaaa", status="failed", batch="b"))  # type: ignore[arg-type]
    run.replays_sent = 1  # the replay is sent now
    await run.take(None, Result(job_id="b-1-aaaaaaaaaa-r00000001", status="succeeded", batch="b",  # type: ignore[arg-type]
                                metadata={"replay_of": "b-1-aaaaaaaaaa"}))
    run.finish()
    assert len(sink.getvalue().splitlines()) == 2 and run.count == 1 and run.doubled == 1
    console = Console(file=io.StringIO(), width=300)
    assert _report(console, run, None, False, "nats://127.0.0.1:4222", "ratefleet") == 0
    assert "1 of them had been written before their replay was read" in console.file.getvalue()
