"""Benchmark: the dispatcher's memory with a large backlog queued, and vip latency beside it.

    .venv/bin/python bench/backlog.py                       # 200,000 guest jobs queued, ~5-6 min
    .venv/bin/python bench/backlog.py --jobs 20000 --hold-s 20 --vip 30   # a quick check, ~1.5 min

One local fleet (ratefleet/localfleet.py: embedded nats-server, the mock upstream enforcing
`--keys` x `--rps`, default 2 x 10 req/s, one dispatcher, `--workers` workers) with few keys,
so that a guest backlog drains at only sum(rps) jobs/s and stays queued for the whole run.
The benchmark samples the dispatcher's resident memory (VmRSS of /proc/<pid>/status) every
second from the moment the fleet is ready, and runs four phases:

1. empty: `--vip` vip jobs sent one at a time (`Client.request`, one every `--vip-interval-ms`
   +-50 %) into an empty queue (after 5 warm-up jobs);
2. small: `--control-jobs` guest jobs stored, then `--vip` vip jobs one at a time as in 1, while
   guest calls flow at the keys' rate (the control for 4);
3. submit: guest jobs stored with `Client.submit_many` (chunks of 10,000, printing the rate)
   until `--jobs` are queued;
4. backlog: `--vip` vip jobs sent one at a time again, spaced as before, while the backlog is
   queued; the phase lasts `--hold-s` seconds at least (for the RSS slope); at the end the
   leader's status says how much is still queued.

Reports the dispatcher's RSS min/max per phase and its slope (least squares, MB per minute)
over the backlog phase, and the vip queue wait (`Result.timings.queued_ms`: stored -> the
worker starts the call) p50/p99 in phases 1, 2 and 4, split (from the dispatcher's
assignments, listened to read-only) into stored -> hand-out and hand-out -> the worker's call.
Targets: RSS max < 150 MB and |slope| over the backlog phase < 1 MB/min; the backlog's size
does not slow vip jobs: vip p50/p99 with `--jobs` queued <= p50 + 5 ms / p99 + 20 ms with
`--control-jobs` queued, guest calls flowing at the same rate in both. The difference to the
empty queue (no guest calls beside the vip jobs) is reported as well. Prints a table, writes
bench/results/backlog.json. Exit 0 when all targets are met.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shlex
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

import anyio
from rich.console import Console
from rich.table import Table

sys.path.insert(0, str(Path(__file__).resolve().parent))
from limits import ROOT, cpu_seconds, dist, fleet_pids, machine_info  # noqa: E402

from ratefleet import Client  # noqa: E402
from ratefleet.localfleet import KeyLimit, LocalFleet  # noqa: E402
from ratefleet.schemas.internal import read_assignments  # noqa: E402

RSS_LIMIT_MB = 150.0
SLOPE_LIMIT_MB_PER_MIN = 1.0
VIP_SLACK_MS = 20.0
VIP_P50_SLACK_MS = 5.0
CHUNK = 10_000
SPLIT = ("to_handout", "handout_to_call", "handout_to_wire", "wire_to_call")
WARMUP_VIPS = 5  # first calls (connection set-up, first key answers) left out


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--jobs", type=int, default=200_000, help="guest jobs queued (default 200000)")
    p.add_argument("--control-jobs", type=int, default=1000,
                   help="guest jobs queued for the control phase: guest calls flow at the keys' rate as in the "
                        "backlog phase, but the backlog is small (default 1000)")
    p.add_argument("--vip", type=int, default=100, help="vip jobs per phase (default 100)")
    p.add_argument("--vip-interval-ms", type=float, default=200.0, help="mean gap between vip jobs (default 200)")
    p.add_argument("--hold-s", type=float, default=60.0, help="minimum length of the backlog phase (default 60)")
    p.add_argument("--keys", type=int, default=2, help="API keys (default 2)")
    p.add_argument("--rps", type=float, default=10.0, help="requests/s of each key (default 10)")
    p.add_argument("--burst", type=float, default=5.0, help="burst of each key (default 5)")
    p.add_argument("--workers", type=int, default=1, help="worker processes (default 1)")
    p.add_argument("--slots", type=int, default=16, help="slots per worker (default 16)")
    p.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "backlog.json", help="JSON output")
    args = p.parse_args(argv)
    if not 0 < args.control_jobs < args.jobs:
        p.error("--control-jobs must be between 1 and --jobs")
    if min(args.jobs, args.vip, args.keys, args.workers, args.slots) < 1 or args.rps <= 0:
        p.error("--jobs, --vip, --keys, --workers, --slots must be >= 1 and --rps > 0")
    return args


def vm_rss_kb(pid: int) -> int | None:
    """Resident set size of a process in kB (VmRSS in /proc/<pid>/status), None when gone."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    except (OSError, ValueError):
        return None
    return None


