"""How many jobs per second one leader dispatcher and W workers carry when keys are not the limit.

Ten keys of 1000 req/s each (the mock enforces them, so 0 x 429 is still checked), jobs
already queued, results followed until every job has one. Prints a table, writes
bench/results/throughput.json. Run: .venv/bin/python bench/throughput.py [--jobs N] [--workers W]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import anyio
import httpx
from rich.console import Console
from rich.table import Table

from ratefleet.client import Client  # noqa: E402
from ratefleet.localfleet import KeyLimit, LocalFleet  # noqa: E402


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=10000)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--slots", type=int, default=64)
    parser.add_argument("--keys", type=int, default=10)
    parser.add_argument("--rps", type=float, default=1000.0)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "throughput.json")
    return parser.parse_args(argv)


async def drive(args: argparse.Namespace, fleet: LocalFleet) -> dict:
    jobs = [{"request": {"path": "/v1/chat/completions", "json": {"model": "m", "messages": []}}}
            for _ in range(args.jobs)]
    async with await Client.connect(fleet.nats_url) as client:
        await fleet.wait_ready(client)
        started = time.monotonic()
        await client.submit_many(jobs, "normal", batch="tp")
        submitted_s = time.monotonic() - started
        statuses: dict[str, int] = {}
        async for result in client.results("tp", follow=True):
            statuses[result.status] = statuses.get(result.status, 0) + 1
            if sum(statuses.values()) >= args.jobs:
                break
        elapsed = time.monotonic() - started
    async with httpx.AsyncClient(trust_env=False) as http:
        stats = (await http.get(fleet.upstream + "/_mock/stats")).json()
    return {"submitted_s": submitted_s, "elapsed_s": elapsed, "statuses": statuses,
            "rate_limited": sum(k["rate_limited"] for k in stats["keys"].values()),
            "calls": sum(k["calls"] for k in stats["keys"].values())}


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    keys = [KeyLimit(f"k{i + 1}", args.rps, max(1.0, args.rps / 10)) for i in range(args.keys)]
    with LocalFleet(keys, workers=args.workers, slots=args.slots) as fleet:
        run = anyio.run(drive, args, fleet)
    out = {"benchmark": "throughput", "command": " ".join(sys.argv), "jobs": args.jobs, "workers": args.workers,
           "slots": args.slots, "keys": args.keys, "configured_rps": args.keys * args.rps, **run,
           "jobs_per_s": round(args.jobs / run["elapsed_s"], 1),
           "submit_per_s": round(args.jobs / run["submitted_s"], 1),
           "machine": {"nproc": os.cpu_count(), "python": platform.python_version()}}
    table = Table("jobs", "workers x slots", "configured req/s", "submit jobs/s", "end-to-end jobs/s", "429s",
                  "statuses", title="throughput (submit -> result stored, one leader dispatcher)")
    table.add_row(str(args.jobs), f"{args.workers} x {args.slots}", f"{args.keys * args.rps:g}",
                  f"{out['submit_per_s']:g}", f"{out['jobs_per_s']:g}", str(run["rate_limited"]), json.dumps(run["statuses"]))
    Console().print(table)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(out, indent=2))
    return 0 if run["statuses"].get("succeeded") == args.jobs and run["rate_limited"] == 0 else 1


if __name__ == "__main__":
    raise SystemExit(main())
