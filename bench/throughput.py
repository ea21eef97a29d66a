"""End-to-end jobs/s of the fleet beside a hand-written pipeline, on the same nats-server and upstream.

One nats-server, one fast upstream in its own process (nginx with a temporary config when
installed, else a small aiohttp server: `--upstream auto|nginx|aiohttp`; `--upstream mock`
is the Python mock with enforced key limits, as before), and one fleet (one dispatcher, W
workers x S slots, keys far above the load). In one run:

1. the bare pipeline (bench/bare_pipeline.py, its own process: pull -> httpx/aiohttp,
   64 in flight -> result published -> ack) carries N jobs; `--no-bare` skips it;
2. the fleet carries N jobs (`submit_many`, then every Result followed; first submit to
   last Result), with each fleet process's CPU read from /proc (µs per job; the leader's
   ceiling on one core = 1e6 / its µs per job);
3. the per-job overhead of `Client.request` over a direct httpx call to the same upstream,
   p50/p99, one at a time and at steady arrival rates (`--rates`, default 250 and 500/s;
   `--overhead-s` seconds each; `--no-overhead` skips it).

Prints tables, writes bench/results/throughput.json (ratio = fleet / bare jobs/s).
Run: .venv/bin/python bench/throughput.py [--jobs N] [--workers W] [--slots S]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

import anyio
import httpx
from rich.console import Console
from rich.table import Table

sys.path.insert(0, str(Path(__file__).parent))
from bare_pipeline import request_body  # noqa: E402
from fast_upstream import FastUpstream  # noqa: E402
from overhead import measure_overhead  # noqa: E402

from ratefleet.client import Client  # noqa: E402
from ratefleet.localfleet import KeyLimit, LocalFleet  # noqa: E402

TICK = os.sysconf("SC_CLK_TCK")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=10000)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--slots", type=int, default=64)
    parser.add_argument("--keys", type=int, default=10)
    parser.add_argument("--rps", type=float, default=1000.0)
    parser.add_argument("--upstream", choices=("auto", "nginx", "aiohttp", "mock"), default="auto")
    parser.add_argument("--prompt-kb", type=int, default=0,
                        help="each job's request carries a user message of this many KiB (both pipelines)")
    parser.add_argument("--answer-kb", type=int, default=0,
                        help="the upstream answers with a message of this many KiB (both pipelines)")
    parser.add_argument("--no-bare", action="store_true", help="skip the hand-written pipeline")
    parser.add_argument("--no-overhead", action="store_true", help="skip the Client.request overhead")
    parser.add_argument("--rates", type=float, nargs="*", default=[250.0, 500.0], help="arrivals/s for the overhead")
    parser.add_argument("--overhead-s", type=float, default=5.0, help="seconds per overhead rate")
    parser.add_argument("--repeat", action="store_true",
                        help="mark the fleet's jobs Ratefleet-Repeat (as a batch run again): each is looked up at intake")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "throughput.json")
    return parser.parse_args(argv)


class BenchFleet(LocalFleet):
    """A LocalFleet calling an upstream that runs already (no mock, no key limits there)."""

    external: str = ""

    def _start(self) -> None:
        if not self.external:
            return super()._start()
        import tomli_w

        from ratefleet.runtime.embedded import EmbeddedNats

        self._nats = EmbeddedNats(self.tmp / "nats").start()
        self.nats_url, self.upstream = self._nats.url, self.external
        config_path = self.tmp / "ratefleet.toml"
        config_path.write_text(tomli_w.dumps(self.config()))
        self._spawn("dispatcher", "--config", str(config_path), "--id", "d1", name="dispatcher")
        for i in range(self.workers):
            self._spawn("worker", "--config", str(config_path), "--id", f"w{i + 1}", name=f"worker{i + 1}")


def cpu_s(pid: int) -> float:
    """User + system CPU seconds of a process so far, from /proc/PID/stat."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICK


def run_bare(fleet: LocalFleet, jobs: int, prompt_kb: int = 0) -> dict:
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    out = subprocess.run([sys.executable, str(Path(__file__).parent / "bare_pipeline.py"), fleet.nats_url,
                          fleet.upstream, str(jobs), str(prompt_kb)], capture_output=True, text=True, timeout=900)
    if out.returncode != 0:
        raise RuntimeError(f"bare pipeline failed: {out.stderr[-2000:]}")
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    run = json.loads(out.stdout.strip().splitlines()[-1])
    cpu = (after.ru_utime + after.ru_stime) - (before.ru_utime + before.ru_stime)
    run["cpu_us_per_job"] = round(cpu * 1e6 / jobs)
    return run


