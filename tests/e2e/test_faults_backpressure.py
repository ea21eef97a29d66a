"""Backpressure: RATEFLEET_JOBS at streams.jobs_max_msgs (no workers, so the queue fills).
Every way in refuses the next job promptly and says the queue is full (Client.submit,
submit_many, request/reply, the `ratefleet submit` CLI); nothing stored is lost, and once
workers drain the queue the refused job goes through."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import time

import nats
import pytest
from faultkit import Tracker, assert_exactly_once, chat, fast_keys, figure, until, upstream, wait_workers
from fleetkit import FleetKit

from ratefleet import Client, QueueFull
from ratefleet.schemas import Result

# a hang guard: the bounded waits inside add up to about 120 s (a leader 20, the CLI 45, the
# worker's start and the two drains 20 + 15 + 25); 90 s was cut into by the CLI's start-up alone
pytestmark = [pytest.mark.timeout(150), pytest.mark.anyio]

LIMIT = 20
PROMPT_S = 8.0  # a refusal must come this fast (a producer must not hang on a full queue)


# `ratefleet submit` once its modules are imported: the refusal is timed from there. The
# interpreter's start-up and imports alone took 11-29 s (0.8 s of CPU) on a loaded 2-core
# machine (load average 13), past the 15 s this test allowed the whole process: the refusal was
# never seen (`exit None after 15.2s`). CLI_HANG_S is the hang guard for the whole process.
_IMPORT_THEN_RUN = ("import sys, time; from ratefleet.cli import main; "
                    "import anyio._backends._asyncio, ratefleet.submit_cmd; "  # (main imports these lazily)
                    "print(f'imported-at {time.monotonic()!r}', file=sys.stderr, flush=True); "
                    "sys.argv[0] = 'ratefleet'; main()")
CLI_HANG_S = 45


def _cli_after_imports(*args: str) -> tuple[subprocess.CompletedProcess, float]:
    """`cli(*args)`, run as `python -c` that imports ratefleet.cli, notes CLOCK_MONOTONIC (one
    clock for every process) and runs the same `main` as `python -m ratefleet`: the process and
    the seconds from its imports done to its exit."""
    full_env = {**os.environ, "RATEFLEET_LOG_FORMAT": "json"}
    full_env.pop("RATEFLEET_NATS_URL", None)
    proc = subprocess.run([sys.executable, "-c", _IMPORT_THEN_RUN, *args], capture_output=True, text=True,
                          timeout=CLI_HANG_S, env=full_env)
    ended = time.monotonic()
    marks = [line for line in proc.stderr.splitlines() if line.startswith("imported-at ")]
    assert marks, proc.stderr[-2000:]
    return proc, ended - float(marks[0].split()[1])


async def _timed(coro):
    started = time.monotonic()
    try:
        return await asyncio.wait_for(coro, PROMPT_S), None, time.monotonic() - started
    except TimeoutError:
        return None, f"no answer within {PROMPT_S}s", time.monotonic() - started
    except Exception as exc:  # noqa: BLE001 - the refusal under test
        return None, exc, time.monotonic() - started


async def test_full_queue_refuses_loudly_and_loses_nothing(tmp_path, nats_server):
    with upstream() as mock:
        kit = FleetKit(tmp_path, nats_server.url, mock.url, keys=fast_keys(),
                       overrides={"streams": {"jobs_max_msgs": LIMIT}})
        raw = await nats.connect(nats_server.url)
        try:
            kit.dispatcher("d1")  # no workers: jobs stay in the queue
            async with await Client.connect(nats_server.url) as client, Tracker(nats_server.url) as tracker:
                await until(lambda: _leader(client), 20, 0.2, "a leader")
                stored = [await client.submit(chat(i, id=f"bp-{i}"), "normal", batch="bp") for i in range(LIMIT)]
                assert await tracker.jobs_in_stream() == LIMIT
                problems: list[str] = []
                timings: dict[str, float] = {}

                _, err, timings["submit"] = await _timed(client.submit(chat(99, id="bp-extra"), "normal", batch="bp"))
                if not isinstance(err, QueueFull) or "queue is full" not in str(err).lower():
                    problems.append(f"Client.submit on a full queue: {err!r}")
                elif "bp-extra" not in str(err):
                    problems.append(f"QueueFull does not name the job: {err}")

                _, err, timings["submit_many"] = await _timed(
                    client.submit_many([chat(100 + i) for i in range(5)], "normal", batch="bp"))
                if not isinstance(err, QueueFull) or "full" not in str(err).lower():
                    problems.append(f"Client.submit_many on a full queue: {err!r}")

                # a retry of a job that IS stored is a duplicate, not a refusal
                again, err, timings["resubmit_stored"] = await _timed(client.submit(chat(3, id="bp-3"), "normal",
                                                                                    batch="bp"))
                if err is not None:
                    problems.append(f"resubmitting stored job bp-3 on a full queue raised {err!r} (it is stored)")

                reply, err, timings["rpc"] = await _timed(
                    raw.request("ratefleet.rpc.normal", json.dumps(chat(7, id="bp-rpc")).encode(), timeout=PROMPT_S))
                if reply is None:
                    problems.append(f"rpc on a full queue: no refusal ({err})")
                else:
                    answer = Result.from_json(reply.data)
                    if answer.status != "failed" or answer.error is None or answer.error.code != "queue_full":
                        problems.append(f"rpc on a full queue answered {answer.status}/{answer.error}")

                jsonl = tmp_path / "more.jsonl"
                jsonl.write_text("".join(json.dumps(chat(200 + i)) + "\n" for i in range(3)))
                try:
                    proc, timings["cli"] = await asyncio.to_thread(_cli_after_imports, "submit", str(jsonl), "--tier",
                                                                   "normal", "--nats", nats_server.url)
                except subprocess.TimeoutExpired:
                    proc = subprocess.CompletedProcess([], None, "", f"(no exit within {CLI_HANG_S} s)")
                    timings["cli"] = CLI_HANG_S
                out = proc.stdout + proc.stderr
                if proc.returncode in (0, None) or "full" not in out.lower() or "Traceback" in out or timings["cli"] > 15:
                    said = [line.strip(" │") for line in out.splitlines() if "full" in line.lower()][-1:]
                    problems.append(f"`ratefleet submit` on a full queue: exit {proc.returncode} after "
                                    f"{timings['cli']:.1f}s, traceback={'Traceback' in out}, "
                                    f"ExceptionGroup={'ExceptionGroup' in out}, said: {said}")

                in_queue = await tracker.jobs_in_stream()
                figure("backpressure", limit=LIMIT, in_queue=in_queue, cli_exit=proc.returncode,
                       refusal_s={k: round(v, 2) for k, v in timings.items()})
                assert in_queue == LIMIT, f"{in_queue} jobs in the queue, {LIMIT} were accepted"

                # workers drain it: every accepted job runs once, then the refused one goes in
                kit.worker("w1")
                await wait_workers(client, {"w1"})
                assert_exactly_once(await tracker.wait_stored("bp", stored, timeout=20), stored)
                extra = await client.submit(chat(99, id="bp-extra"), "normal", batch="bp")
                assert_exactly_once(await tracker.wait_stored("bp", [*stored, extra], timeout=15), [*stored, extra])
                assert not problems, "\n".join(problems)
        finally:
            await raw.close()
            kit.stop()


async def _leader(client) -> bool:
    status = await client.status(timeout=1)
    return bool(status.get("leader"))
