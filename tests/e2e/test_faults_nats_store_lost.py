"""NATS comes back without its store (a restart on memory storage or a new volume), or an
operator deletes the fleet's streams: the running dispatcher creates the streams, buckets and
consumers anew (ratefleet/runtime/streams.py `Rebuilder`), and the fleet serves new jobs again
without any process being restarted."""

from __future__ import annotations

import shutil
import subprocess
import sys

import anyio
import pytest
from faultkit import chat, fast_keys, restartable_nats, start_d1_w1, until, upstream, write_chat_jobs
from fleetkit import FleetKit

from ratefleet import Client

pytestmark = [pytest.mark.timeout(90), pytest.mark.anyio]


async def served(url: str) -> bool:
    """Whether a new job is stored, called and answered now."""
    async with await Client.connect(url) as client:
        return (await client.request(chat(1), "vip", timeout=3)).status == "succeeded"


@pytest.mark.parametrize("loss", ["store wiped", "streams deleted", "results stream deleted"])
async def test_the_fleet_recreates_its_streams_after_nats_lost_them(tmp_path, loss):
    server = restartable_nats(tmp_path / "nats")
    url = server.url
    with upstream() as mock:
        kit = FleetKit(tmp_path, url, mock.url, keys=fast_keys(rps=100, burst=10))
        try:
            await start_d1_w1(kit, url)
            assert await served(url)
            if loss == "store wiped":
                server.stop()
                shutil.rmtree(tmp_path / "nats" / "js")
                server.start()
                assert server.url == url
            elif loss == "streams deleted":
                async with await Client.connect(url) as client:
                    for stream in ("RATEFLEET_JOBS", "RATEFLEET_RESULTS"):
                        await client.js.delete_stream(stream)
            else:  # only where Results go: no pull request notices; the worker's store does
                async with await Client.connect(url) as client:
                    await client.js.delete_stream("RATEFLEET_RESULTS")
                assert await served(url)  # the first job after it: its store made the stream anew and stored
                assert sum(k["calls"] for k in mock.stats()["keys"].values()) == 2  # its answer, not called again
            await until(lambda: served(url), 45, 0.5, "a job served after NATS lost the fleet's streams", kit.logs)
            assert all(p.poll() is None for p in kit.processes), \
                {p.name: p.returncode for p in kit.processes if p.poll() is not None}
            log = kit.logs()
            assert "creating them anew" in log  # said to the operator, with what was lost
            log = (tmp_path / "d1.log").read_text()
            if loss == "store wiped":  # the leader before the loss may have spent tokens: the next one starts empty
                after = log[log.index("creating them anew"):]
                assert "became leader" in after, after[:3000]
                assert '"buckets": "empty"' in after[max(0, after.index("became leader") - 200):][:400], after[:3000]
        finally:
            kit.stop()
            server.stop()



async def _printed(path) -> bool:
    return bool(path.read_text().strip())


async def all_queued(url: str, jobs: int) -> bool:
    async with await Client.connect(url) as client:
        return (await client.js.stream_info("RATEFLEET_JOBS")).state.messages >= jobs


async def test_a_wait_ends_when_nats_lost_the_jobs_it_waits_for(tmp_path):
    """`submit --wait` and `results --wait` on a batch whose queued jobs the server lost (it came
    back without its store) end with exit 1, say so and give the command that sends them again,
    instead of waiting for Results that cannot come (before: "nothing new for 30s", for ever)."""
    server = restartable_nats(tmp_path / "nats")
    url = server.url
    with upstream() as mock:
        kit = FleetKit(tmp_path, url, mock.url, keys=fast_keys(rps=2, burst=1))  # the batch stays queued
        waits: list[subprocess.Popen] = []
        try:
            await start_d1_w1(kit, url)
            jobs = write_chat_jobs(tmp_path / "jobs.jsonl", 200)
            ratefleet = [sys.executable, "-m", "ratefleet"]
            out = str(tmp_path / "out.jsonl")
            errs = [tmp_path / "submit.err", tmp_path / "results.err"]
            for args, err_path in zip((["submit", str(jobs), "--tier", "normal", "--batch", "b1", "--wait", "--out", out],
                                       ["results", "--batch", "b1", "--wait"]), errs, strict=True):
                with err_path.open("w") as err_file:
                    waits.append(subprocess.Popen([*ratefleet, *args, "--nats", url], stdout=subprocess.DEVNULL,
                                                  stderr=err_file, text=True))
                await until(lambda: all_queued(url, 190), 30, 0.2, "the batch stored")
            # both commands are waiting once each printed its progress (a loaded machine can take
            # seconds to start `results`: started after the loss, it rightly finds no batch record)
            await until(lambda: _printed(errs[1]), 30, 0.2, "results --wait waiting")
            await anyio.sleep(1)
            server.stop()
            shutil.rmtree(tmp_path / "nats" / "js")
            server.start()
            await until(lambda: all(p.poll() is not None for p in waits), 40, 0.5, "both waits ended")
            for p, err_path in zip(waits, errs, strict=True):
                err = err_path.read_text()
                assert p.returncode == 1, err[-3000:]
                assert "lost the jobs of batch b1 still queued" in err, err[-3000:]
                assert "ratefleet submit " in err.split("lost the jobs")[1] and "--batch b1" in err, err[-3000:]
        finally:
            for p in waits:
                if p.poll() is None:
                    p.kill()
            kit.stop()
            server.stop()