async def drive(args: argparse.Namespace, fleet: LocalFleet) -> dict:
    body = request_body(args.prompt_kb)
    jobs = [{"request": {"path": "/v1/chat/completions", "json": body}} for _ in range(args.jobs)]
    procs = {p.fleet_name: p.pid for p in fleet.procs if p.fleet_name != "mock"}  # type: ignore[attr-defined]
    async with await Client.connect(fleet.nats_url) as client:
        await fleet.wait_ready(client)
        cpu_before = {name: cpu_s(pid) for name, pid in procs.items()}
        started = time.monotonic()
        await client.submit_many(jobs, "normal", batch="tp", repeat=args.repeat)
        submitted_s = time.monotonic() - started
        statuses: dict[str, int] = {}
        async for result in client.results("tp", follow=True):
            statuses[result.status] = statuses.get(result.status, 0) + 1
            if sum(statuses.values()) >= args.jobs:
                break
        elapsed = time.monotonic() - started
        cpu = {name: round((cpu_s(pid) - cpu_before[name]) * 1e6 / args.jobs) for name, pid in procs.items()}
        fleet_side = {**procs, "nats-server": fleet._nats.process.pid, "client": os.getpid()}
        overhead = None if args.no_overhead else await measure_overhead(
            client, fleet.upstream, args.rates, args.overhead_s,
            cpu=lambda: {name: cpu_s(pid) for name, pid in fleet_side.items()})
    rate_limited = calls = None
    if args.upstream == "mock":
        async with httpx.AsyncClient(trust_env=False) as http:
            stats = (await http.get(fleet.upstream + "/_mock/stats")).json()
        rate_limited = sum(k["rate_limited"] for k in stats["keys"].values())
        calls = sum(k["calls"] for k in stats["keys"].values())
    return {"submitted_s": submitted_s, "elapsed_s": elapsed, "statuses": statuses, "rate_limited": rate_limited,
            "calls": calls, "cpu_us_per_job": cpu, "overhead": overhead}


def run_all(args: argparse.Namespace, upstream: str, kind: str) -> dict:
    keys = [KeyLimit(f"k{i + 1}", args.rps, max(1.0, args.rps / 10)) for i in range(args.keys)]
    fleet = BenchFleet(keys, workers=args.workers, slots=args.slots)
    fleet.external = upstream
    with fleet:
        bare = None if args.no_bare else run_bare(fleet, args.jobs, args.prompt_kb)
        run = anyio.run(drive, args, fleet)
    return {"upstream": kind, "bare": bare, **run}


def report(args: argparse.Namespace, out: dict) -> None:
    console = Console(width=150)
    table = Table("jobs", "workers x slots", "upstream", "submit jobs/s", "fleet jobs/s", "bare jobs/s", "ratio",
                  "429s", "statuses", title="throughput (first submit -> last result)"
                  + (f", each job with a {args.prompt_kb} KiB prompt" if args.prompt_kb else "")
                  + (f", answers of {args.answer_kb} KiB" if args.answer_kb else ""))
    bare = out["bare"]
    table.add_row(str(args.jobs), f"{args.workers} x {args.slots}", out["upstream"], f"{out['submit_per_s']:g}",
                  f"{out['jobs_per_s']:g}", f"{bare['jobs_per_s']:g}" if bare else "-",
                  f"{out['ratio']:.2f}" if out["ratio"] else "-", str(out["rate_limited"]), json.dumps(out["statuses"]))
    console.print(table)
    cpu = Table("process", "CPU µs/job", title="CPU per job during the fleet run (/proc)")
    for name, us in out["cpu_us_per_job"].items():
        cpu.add_row(name, str(us))
    if bare:
        cpu.add_row("bare pipeline (whole process)", str(bare["cpu_us_per_job"]))
    console.print(cpu)
    if out.get("dispatcher_ceiling_jobs_per_s"):
        console.print(f"one leader's ceiling on one core: {out['dispatcher_ceiling_jobs_per_s']:,} jobs/s")
    if out["overhead"]:
        lat = Table("load", "direct p50 / p99 ms", "Client.request p50 / p99 ms", "overhead p50 / p99 ms", "n",
                    "fleet CPU µs/request", "cores needed",
                    title="Client.request over a direct httpx call to the same upstream")
        for row in out["overhead"]:
            if "failed" in row:
                lat.add_row(row["load"], row["failed"], "", "", str(row["n"]))
                continue
            per = row.get("fleet_cpu_us_per_request") or {}
            lat.add_row(row["load"], f"{row['direct_p50_ms']} / {row['direct_p99_ms']}",
                        f"{row['fleet_p50_ms']} / {row['fleet_p99_ms']}",
                        f"{row['overhead_p50_ms']} / {row['overhead_p99_ms']}", str(row["n"]),
                        " + ".join(f"{name} {us}" for name, us in per.items()) + f" = {row.get('fleet_cpu_us_total')}"
                        if per else "-", str(row.get("cores_needed") or "-"))
        console.print(lat)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.upstream == "mock":
        run = run_all(args, "", "mock")
    else:
        with FastUpstream(args.upstream, answer_kb=args.answer_kb) as upstream:
            run = run_all(args, upstream.url, upstream.kind)
    jobs_per_s = round(args.jobs / run["elapsed_s"], 1)
    leader_us = run["cpu_us_per_job"].get("dispatcher")
    out = {"benchmark": "throughput", "command": " ".join(sys.argv), "jobs": args.jobs, "prompt_kb": args.prompt_kb,
           "answer_kb": args.answer_kb,
           "workers": args.workers,
           "slots": args.slots, "keys": args.keys, "configured_rps": args.keys * args.rps, "repeat": args.repeat, **run,
           "jobs_per_s": jobs_per_s, "submit_per_s": round(args.jobs / run["submitted_s"], 1),
           "ratio": round(jobs_per_s / run["bare"]["jobs_per_s"], 3) if run["bare"] else None,
           "dispatcher_ceiling_jobs_per_s": round(1e6 / leader_us) if leader_us else None,
           "machine": {"nproc": os.cpu_count(), "python": platform.python_version(),
                       "loadavg": os.getloadavg()}}
    report(args, out)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(out, indent=2))
    ok = run["statuses"].get("succeeded") == args.jobs and not run["rate_limited"]
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
