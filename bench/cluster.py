"""Fleet throughput on a three-server JetStream cluster: streams at R3 against R1.

Each round starts a fresh three-server cluster on loopback (tests/e2e/clusterkit.py: routes,
a store dir each), the fast upstream (bench/fast_upstream.py: nginx, else aiohttp), one
dispatcher and W workers x S slots with `[nats] url` = the three servers comma-separated and
`[streams] replicas` = 1 or 3, then carries N jobs (`submit_many`, every Result followed:
first submit to last Result). Modes alternate in one sitting (r1 r3 r1 r3 ...) so load
on the machine falls on both alike; `single` (one server, R1) is the reference of
bench/throughput.py. CPU per job is read from /proc for each fleet process and for the
three nats-servers together.

Prints a table, writes bench/results/cluster.json.
Run: .venv/bin/python bench/cluster.py [--jobs N] [--rounds R] [--modes r1 r3 single]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

from rich.console import Console
from rich.table import Table

HERE = Path(__file__).parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent / "tests" / "e2e"))
from clusterkit import NatsCluster, wait_jetstream_ready  # noqa: E402
from fast_upstream import FastUpstream  # noqa: E402
from throughput import cpu_s  # noqa: E402

from ratefleet.client import Client  # noqa: E402
from ratefleet.localfleet import KeyLimit, LocalFleet  # noqa: E402
from ratefleet.runtime.embedded import EmbeddedNats  # noqa: E402


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=3000)
    parser.add_argument("--rounds", type=int, default=2, help="each mode this many times, alternating")
    parser.add_argument("--modes", nargs="+", choices=("r1", "r3", "single"), default=["r1", "r3"])
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--slots", type=int, default=64)
    parser.add_argument("--keys", type=int, default=10)
    parser.add_argument("--rps", type=float, default=1000.0)
    parser.add_argument("--upstream", choices=("auto", "nginx", "aiohttp"), default="auto")
    parser.add_argument("--out", type=Path, default=HERE / "results" / "cluster.json")
    return parser.parse_args(argv)


class ClusterFleet(LocalFleet):
    """A LocalFleet on a three-server cluster (or one server for `single`) and an upstream
    that runs already."""

    external: str = ""
    mode: str = "r3"

    def config(self) -> dict:
        return {**super().config(), "streams": {"replicas": 3 if self.mode == "r3" else 1}}

    def _start(self) -> None:
        if self.mode == "single":
            self._nats = EmbeddedNats(self.tmp / "nats").start()
            self.nats_url, self.nats_pids = self._nats.url, [self._nats.process.pid]
        else:
            cluster = NatsCluster(self.tmp / "cluster").start()
            self._nats = cluster  # type: ignore[assignment] - stop() like an EmbeddedNats
            asyncio.run(wait_jetstream_ready(cluster.urls))
            self.nats_url, self.nats_pids = cluster.url, [s.process.pid for s in cluster.servers.values()]
        self.upstream = self.external
        config_path = self.tmp / "ratefleet.toml"
        import tomli_w

        config_path.write_text(tomli_w.dumps(self.config()))
        self._spawn("dispatcher", "--config", str(config_path), "--id", "d1", name="dispatcher")
        for i in range(self.workers):
            self._spawn("worker", "--config", str(config_path), "--id", f"w{i + 1}", name=f"worker{i + 1}")


async def drive(fleet: ClusterFleet, jobs: int) -> dict:
    """Submit `jobs`, follow every Result; elapsed seconds and CPU µs per job by process."""
    bodies = [{"request": {"path": "/v1/chat/completions", "json": {"model": "m", "messages": []}}}
              for _ in range(jobs)]
    procs = {p.fleet_name: p.pid for p in fleet.procs}  # type: ignore[attr-defined]
    async with await Client.connect(fleet.nats_url) as client:
        await fleet.wait_ready(client, timeout=60)
        cpu_before = {name: cpu_s(pid) for name, pid in procs.items()}
        nats_before = sum(cpu_s(pid) for pid in fleet.nats_pids)
        started = time.monotonic()
        await client.submit_many(bodies, "normal", batch="cl")
        submitted_s = time.monotonic() - started
        statuses: dict[str, int] = {}
        async for result in client.results("cl", follow=True):
            statuses[result.status] = statuses.get(result.status, 0) + 1
            if sum(statuses.values()) >= jobs:
                break
        elapsed = time.monotonic() - started
        cpu = {name: round((cpu_s(pid) - cpu_before[name]) * 1e6 / jobs) for name, pid in procs.items()}
        cpu["nats-servers"] = round((sum(cpu_s(pid) for pid in fleet.nats_pids) - nats_before) * 1e6 / jobs)
    return {"jobs_per_s": round(jobs / elapsed, 1), "submit_per_s": round(jobs / submitted_s, 1),
            "elapsed_s": round(elapsed, 2), "statuses": statuses, "cpu_us_per_job": cpu}


def one_round(args: argparse.Namespace, mode: str, upstream: str) -> dict:
    keys = [KeyLimit(f"k{i + 1}", args.rps, max(1.0, args.rps / 10)) for i in range(args.keys)]
    fleet = ClusterFleet(keys, workers=args.workers, slots=args.slots)
    fleet.external, fleet.mode = upstream, mode
    with fleet:
        return {"mode": mode, **asyncio.run(drive(fleet, args.jobs))}


def report(runs: list[dict], summary: dict) -> None:
    console = Console(width=150)
    table = Table("round", "mode", "jobs/s", "submit jobs/s", "dispatcher µs/job", "workers µs/job",
                  "nats-servers µs/job", "statuses", title="fleet on a 3-server JetStream cluster")
    for i, run in enumerate(runs):
        cpu = run["cpu_us_per_job"]
        workers = sum(us for name, us in cpu.items() if name.startswith("worker"))
        table.add_row(str(i + 1), run["mode"], f"{run['jobs_per_s']:g}", f"{run['submit_per_s']:g}",
                      str(cpu.get("dispatcher")), str(workers), str(cpu["nats-servers"]), json.dumps(run["statuses"]))
    console.print(table)
    for mode, row in summary.items():
        console.print(f"{mode}: median {row['median_jobs_per_s']:g} jobs/s over {row['runs']} runs "
                      f"{row['jobs_per_s']}")
    if "r1" in summary and "r3" in summary:
        console.print(f"R3 / R1 = {summary['r3']['median_jobs_per_s'] / summary['r1']['median_jobs_per_s']:.2f}")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    runs = []
    with FastUpstream(args.upstream) as upstream:
        for _ in range(args.rounds):
            for mode in args.modes:
                runs.append(one_round(args, mode, upstream.url))
                print(f"{mode}: {runs[-1]['jobs_per_s']} jobs/s", file=sys.stderr, flush=True)
        kind = upstream.kind
    summary = {mode: {"runs": len(rates), "jobs_per_s": rates, "median_jobs_per_s": statistics.median(rates)}
               for mode in args.modes if (rates := [r["jobs_per_s"] for r in runs if r["mode"] == mode])}
    out = {"benchmark": "cluster", "command": " ".join(sys.argv), "jobs": args.jobs, "workers": args.workers,
           "slots": args.slots, "keys": args.keys, "upstream": kind, "runs": runs, "summary": summary,
           "machine": {"nproc": os.cpu_count(), "python": platform.python_version(), "loadavg": os.getloadavg()}}
    report(runs, summary)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(out, indent=2))
    return 0 if all(r["statuses"].get("succeeded") == args.jobs for r in runs) else 1


if __name__ == "__main__":
    raise SystemExit(main())
