"""`ratefleet cancel --batch B` mid-batch, through the real command, a real nats-server, real
dispatcher and worker processes and the mock upstream: the jobs still queued end `failed` /
`cancelled` with one Result each and no upstream call; `submit --wait` ends with every line
accounted for; the batch stays cancelled (a submit into it is refused)."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import time

import pytest
from faultkit import WarmCli, cli, cli_side_by_side, fast_keys, start_d1_w1, until, upstream, write_chat_jobs
from fleetkit import FleetKit

# a hang guard: a fleet and seven CLI runs, one interpreter start-up 11-29 s on a loaded 2-core
# machine; with 120 s, three copies at once beside a full suite run stopped in the last commands
pytestmark = [pytest.mark.timeout(240), pytest.mark.anyio]
JOBS = 200


async def test_cancel_ends_the_queued_jobs_without_a_call(tmp_path, nats_server):
    url = nats_server.url
    with upstream() as mock:
        kit = FleetKit(tmp_path, url, mock.url, keys=fast_keys(rps=4, burst=1))  # ~8 calls/s: the batch waits
        submit = canceller = None
        try:
            await start_d1_w1(kit, url)
            jobs = write_chat_jobs(tmp_path / "jobs.jsonl", JOBS)
            out = tmp_path / "out.jsonl"
            unknown = cli("cancel", "--batch", "c0", "--nats", url)
            assert unknown.returncode == 2 and "no batch c0 is known" in unknown.stderr, unknown.stderr

            # the cancel command started and imported ahead: sent once 10 calls are made, not an
            # interpreter start-up later (11-29 s on a loaded machine, where the batch, at ~8 calls
            # a second, was more than half called before the cancel)
            canceller = WarmCli("cancel", "--batch", "c1", "--nats", url, ready_dir=tmp_path)
            await asyncio.to_thread(canceller.ready)
            submit = subprocess.Popen([sys.executable, "-m", "ratefleet", "submit", str(jobs), "--tier", "normal",
                                       "--batch", "c1", "--wait", "--out", str(out), "--nats", url],
                                      stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
            await until(lambda: mock.stats()["requests"] >= 10, 30, 0.1, "10 calls made")
            cancelled = await asyncio.to_thread(canceller.run)
            calls_at_cancel = mock.stats()["requests"]
            assert cancelled.returncode == 0, cancelled.stderr
            assert "batch c1 cancelled: its jobs still queued end `failed` / `cancelled`" in cancelled.stdout
            assert "ratefleet results --batch c1 --wait" in cancelled.stdout
            started = time.monotonic()
            await until(lambda: submit.poll() is not None, 60, 0.2, "submit --wait ended")
            ended_s = time.monotonic() - started
            err = submit.stderr.read()
            assert submit.returncode == 1, err[-3000:]  # not every line succeeded
            assert "did not succeed is in its `error`: jq -c 'select(.status != \"succeeded\")" in err, err[-2000:]
            results = [json.loads(line) for line in out.read_text().splitlines()]
            assert len({r["job_id"] for r in results}) == JOBS == len(results), err[-2000:]
            ok = [r for r in results if r["status"] == "succeeded"]
            gone = [r for r in results if r["status"] == "failed" and r["error"]["code"] == "cancelled"]
            assert len(ok) + len(gone) == JOBS and len(gone) > JOBS // 2, (len(ok), len(gone))
            assert "was cancelled (`ratefleet cancel`) before this job was called" in gone[0]["error"]["message"]
            time.sleep(0.5)
            assert mock.stats()["requests"] == len(ok)  # a cancelled job was never called
            # only the calls under way at the cancel (4 slots) and a hand-out or two in its instant
            # follow it; before, the leader's window (64 jobs) was still called, at the keys' rate
            assert len(ok) - calls_at_cancel <= 8, (calls_at_cancel, len(ok))
            assert ended_s < 30, ended_s

            # three runs that change nothing, side by side (one interpreter start-up each)
            again, into, dead = cli_side_by_side(("cancel", "--batch", "c1", "--nats", url),
                                                 ("submit", str(jobs), "--tier", "normal", "--batch", "c1", "--nats", url),
                                                 ("dlq", "list", "--json", "--nats", url), timeout=90)
            assert again.returncode == 0 and "already cancelled" in again.stdout, again.stdout
            assert into.returncode == 2 and "batch c1 was cancelled" in into.stderr, into.stderr
            assert dead.returncode == 0 and "cancelled" not in dead.stdout  # nothing wrong with those jobs: no dead letters
        finally:
            if canceller is not None:
                canceller.kill()
            if submit is not None and submit.poll() is None:
                submit.kill()
            kit.stop()
