"""Where one `Client.request` spends its time, one request at a time, split by hop.

A fleet (1 dispatcher, 1 worker x 64 slots, 2 keys far above the load) on an embedded
nats-server calls the fast upstream of bench/throughput.py (nginx, else aiohttp). Each
request (after `--warm` unmeasured ones) is a `Client.request`, and the hops are read from
wall clocks and the Result's timings:

    t0->stored         request start until the JOBS message's server timestamp
    queued             stored -> the worker starts the call (Result.timings.queued_ms), split in
      stored->handout    stored -> the dispatcher's assignment seen on NATS (the benchmark
                         listens read-only to `<prefix>.internal.assign.*`)
      handout->call      the assignment seen -> the worker starts the call
    upstream           the call (timings.upstream_ms)
    total              stored -> the Result is ready (timings.total_ms)
    stored->client     the rest: the Result's store and the reply reaching the client, split in
      ready->published   the Result ready -> its publish to RATEFLEET_RESULTS seen on NATS
      published->client  that publish -> the worker's reply reaching the client
    wall               request start until the reply

Prints p50/p90 in ms; writes bench/results/request_latency.json.
Run: .venv/bin/python bench/request_latency.py [--requests N]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import anyio
from rich.console import Console
from rich.table import Table

sys.path.insert(0, str(Path(__file__).parent))
from fast_upstream import FastUpstream  # noqa: E402
from throughput import BenchFleet  # noqa: E402

from ratefleet.client import Client  # noqa: E402
from ratefleet.localfleet import KeyLimit  # noqa: E402
from ratefleet.schemas.internal import read_assignments  # noqa: E402

JOB = {"request": {"path": "/v1/chat/completions", "json": {"model": "m", "messages": []}}}
HOPS = ("t0->stored", "queued", "stored->handout", "handout->call", "upstream", "total",
        "stored->client", "ready->published", "published->client", "wall")


async def measure(fleet: BenchFleet, requests: int, warm: int) -> list[tuple[float, ...]]:
    rows = []
    seen: dict[tuple[str, str], float] = {}  # (what, job id) -> wall time the benchmark saw it on NATS

    async def on_assign(msg) -> None:
        now = time.time()
        for assignment in read_assignments(msg.data):
            seen.setdefault(("handout", assignment.job_id), now)

    async def on_result(msg) -> None:
        seen.setdefault(("published", msg.subject.rsplit(".", 1)[-1]), time.time())

    async with await Client.connect(fleet.nats_url) as client:
        await fleet.wait_ready(client)
        await client.nc.subscribe(f"{client.subjects.prefix}.internal.assign.*", cb=on_assign)
        await client.nc.subscribe(client.subjects.results(), cb=on_result)
        for i in range(warm + requests):
            t0 = time.time()
            # a plain job (its id generated): a job with an id of its own costs one stored-Result read first
            result = await client.request(JOB, "normal", timeout=30)
            t2 = time.time()
            job_id = result.job_id
            for _ in range(1000):  # (bounded) the listener's callbacks may run after the request returns
                if ("published", job_id) in seen and ("handout", job_id) in seen:
                    break
                await anyio.sleep(0.001)
            timings = result.timings
            stored = timings.submitted_at.timestamp()
            handout, published = seen[("handout", job_id)], seen[("published", job_id)]
            ready = stored + timings.total_ms / 1e3
            if i >= warm:
                rows.append(((stored - t0) * 1e3, timings.queued_ms, (handout - stored) * 1e3,
                             timings.queued_ms - (handout - stored) * 1e3, timings.upstream_ms,
                             timings.total_ms, (t2 - ready) * 1e3, (published - ready) * 1e3,
                             (t2 - published) * 1e3, (t2 - t0) * 1e3))
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=300)
    parser.add_argument("--warm", type=int, default=20)
    parser.add_argument("--upstream", choices=("auto", "nginx", "aiohttp"), default="auto")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "request_latency.json")
    args = parser.parse_args(argv)
    with FastUpstream(args.upstream) as upstream:
        fleet = BenchFleet([KeyLimit(f"k{i}", 1000.0, 100.0) for i in range(2)], workers=1, slots=64)
        fleet.external = upstream.url
        with fleet:
            rows = anyio.run(measure, fleet, args.requests, args.warm)
    table = Table("hop", "p50 ms", "p90 ms", title=f"one Client.request at a time ({len(rows)} requests)")
    out = {"benchmark": "request_latency", "requests": len(rows), "hops": {}}
    for i, hop in enumerate(HOPS):
        values = sorted(row[i] for row in rows)
        p50, p90 = statistics.median(values), values[int(len(values) * 0.9)]
        table.add_row(hop, f"{p50:.2f}", f"{p90:.2f}")
        out["hops"][hop] = {"p50_ms": round(p50, 3), "p90_ms": round(p90, 3)}
    Console().print(table)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
