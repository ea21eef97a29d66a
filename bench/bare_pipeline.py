"""The hand-written pipeline bench/throughput.py measures the fleet against (no limits, one process).

JetStream pull (fetch 256) -> httpx over the aiohttp transport, 64 calls in flight -> the
answer published to a results stream (awaited PubAck) -> ack. The N jobs are stored with
publish_async while the pipeline runs; the clock runs from the first submit to the last ack.
Each job carries its request body (`PROMPT_KB`: a user message of that many KiB, as
bench/throughput.py's `--prompt-kb` gives the fleet's jobs), which the pipeline sends as is.
Prints one JSON line. Run: python bench/bare_pipeline.py NATS_URL UPSTREAM_URL [JOBS [PROMPT_KB]]
"""

from __future__ import annotations

import asyncio
import json
import sys
import time
from pathlib import Path

import httpx
import nats
from httpx_aiohttp import AiohttpTransport
from nats.js.api import StreamConfig

sys.path.insert(0, str(Path(__file__).parent))  # run as a script or imported by bench/throughput.py
from fast_upstream import filler  # noqa: E402

IN_FLIGHT = 64


def request_body(prompt_kb: int) -> dict:
    """The chat request both pipelines send: no messages, or one user message of `prompt_kb` KiB."""
    if not prompt_kb:
        return {"model": "m", "messages": []}
    return {"model": "m", "messages": [{"role": "user", "content": filler(prompt_kb)}]}


async def main(url: str, upstream: str, jobs: int, prompt_kb: int = 0) -> dict:
    nc = await nats.connect(url)
    js = nc.jetstream()
    for name in ("BARE_JOBS", "BARE_RESULTS"):
        try:
            await js.delete_stream(name)
        except Exception:  # noqa: BLE001, S110 - not there yet
            pass
    await js.add_stream(StreamConfig(name="BARE_JOBS", subjects=["bare.jobs"], retention="workqueue"))
    await js.add_stream(StreamConfig(name="BARE_RESULTS", subjects=["bare.results.*"]))
    sub = await js.pull_subscribe("bare.jobs", durable="bare", stream="BARE_JOBS")
    limits = httpx.Limits(max_connections=IN_FLIGHT, max_keepalive_connections=IN_FLIGHT)
    http = httpx.AsyncClient(transport=AiohttpTransport(limits=limits, trust_env=False), trust_env=False)
    slots = asyncio.Semaphore(IN_FLIGHT)
    done = 0
    finished = asyncio.Event()

    body = request_body(prompt_kb)

    async def submit() -> None:
        for i in range(jobs):
            job = {"id": str(i), "path": "/v1/chat/completions", "json": body}
            await js.publish_async("bare.jobs", json.dumps(job).encode())
        await js.publish_async_completed()

    async def run(msg) -> None:
        nonlocal done
        try:
            job = json.loads(msg.data)
            response = await http.post(upstream + job["path"], content=json.dumps(job["json"]).encode(),
                                       headers={"content-type": "application/json"})
            result = {"id": job["id"], "status": response.status_code, "json": response.json()}
            await js.publish(f"bare.results.{job['id']}", json.dumps(result).encode())
            await msg.ack()
        finally:
            slots.release()
        done += 1
        if done >= jobs:
            finished.set()

    started = time.monotonic()
    submitter = asyncio.create_task(submit())
    while not finished.is_set():
        try:
            msgs = await sub.fetch(256, timeout=0.5)
        except (TimeoutError, nats.errors.TimeoutError):
            continue
        for msg in msgs:
            await slots.acquire()
            asyncio.create_task(run(msg))
    elapsed = time.monotonic() - started
    await submitter
    await http.aclose()
    for name in ("BARE_JOBS", "BARE_RESULTS"):
        await js.delete_stream(name)
    await nc.close()
    return {"jobs": jobs, "elapsed_s": round(elapsed, 3), "jobs_per_s": round(jobs / elapsed, 1)}


if __name__ == "__main__":
    print(json.dumps(asyncio.run(main(sys.argv[1], sys.argv[2], int(sys.argv[3]) if len(sys.argv) > 3 else 10000,
                                      int(sys.argv[4]) if len(sys.argv) > 4 else 0))))
