"""A batch run again past the dedup window while its first run's lines are still queued calls
each job once.

A nightly pipeline's `ratefleet submit` is cut off (a crash, Ctrl-C) with a backlog of hours
and run again with the same `--batch`: the lines the first run sent are past
`streams.duplicate_window_s`, so JetStream stores each again. Before, both messages of a job
were called (paid twice; the second Result refused). Now the re-run marks its messages
(`Ratefleet-Repeat`), and the leader ends a second message of a job whose first is held or
being called, and answers from the store one whose job has its Result.

Real processes: nats-server, the mock upstream (which counts the calls), a dispatcher and a
worker, the `ratefleet submit` CLI twice."""

from __future__ import annotations

import re
import time

import anyio
import pytest
from faultkit import FleetKit, WarmCli, calls, cli, fast_keys, start_d1_w1, until, upstream, write_chat_jobs

from ratefleet import Client

pytestmark = [pytest.mark.anyio, pytest.mark.timeout(180)]
JOBS = 40


async def test_a_rerun_past_the_dedup_window_calls_each_queued_job_once(tmp_path, nats_server):
    file = write_chat_jobs(tmp_path / "jobs.jsonl", JOBS)
    submit = ("submit", str(file), "--tier", "normal", "--batch", "night", "--nats", nats_server.url)
    with upstream() as mock:
        # 2 keys x 2 req/s: the 40 jobs take about 10 s, so most are still queued at the re-run
        kit = FleetKit(tmp_path, nats_server.url, mock.url, keys=fast_keys(rps=2, burst=1),
                       overrides={"streams": {"duplicate_window_s": 1}})
        # the re-run imported ahead: on a loaded machine an interpreter's start took long enough for
        # most of the 40 jobs to be done before it sent anything (6 lines re-sent, with 6 pytest processes)
        rerun = WarmCli(*submit, ready_dir=tmp_path)
        try:
            await start_d1_w1(kit, nats_server.url)
            rerun.ready()
            first = cli(*submit)
            assert first.returncode == 0 and f"{JOBS} new" in first.stderr, first.stderr
            sent_at = time.monotonic()
            async with await Client.connect(nats_server.url) as client:
                await anyio.sleep(max(0.0, sent_at + 1.5 - time.monotonic()))  # past the 1 s dedup window
                again = rerun.run()
                assert again.returncode == 0, again.stderr
                resent = int(re.search(r"(\d+) new", again.stderr).group(1))  # lines without a Result, sent again
                assert resent >= 10, f"only {resent} lines were sent again: nothing to test ({again.stderr})"

                counts: dict[str, int] = {}

                async def every_result_and_no_message_left() -> bool:
                    counts.clear()
                    async for result in client.results("night"):
                        counts[result.job_id] = counts.get(result.job_id, 0) + 1
                    info = await client.js.stream_info(client.subjects.jobs_stream)
                    return len(counts) == JOBS and info.state.messages == 0

                await until(every_result_and_no_message_left, timeout=90, interval=0.5,
                            what="every job's Result, and the re-run's messages ended")
            assert len(counts) == JOBS and all(n == 1 for n in counts.values()), counts
            paid = calls(mock, path="/v1/chat/completions")
            assert paid == JOBS, f"{paid} upstream calls for {JOBS} jobs ({resent} lines sent again)"
        finally:
            rerun.kill()
            kit.stop()
