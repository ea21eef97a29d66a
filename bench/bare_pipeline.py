"""The hand-written pipeline bench/throughput.py measures the fleet against (no limits, one process).

JetStream pull (fetch 256) -> httpx over the aiohttp transport, 64 calls in flight -> the
answer published to a results stream (awaited PubAck) -> ack. The N jobs are stored with
publish_async while the pipeline runs; the clock runs from the first submit to the last ack.
Prints one JSON line. Run: python bench/bare_pipeline.py NATS_URL UPSTREAM_URL [JOBS]
"""

from __future__ import annotations

import asyncio
import json
import sys
import time

import httpx
import nats
from httpx_aiohttp import AiohttpTransport
from nats.js.api import StreamConfig

IN_FLIGHT = 64
BODY = json.dumps({"model": "m", "messages": []}).encode()


async def main(url: str, upstream: str, jobs: int) -> dict:
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

    async def submit() -> None:
        for i in range(jobs):
            await js.publish_async("bare.jobs", json.dumps({"id": str(i), "path": "/v1/chat/completions"}).encode())
        await js.publish_async_completed()

    async def run(msg) -> None:
        nonlocal done
        try:
            job = json.loads(msg.data)
            response = await http.post(upstream + job["path"], content=BODY, headers={"content-type": "application/json"})
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
    print(json.dumps(asyncio.run(main(sys.argv[1], sys.argv[2], int(sys.argv[3]) if len(sys.argv) > 3 else 10000))))