def slope_per_min(points: list[tuple[float, float]]) -> float | None:
    """Least-squares slope of (seconds, MB) points, in MB per minute."""
    if len(points) < 2:
        return None
    n = len(points)
    mx, my = sum(t for t, _ in points) / n, sum(v for _, v in points) / n
    sxx = sum((t - mx) ** 2 for t, _ in points)
    return None if sxx == 0 else sum((t - mx) * (v - my) for t, v in points) / sxx * 60


def rss_summary(samples: list[dict], phases: set[str]) -> dict:
    points = [(s["t"], s["rss_mb"]) for s in samples if s["phase"] in phases]
    if not points:
        return {"n": 0}
    values = [v for _, v in points]
    slope = slope_per_min(points)
    return {"n": len(points), "min_mb": round(min(values), 1), "max_mb": round(max(values), 1),
            "first_mb": round(values[0], 1), "last_mb": round(values[-1], 1),
            "slope_mb_per_min": None if slope is None else round(slope, 3)}


def phase_usage(samples: list[dict], phase: str) -> dict:
    """Each process's CPU share (% of one core) and the machine's mean 1-min load over a phase."""
    rows = [s for s in samples if s["phase"] == phase]
    if len(rows) < 2:
        return {}
    span = rows[-1]["t"] - rows[0]["t"]
    cpu = {name: round((rows[-1]["cpu_s"][name] - rows[0]["cpu_s"][name]) / span * 100, 1)
           for name in rows[0]["cpu_s"] if None not in (rows[0]["cpu_s"][name], rows[-1]["cpu_s"][name])}
    return {"cpu_pct": cpu, "load1_mean": round(sum(r["load1"] for r in rows) / len(rows), 1)}


def vip_job(phase: str, i: int) -> dict:
    return {"request": {"path": "/v1/chat/completions",
                        "json": {"model": "bench", "messages": [{"role": "user", "content": f"vip {phase} {i}"}]}}}


def guest_job(i: int) -> dict:
    return {"request": {"path": "/v1/chat/completions",
                        "json": {"model": "bench", "messages": [{"role": "user", "content": f"backlog row {i}"}]}},
            "metadata": {"n": i}}


async def send_vips(client: Client, phase: str, count: int, interval_s: float, min_s: float, rng: random.Random,
                    handouts: dict[str, tuple[float, float]]) -> dict[str, list[float]]:
    """`count` vip jobs one at a time (at least `min_s` seconds in all): their queued_ms, and
    (when the dispatcher's assignment was seen, `handouts`: job id -> queued_ms at hand-out)
    that wait split into stored -> hand-out and hand-out -> the worker's call."""
    waits: dict[str, list[float]] = {"queued": [], "to_handout": [], "handout_to_call": [], "handout_to_wire": [],
                                     "wire_to_call": []}
    started = time.monotonic()
    for i in range(count):  # the same spacing in every phase; `min_s` only pads the end
        await anyio.sleep(interval_s * rng.uniform(0.5, 1.5))
        result = await client.request(vip_job(phase, i), "vip", timeout=60)
        if result.status == "succeeded" and result.timings.queued_ms is not None:
            waits["queued"].append(result.timings.queued_ms)
            handed = handouts.get(result.job_id)
            if handed is not None:
                waits["to_handout"].append(handed[0])
                waits["handout_to_call"].append(result.timings.queued_ms - handed[0])
                waits["handout_to_wire"].append(handed[1] - handed[0])
                waits["wire_to_call"].append(result.timings.queued_ms - handed[1])
    while time.monotonic() - started < min_s:
        await anyio.sleep(0.5)
    return waits


