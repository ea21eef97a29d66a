"""Backpressure: RATEFLEET_JOBS at streams.jobs_max_msgs (no workers, so the queue fills).
Every way in refuses the next job promptly and says the queue is full (Client.submit,
submit_many, request/reply, the `ratefleet submit` CLI); nothing stored is lost, and once
workers drain the queue the refused job goes through."""

from __future__ import annotations

import asyncio
import json
import subprocess
import time

import nats
import pytest
from faultkit import Tracker, assert_exactly_once, chat, cli, fast_keys, figure, until, upstream, wait_workers
from fleetkit import FleetKit

from ratefleet import Client, QueueFull
from ratefleet.schemas import Result

pytestmark = [pytest.mark.timeout(90), pytest.mark.anyio]

LIMIT = 20
PROMPT_S = 8.0  # a refusal must come this fast (a producer must not hang on a full queue)


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
                started = time.monotonic()
                try:
                    proc = await asyncio.to_thread(cli, "submit", str(jsonl), "--tier", "normal", "--nats",
                                                   nats_server.url, timeout=15)
                except subprocess.TimeoutExpired:
                    proc = subprocess.CompletedProcess([], None, "", "(no exit within 15 s)")
                timings["cli"] = time.monotonic() - started
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
