"""The floor under `Client.request`'s overhead on this machine: what one hand-written hop costs.

Against the fast upstream of bench/throughput.py (nginx, else aiohttp, own process) and an
embedded nats-server, one request at a time, measured alternately in one sitting:

    direct     an httpx call (aiohttp transport, as the workers use) to the upstream
    core hop   a core NATS request to a second process that makes the same call and replies
    js hop     a JetStream publish (with a reply subject in a header) that the second process
               consumes (push consumer, manual ack), calls, and answers on that subject

`Client.request` crosses two Python processes (leader and worker) and stores the job and the
Result in JetStream, so its overhead over `direct` cannot be below the `js hop` row's on the
same machine. Prints p50/p90 ms per path and round; writes bench/results/one_hop.json.
Run: .venv/bin/python bench/one_hop.py [--requests N] [--rounds R]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import nats
from httpx_aiohttp import AiohttpTransport
from rich.console import Console
from rich.table import Table

sys.path.insert(0, str(Path(__file__).parent))
from fast_upstream import FastUpstream  # noqa: E402

from ratefleet.runtime.embedded import EmbeddedNats  # noqa: E402

BODY = {"model": "m", "messages": []}
PATH = "/v1/chat/completions"
SERVICE = r'''
import asyncio, sys, httpx, nats
from httpx_aiohttp import AiohttpTransport

async def main():
    nc = await nats.connect(sys.argv[1])
    url = sys.argv[2] + "/v1/chat/completions"
    http = httpx.AsyncClient(transport=AiohttpTransport(trust_env=False), trust_env=False)

    async def core(msg):
        await msg.respond((await http.post(url, json={"model": "m", "messages": []})).content)

    async def pulled(msg):
        answer = (await http.post(url, json={"model": "m", "messages": []})).content
        await nc.publish(msg.headers["Reply"], answer)
        await msg.ack()

    await nc.subscribe("hop.core", cb=core)
    await nc.jetstream().subscribe("hop.js", durable="hop", cb=pulled, manual_ack=True)
    print("ready", flush=True)
    await asyncio.Event().wait()

asyncio.run(main())
'''


async def measure(nats_url: str, upstream: str, requests: int, rounds: int) -> list[dict]:
    nc = await nats.connect(nats_url)
    js = nc.jetstream()
    await js.add_stream(name="HOP", subjects=["hop.js"])
    service = subprocess.Popen([sys.executable, "-c", SERVICE, nats_url, upstream], stdout=subprocess.PIPE, text=True)
    assert service.stdout is not None and service.stdout.readline().strip() == "ready"
    http = httpx.AsyncClient(transport=AiohttpTransport(trust_env=False), trust_env=False)

    async def direct() -> None:
        (await http.post(upstream + PATH, json=BODY)).raise_for_status()

    async def core() -> None:
        await nc.request("hop.core", b"{}", timeout=10)

    async def js_hop() -> None:
        inbox = nc.new_inbox()
        sub = await nc.subscribe(inbox, max_msgs=1)
        await js.publish("hop.js", b"{}", headers={"Reply": inbox})
        await sub.next_msg(timeout=10)

    rows = []
    try:
        for round_no in range(1, rounds + 1):
            for name, call in (("direct", direct), ("core hop", core), ("js hop", js_hop)):
                for _ in range(20):  # warm
                    await call()
                latencies = []
                for _ in range(requests):
                    started = time.perf_counter()
                    await call()
                    latencies.append((time.perf_counter() - started) * 1000)
                latencies.sort()
                rows.append({"round": round_no, "path": name, "p50_ms": round(statistics.median(latencies), 3),
                             "p90_ms": round(latencies[int(len(latencies) * 0.9)], 3)})
    finally:
        service.kill()
        service.wait()
        await http.aclose()
        await nc.close()
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=300)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--upstream", choices=("auto", "nginx", "aiohttp"), default="auto")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "one_hop.json")
    args = parser.parse_args(argv)
    with FastUpstream(args.upstream) as upstream, tempfile.TemporaryDirectory() as tmp:
        server = EmbeddedNats(Path(tmp) / "nats").start()
        try:
            rows = asyncio.run(measure(server.url, upstream.url, args.requests, args.rounds))
        finally:
            server.stop()
    table = Table("round", "path", "p50 ms", "p90 ms", "p50 over direct ms",
                  title=f"one request at a time ({args.requests} per row)")
    for row in rows:
        base = next(r["p50_ms"] for r in rows if r["round"] == row["round"] and r["path"] == "direct")
        row["p50_over_direct_ms"] = round(row["p50_ms"] - base, 3)
        table.add_row(str(row["round"]), row["path"], f"{row['p50_ms']:.2f}", f"{row['p90_ms']:.2f}",
                      f"{row['p50_over_direct_ms']:+.2f}")
    Console().print(table)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"benchmark": "one_hop", "command": " ".join(sys.argv), "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