async def drive(args: argparse.Namespace, fleet: LocalFleet, console: Console) -> dict:
    samples: list[dict] = []
    state = {"phase": "empty"}
    rng = random.Random(1)
    async with await Client.connect(fleet.nats_url, name="ratefleet-bench-backlog") as client:
        await fleet.wait_ready(client)
        pid = next(p.pid for p in fleet.procs if p.fleet_name == "dispatcher")  # type: ignore[attr-defined]
        t0 = time.monotonic()
        handouts: dict[str, tuple[float, float]] = {}

        async def on_assign(msg) -> None:
            for a in read_assignments(msg.data):  # one message may carry a dispatch pass's batch
                if a.tier == "vip":  # (queued_ms at hand-out, ms from submit to this bench seeing it)
                    handouts.setdefault(a.job_id, (a.queued_ms, (time.time() - a.submitted_at) * 1000))

        trace = await client.nc.subscribe(f"{client.subjects.prefix}.internal.assign.*", cb=on_assign,
                                          pending_msgs_limit=0)

        pids = {name: p for name, p in fleet_pids(fleet).items() if name in ("dispatcher", "worker1", "nats-server", "mock")}

        async def sample() -> None:
            while True:
                kb = vm_rss_kb(pid)
                if kb is not None:
                    samples.append({"t": round(time.monotonic() - t0, 2), "rss_mb": kb / 1024, "phase": state["phase"],
                                    "load1": os.getloadavg()[0],
                                    "cpu_s": {name: cpu_seconds(p) for name, p in pids.items()}})
                await anyio.sleep(1.0)

        async with anyio.create_task_group() as tg:
            tg.start_soon(sample)
            await send_vips(client, "warm-up", WARMUP_VIPS, args.vip_interval_ms / 1000, 0.0, rng, handouts)
            empty = await send_vips(client, "empty", args.vip, args.vip_interval_ms / 1000, 0.0, rng, handouts)
            state["phase"] = "small"
            await client.submit_many([guest_job(i) for i in range(args.control_jobs)], "guest", batch="bench-backlog")
            small = await send_vips(client, "small", args.vip, args.vip_interval_ms / 1000, 0.0, rng, handouts)
            state["phase"] = "submit"
            started = time.monotonic()
            for lo in range(args.control_jobs, args.jobs, CHUNK):
                await client.submit_many([guest_job(i) for i in range(lo, min(args.jobs, lo + CHUNK))], "guest",
                                         batch="bench-backlog")
                done = min(args.jobs, lo + CHUNK)
                rate = (done - args.control_jobs) / (time.monotonic() - started)
                console.print(f"  {done:,} jobs queued, storing {rate:,.0f} jobs/s")
            submit_s = time.monotonic() - started
            state["phase"] = "backlog"
            backlog = await send_vips(client, "backlog", args.vip, args.vip_interval_ms / 1000, args.hold_s, rng, handouts)
            state["phase"] = "end"
            status = await client.status(timeout=5.0)
            tg.cancel_scope.cancel()
        await trace.unsubscribe()
    return {"samples": samples, "vip_empty": empty, "vip_small": small, "vip_backlog": backlog, "submit_s": submit_s,
            "status": status}


def analyse(args: argparse.Namespace, run: dict) -> dict:
    samples = run["samples"]
    whole, backlog = rss_summary(samples, {"empty", "small", "submit", "backlog"}), rss_summary(samples, {"backlog"})
    empty_q, small_q = dist(run["vip_empty"]["queued"]), dist(run["vip_small"]["queued"])
    backlog_q = dist(run["vip_backlog"]["queued"])
    tiers = (run["status"] or {}).get("tiers") or {}
    guest_queued = (tiers.get("guest") or {}).get("queued")
    targets = {
        "rss_under_150mb": whole.get("max_mb") is not None and whole["max_mb"] < RSS_LIMIT_MB,
        "rss_flat_in_backlog": backlog.get("slope_mb_per_min") is not None
        and abs(backlog["slope_mb_per_min"]) < SLOPE_LIMIT_MB_PER_MIN,
        # the backlog's size must not matter: same guest traffic, --control-jobs vs --jobs queued
        "vip_unaffected_by_backlog_size": None not in (small_q["p50"], small_q["p99"], backlog_q["p50"], backlog_q["p99"])
        and backlog_q["p50"] <= small_q["p50"] + VIP_P50_SLACK_MS and backlog_q["p99"] <= small_q["p99"] + VIP_SLACK_MS,
        "every_vip_succeeded": empty_q["n"] == small_q["n"] == backlog_q["n"] == args.vip,
        "backlog_still_queued": isinstance(guest_queued, int) and guest_queued > 0.5 * args.jobs,
    }
    vs_empty = None if None in (empty_q["p99"], backlog_q["p99"]) else {
        "p50_ms": round(backlog_q["p50"] - empty_q["p50"], 1), "p99_ms": round(backlog_q["p99"] - empty_q["p99"], 1)}
    return {"submit_s": round(run["submit_s"], 1), "vip_backlog_minus_empty": vs_empty,
            "submit_jobs_per_s": round((args.jobs - args.control_jobs) / run["submit_s"]),
            "guest_queued_at_end": guest_queued, "rss_whole_run": whole, "rss_backlog_phase": backlog,
            "rss_by_phase": {phase: rss_summary(samples, {phase}) for phase in ("empty", "small", "submit", "backlog")},
            "usage_by_phase": {phase: phase_usage(samples, phase) for phase in ("empty", "small", "submit", "backlog")},
            "vip_queued_ms_empty": empty_q, "vip_queued_ms_small": small_q, "vip_queued_ms_backlog": backlog_q,
            "vip_split_ms": {phase: {part: dist(run[f"vip_{phase}"][part]) for part in SPLIT}
                             for phase in ("empty", "small", "backlog")},
            "targets": targets, "targets_met": all(targets.values())}


def print_report(console: Console, args: argparse.Namespace, out: dict) -> None:
    phases = ("empty", "small", "backlog")
    table = Table("measure", "empty queue", f"{args.control_jobs:,} guest queued", f"{args.jobs:,} guest queued", "target",
                  title="ratefleet backlog benchmark (vip jobs one at a time; guest calls flow at the keys' rate)")
    whole, back = out["rss_whole_run"], out["rss_backlog_phase"]
    t = out["targets"]
    mark = {True: "[green]met[/green]", False: "[red]NOT met[/red]"}
    rss = out["rss_by_phase"]
    table.add_row("dispatcher RSS min / max MB", *(f"{rss[p].get('min_mb')} / {rss[p].get('max_mb')}" for p in phases),
                  f"< {RSS_LIMIT_MB:g} MB (whole run: {whole.get('max_mb')}) {mark[t['rss_under_150mb']]}")
    table.add_row("dispatcher RSS slope MB/min", "", "", str(back.get("slope_mb_per_min")),
                  f"|x| < {SLOPE_LIMIT_MB_PER_MIN:g} {mark[t['rss_flat_in_backlog']]}")
    q = [out[f"vip_queued_ms_{p}"] for p in phases]
    table.add_row("vip queued_ms p50", *(str(d["p50"]) for d in q), "")
    table.add_row("vip queued_ms p99 / max", *(f"{d['p99']} / {d['max']}" for d in q),
                  f"large vs small backlog: p50 +{VIP_P50_SLACK_MS:g} ms, p99 +{VIP_SLACK_MS:g} ms at most "
                  f"{mark[t['vip_unaffected_by_backlog_size']]}")
    diff = out["vip_backlog_minus_empty"]
    if diff:
        table.add_row("vip: large backlog minus empty queue", "", "", f"p50 {diff['p50_ms']:+} / p99 {diff['p99_ms']:+} ms",
                      "(reported; guest calls flow beside it)")
    split = out["vip_split_ms"]
    for part, label in (("to_handout", "stored -> dispatcher hand-out"), ("handout_to_call", "hand-out -> worker call"),
                        ("handout_to_wire", "  hand-out -> seen on NATS"), ("wire_to_call", "  seen on NATS -> worker call")):
        table.add_row(f"  vip {label} p50 / p99", *(f"{split[p][part]['p50']} / {split[p][part]['p99']}" for p in phases), "")
    usage = out["usage_by_phase"]
    for name in ("dispatcher", "worker1", "nats-server", "mock"):
        table.add_row(f"CPU % of a core: {name}", *(str(usage[p].get("cpu_pct", {}).get(name)) for p in phases), "")
    table.add_row("machine load (1 min, mean)", *(str(usage[p].get("load1_mean")) for p in phases), "2 cores")
    table.add_row("vip jobs", *(str(d["n"]) for d in q), f"{args.vip} each {mark[t['every_vip_succeeded']]}")
    table.add_row("submit_many", "", "", f"{out['submit_jobs_per_s']:,} jobs/s ({out['submit_s']} s)", "")
    table.add_row("guest jobs still queued at the end", "", "", str(out["guest_queued_at_end"]),
                  f"> half {mark[t['backlog_still_queued']]}")
    console.print(table)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    console = Console(width=160)
    machine = machine_info()
    started = datetime.now(UTC)
    keys = [KeyLimit(f"k{i + 1}", args.rps, args.burst) for i in range(args.keys)]
    with LocalFleet(keys, workers=args.workers, slots=args.slots) as fleet:
        run = anyio.run(drive, args, fleet, console)
    out = analyse(args, run)
    print_report(console, args, out)
    report = {"benchmark": "backlog",
              "command": shlex.join([".venv/bin/python", "bench/backlog.py", *(sys.argv[1:] if argv is None else argv)]),
              "started_at": started.isoformat(timespec="seconds"), "machine": machine,
              "setup": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
              **out, "status_at_end": run["status"],
              "rss_samples": [{"t": s["t"], "phase": s["phase"], "rss_mb": round(s["rss_mb"], 2), "load1": s["load1"]}
                              for s in run["samples"]]}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2, default=str) + "\n")
    console.print(f"wrote {args.out}")
    return 0 if out["targets_met"] else 1


if __name__ == "__main__":
    sys.exit(main())
