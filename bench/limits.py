"""Benchmark: how close ratefleet runs to its keys' limits, and how fast vip jobs get through.

    .venv/bin/python bench/limits.py            # ~35-45 s: 4 keys x 25 req/s, 3000 guest + 200 vip jobs
    .venv/bin/python bench/limits.py --quick    # ~15 s
    .venv/bin/python bench/limits.py --keys 4 --rps 25 --burst 5 --guest-jobs 3000 --vip-jobs 200

Starts an embedded nats-server, the mock upstream (its own process, N keys with rps/burst),
one dispatcher and W worker processes configured with the SAME limits. Submits a guest
flood (batch bench-guest, tier guest), then vip jobs (batch bench-vip, tier vip) one every
--vip-interval-ms while the flood is still queued, collects every Result with
`Client.results(batch, follow=True)` and reads the mock's /_mock/stats and /_mock/log.

Measures (not a timed test: prints a table, writes bench/results/limits.json):
1. utilization: successful calls/s at the upstream over the steady window
   [first call + warmup, last call] (mock timestamps) / sum(rps); target >= 98 %.
2. 429s counted by the mock; target 0.
3. queue wait (Result.timings.queued_ms) of vip jobs (p50/p99) under the guest flood, and
   the guest p50; target vip p99 <= token interval (1/sum(rps)) + 20 ms.
It also listens (read only) to the dispatcher's assignments on `<prefix>.internal.assign.*`
to split each vip wait into "until the dispatcher handed it out" and "hand-out to the
worker's call", and to see how evenly the fleet spends the aggregate rate (the gaps between
hand-outs: the wait for "the next free token of any key" as the fleet sees it).
"""

from __future__ import annotations

import argparse
import bisect
import json
import math
import os
import platform
import random
import shlex
import subprocess
import sys
import time
from collections import Counter
from datetime import UTC, datetime
from pathlib import Path

import anyio
import httpx
from rich.console import Console
from rich.table import Table

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # `python bench/limits.py` puts bench/ first, not the repo
    sys.path.insert(0, str(ROOT))

from ratefleet import Client  # noqa: E402
from ratefleet.localfleet import KeyLimit, LocalFleet  # noqa: E402
from ratefleet.runtime.embedded import nats_server_binary  # noqa: E402
from ratefleet.schemas.internal import read_assignments  # noqa: E402

GUEST_BATCH, VIP_BATCH = "bench-guest", "bench-vip"
UTIL_TARGET = 0.98
VIP_SLACK_MS = 20.0


# -- arguments ----------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="small run (~15 s): 1000 guest + 60 vip jobs, 1 s warm-up")
    p.add_argument("--keys", type=int, default=4, help="number of API keys (default 4)")
    p.add_argument("--rps", type=float, default=25.0, help="requests/s of each key (default 25)")
    p.add_argument("--burst", type=float, default=5.0, help="burst of each key (default 5)")
    p.add_argument("--guest-jobs", type=int, default=None, help="guest flood size (default 3000; --quick 1000)")
    p.add_argument("--vip-jobs", type=int, default=None, help="vip jobs (default 200; --quick 60)")
    p.add_argument("--vip-interval-ms", type=float, default=100.0, help="one vip job every N ms (default 100)")
    p.add_argument("--vip-jitter", type=float, default=0.5,
                   help="each gap between vip jobs is interval x uniform(1-j, 1+j), so arrivals sample every phase "
                        "of the token schedule (default 0.5; 0 = exactly periodic)")
    p.add_argument("--seed", type=int, default=1, help="seed of the vip arrival jitter (default 1)")
    p.add_argument("--vip-delay-s", type=float, default=None,
                   help="first vip job this long after the flood is stored (default: the warm-up)")
    p.add_argument("--warmup-s", type=float, default=None, help="start of the run left out of utilization (default 2; --quick 1)")
    p.add_argument("--workers", type=int, default=2, help="worker processes (default 2)")
    p.add_argument("--slots", type=int, default=32, help="slots per worker (default 32)")
    p.add_argument("--policy", choices=["weighted", "strict"], default=None,
                   help="dispatcher tier policy (default: the product default)")
    p.add_argument("--no-trace", action="store_true", help="do not listen to the dispatcher's assignments")
    p.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "limits.json", help="JSON output")
    p.add_argument("--raw", type=Path, default=None,
                   help="also write the raw data (mock log, traced assignments, vip results) to this JSON file")
    p.add_argument("--keep-logs", type=Path, default=None, help="copy the fleet's process logs to this directory")
    args = p.parse_args(argv)
    if args.guest_jobs is None:
        args.guest_jobs = 1000 if args.quick else 3000
    if args.vip_jobs is None:
        args.vip_jobs = 60 if args.quick else 200
    if args.warmup_s is None:
        args.warmup_s = 1.0 if args.quick else 2.0
    if args.vip_delay_s is None:
        args.vip_delay_s = args.warmup_s
    if args.keys < 1 or args.rps <= 0 or args.burst < 1 or args.guest_jobs < 1 or args.vip_jobs < 1:
        p.error("--keys, --guest-jobs and --vip-jobs must be >= 1, --rps > 0, --burst >= 1")
    return args


# -- statistics ---------------------------------------------------------------------------


def pct(values: list[float], q: float) -> float | None:
    """Nearest-rank percentile (q in 0..1); None for no values."""
    if not values:
        return None
    ordered = sorted(values)
    rank = max(1, math.ceil(q * len(ordered) - 1e-9))
    return ordered[min(len(ordered), rank) - 1]


def rnd(value: float | None, digits: int = 1) -> float | None:
    return None if value is None else round(value, digits)


def dist(values: list[float]) -> dict:
    return {"n": len(values), "p50": rnd(pct(values, 0.5)), "p90": rnd(pct(values, 0.9)),
            "p99": rnd(pct(values, 0.99)), "max": rnd(max(values) if values else None)}


def residual_waits(times: list[float], start: float, end: float, samples: int = 20000) -> list[float]:
    """For instants spread evenly over [start, end): seconds until the next time in `times`."""
    ordered = sorted(times)
    waits = []
    rng = random.Random(1)
    for _ in range(samples):
        t = rng.uniform(start, end)
        i = bisect.bisect_right(ordered, t)
        if i < len(ordered):
            waits.append(ordered[i] - t)
    return waits


def clusters(times: list[float], within: float = 0.002) -> list[int]:
    """Sizes of groups of times closer than `within` seconds to the previous one."""
    sizes: list[int] = []
    last = None
    for t in sorted(times):
        if last is not None and t - last <= within:
            sizes[-1] += 1
        else:
            sizes.append(1)
        last = t
    return sizes


# -- machine ------------------------------------------------------------------------------


def machine_info() -> dict:
    def run(*cmd: str) -> str | None:
        try:
            return subprocess.run(cmd, capture_output=True, text=True, timeout=5, cwd=ROOT).stdout.strip() or None
        except Exception:  # noqa: BLE001 - informational only
            return None

    try:
        affinity = len(os.sched_getaffinity(0))
    except AttributeError:
        affinity = None
    cpu_model = None
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu_model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {"nproc": affinity or os.cpu_count(), "cpu_count": os.cpu_count(), "cpu_model": cpu_model,
            "python": platform.python_version(), "implementation": platform.python_implementation(),
            "platform": platform.platform(), "loadavg_at_start": list(os.getloadavg()),
            "nats_server": run(nats_server_binary(), "--version"),
            "git_commit": run("git", "rev-parse", "--short", "HEAD"),
            "git_dirty": bool(run("git", "status", "--porcelain", "--untracked-files=no"))}


def cpu_seconds(pid: int) -> float | None:
    """User + system CPU seconds of a process so far (Linux /proc)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, IndexError, ValueError):
        return None


def fleet_pids(fleet: LocalFleet) -> dict[str, int]:
    pids = {p.fleet_name: p.pid for p in fleet.procs}  # type: ignore[attr-defined]
    if fleet._nats is not None and fleet._nats.process is not None:
        pids["nats-server"] = fleet._nats.process.pid
    pids["bench (this process)"] = os.getpid()
    return pids


# -- the run ------------------------------------------------------------------------------


def job(i: int, tier: str) -> dict:
    return {"request": {"path": "/v1/chat/completions",
                        "json": {"model": "bench", "messages": [{"role": "user", "content": f"{tier} {i}"}]}},
            "metadata": {"n": i}}


async def drive(args: argparse.Namespace, fleet: LocalFleet, console: Console) -> dict:
    expected = {GUEST_BATCH: args.guest_jobs, VIP_BATCH: args.vip_jobs}
    results: dict[str, dict] = {b: {} for b in expected}
    assignments: list[dict] = []
    aggregate = args.keys * args.rps
    drain_s = (args.guest_jobs + args.vip_jobs) / aggregate
    interval = args.vip_interval_ms / 1000
    spread = args.vip_delay_s + (args.vip_jobs - 1) * interval
    if spread > 0.9 * drain_s:
        interval = max(0.001, (0.9 * drain_s - args.vip_delay_s) / max(1, args.vip_jobs - 1))
        console.print(f"[yellow]vip jobs would outlast the flood; one every {interval * 1000:.0f} ms instead[/yellow]")
    async with await Client.connect(fleet.nats_url, name="ratefleet-bench") as client:
        await fleet.wait_ready(client)
        pids = fleet_pids(fleet)
        cpu_before = {name: cpu_seconds(pid) for name, pid in pids.items()}

        async def on_assign(msg) -> None:
            seen_at = time.time()
            for a in read_assignments(msg.data):  # one message may carry a dispatch pass's batch
                assignments.append({"job_id": a.job_id, "tier": a.tier, "key_id": a.key_id, "attempt": a.attempt,
                                    "submitted_at": a.submitted_at, "queued_ms": a.queued_ms, "seen_at": seen_at})

        trace = None
        if not args.no_trace:
            trace = await client.nc.subscribe(f"{client.subjects.prefix}.internal.assign.*", cb=on_assign,
                                              pending_msgs_limit=0)

        async def follow(batch: str) -> None:
            async for result in client.results(batch, follow=True):
                results[batch].setdefault(result.job_id, result)
                if len(results[batch]) >= expected[batch]:
                    return

        vip_sent: list[float] = []

        rng = random.Random(args.seed)
        jitter = min(1.0, max(0.0, args.vip_jitter))
        offsets = [args.vip_delay_s]
        for _ in range(args.vip_jobs - 1):
            offsets.append(offsets[-1] + interval * rng.uniform(1 - jitter, 1 + jitter))

        async def vips(t0: float) -> None:
            for i in range(args.vip_jobs):
                await anyio.sleep(max(0.0, t0 + offsets[i] - time.monotonic()))
                await client.submit(job(i, "vip"), "vip", batch=VIP_BATCH)
                vip_sent.append(time.monotonic())

        timeout = drain_s * 2 + 30
        started = time.monotonic()
        started_wall = time.time()
        with anyio.move_on_after(timeout) as scope:
            async with anyio.create_task_group() as tg:
                for batch in expected:
                    tg.start_soon(follow, batch)
                console.print(f"submitting {args.guest_jobs} guest jobs, then {args.vip_jobs} vip jobs one every "
                              f"{interval * 1000:.0f} ms; expect ~{drain_s:.0f} s at {aggregate:g} req/s")
                await client.submit_many([job(i, "guest") for i in range(args.guest_jobs)], "guest", batch=GUEST_BATCH)
                flood_stored = time.monotonic() - started
                tg.start_soon(vips, time.monotonic())
                while any(len(results[b]) < n for b, n in expected.items()):
                    await anyio.sleep(0.1)
                tg.cancel_scope.cancel()
        elapsed = time.monotonic() - started
        cpu_after = {name: cpu_seconds(pid) for name, pid in pids.items()}
        if trace is not None:
            await trace.unsubscribe()
        try:
            status = await client.status(timeout=2.0)
        except Exception:  # noqa: BLE001 - informational
            status = None
    async with httpx.AsyncClient(trust_env=False, timeout=30) as http:
        stats = (await http.get(fleet.upstream + "/_mock/stats")).json()
        limit = (args.guest_jobs + args.vip_jobs) * 3 + 1000
        log = (await http.get(fleet.upstream + "/_mock/log", params={"limit": limit})).json()
    clock_offset = time.time() - time.monotonic()  # mock log times are CLOCK_MONOTONIC, like ours
    cpu = {name: (round(cpu_after[name] - cpu_before[name], 2) if cpu_after.get(name) is not None
                  and cpu_before.get(name) is not None else None) for name in pids}
    return {"results": results, "assignments": assignments, "stats": stats, "log": log, "status": status,
            "elapsed_s": elapsed, "timed_out": scope.cancel_called, "flood_stored_s": flood_stored,
            "started_wall": started_wall, "clock_offset": clock_offset, "vip_interval_s": interval,
            "cpu_s": cpu, "aggregate": aggregate}


# -- analysis -----------------------------------------------------------------------------


def analyse(args: argparse.Namespace, run: dict) -> dict:
    aggregate = run["aggregate"]
    token_interval_ms = 1000.0 / aggregate
    results = run["results"]
    guests, vips = list(results[GUEST_BATCH].values()), list(results[VIP_BATCH].values())
    statuses = Counter(r.status for r in guests + vips)
    log = [row for row in run["log"] if row["path"].startswith("/v1/")]
    calls = sorted(row["t"] for row in log)
    ok_times = sorted(row["t"] for row in log if 200 <= row["status"] < 300)
    out: dict = {"jobs": {"guest": args.guest_jobs, "vip": args.vip_jobs, "results": len(guests) + len(vips),
                          "by_status": dict(statuses)},
                 "duration_s": round(run["elapsed_s"], 2), "timed_out": run["timed_out"],
                 "flood_stored_s": round(run["flood_stored_s"], 2),
                 "vip_interval_ms": round(run["vip_interval_s"] * 1000, 1),
                 "configured_rps": aggregate, "token_interval_ms": round(token_interval_ms, 2)}

    # 1. utilization over the steady window
    if calls:
        t_first, t_last = calls[0], calls[-1]
        start = t_first + args.warmup_s
        in_window = [t for t in ok_times if start <= t <= t_last]
        span = t_last - start
        achieved = len(in_window) / span if span > 0 else None
        out["calls"] = {"total": len(calls), "ok": len(ok_times), "first_to_last_s": round(t_last - t_first, 3),
                        "window_s": round(span, 3), "ok_in_window": len(in_window)}
        out["achieved_ok_rps"] = rnd(achieved, 2)
        out["utilization"] = rnd(achieved / aggregate, 4) if achieved else None
        per_second = Counter(int(t - start) for t in in_window if t - start < int(span))
        out["ok_per_second_in_window"] = {"min": min(per_second.values(), default=None),
                                          "max": max(per_second.values(), default=None)}
    else:
        out["achieved_ok_rps"] = out["utilization"] = None

    # 2. 429s as the upstream counted them
    keys = run["stats"].get("keys", {})
    out["rate_limited_429"] = sum(k["rate_limited"] for k in keys.values())
    out["per_key"] = {kid: {"calls": k["calls"], "ok": k["ok"], "429": k["rate_limited"], "errors": k["errors"],
                            "max_in_flight": k["max_in_flight"]} for kid, k in sorted(keys.items())}

    # 3. queue waits
    def waits(rs):
        return [r.timings.queued_ms for r in rs if r.timings.queued_ms is not None]

    vip_w, guest_w = waits(vips), waits(guests)
    out["vip_queued_ms"] = dist(vip_w)
    out["guest_queued_ms"] = dist(guest_w)
    out["vip_target_ms"] = round(token_interval_ms + VIP_SLACK_MS, 2)

    # how the fleet spends the aggregate rate, and where each vip wait goes
    out["diagnosis"] = diagnose(args, run, vips, calls)

    util, p99 = out.get("utilization"), out["vip_queued_ms"]["p99"]
    out["targets"] = {
        "utilization_ge_98pct": util is not None and util >= UTIL_TARGET,
        "no_429": out["rate_limited_429"] == 0,
        "vip_p99_le_token_interval_plus_20ms": p99 is not None and p99 <= out["vip_target_ms"],
        "every_job_succeeded": statuses.get("succeeded", 0) == args.guest_jobs + args.vip_jobs,
    }
    out["targets_met"] = all(out["targets"].values())
    return out


def diagnose(args: argparse.Namespace, run: dict, vips: list, calls: list[float]) -> dict:
    diag: dict = {}
    offset = run["clock_offset"]
    if calls:
        start, end = calls[0] + args.warmup_s, calls[-1]
        steady = [t for t in calls if start <= t <= end]
        gaps = [(b - a) * 1000 for a, b in zip(steady, steady[1:])]
        sizes = clusters(steady)
        diag["upstream_arrivals"] = {
            "what": "calls as the mock saw them arrive (steady window): gaps between consecutive calls of any key, "
                    "and calls arriving within 2 ms of each other counted as one group",
            "gap_ms": dist(gaps), "groups_per_s": rnd(len(sizes) / (end - start), 1) if end > start else None,
            "group_size": dict(sorted(Counter(sizes).items())),
            "next_call_wait_ms": dist([w * 1000 for w in residual_waits(steady, start, end)]),
        }
    trace = run["assignments"]
    if not trace:
        return diag
    handouts = sorted((a["submitted_at"] + a["queued_ms"] / 1000, a) for a in trace)
    times = [t for t, _ in handouts]
    if calls:
        w_start, w_end = calls[0] + args.warmup_s + offset, calls[-1] + offset
        steady_h = [t for t in times if w_start <= t <= w_end]
        sizes = clusters(steady_h)
        diag["dispatcher_handouts"] = {
            "what": "the dispatcher's hand-outs (assignment time = submitted_at + queued_ms): the wait from a random "
                    "instant to the next hand-out is the wait for 'the next free token of any key' as the fleet sees it",
            "gap_ms": dist([(b - a) * 1000 for a, b in zip(steady_h, steady_h[1:])]),
            "groups_per_s": rnd(len(sizes) / (w_end - w_start), 1) if w_end > w_start else None,
            "group_size": dict(sorted(Counter(sizes).items())),
            "next_token_wait_ms": dist([w * 1000 for w in residual_waits(steady_h, w_start, w_end)]),
        }
    phases = key_phases(args, trace)
    if phases:
        diag["key_phase_ms"] = {
            "what": f"when each key's hand-outs fall within its {1000 / args.rps:g} ms period (circular mean, relative "
                    "to k1; spread = circular std): evenly spread keys are 1/sum(rps) apart, keys with the same phase "
                    "are spent in lockstep and leave longer gaps",
            **phases}
    by_job = {}
    for a in trace:
        by_job.setdefault(a["job_id"], a)  # first attempt
    dispatch, hop, next_token, overtaken = [], [], [], []
    for r in vips:
        a = by_job.get(r.job_id)
        if a is None or r.timings.queued_ms is None:
            continue
        dispatch.append(a["queued_ms"])
        hop.append(r.timings.queued_ms - a["queued_ms"])
        sub = a["submitted_at"]
        own = sub + a["queued_ms"] / 1000
        i = bisect.bisect_right(times, sub)
        if i < len(times):
            next_token.append((times[i] - sub) * 1000)
        # guest hand-outs after the vip job was stored (+2 ms for the dispatcher to receive it) and before its own
        lo, hi = bisect.bisect_right(times, sub + 0.002), bisect.bisect_left(times, own)
        overtaken.append(sum(1 for _, b in handouts[lo:hi] if b["tier"] != "vip"))
    diag["vip_split_ms"] = {
        "what": "each vip queued_ms split into: stored in JetStream -> handed out by the dispatcher (intake, "
                "tier order, waiting for a key token) and handed out -> the worker starts the call (NATS hop, "
                "worker parse and task start); next_handout = stored -> the next hand-out of ANY job",
        "stored_to_handout": dist(dispatch), "handout_to_call": dist(hop), "stored_to_next_handout_any_job": dist(next_token),
        "guest_handouts_overtaking_vip": {"jobs_overtaken": sum(1 for n in overtaken if n), "max": max(overtaken, default=0)},
    }
    diag["cpu_s"] = run["cpu_s"]
    return diag


def key_phases(args: argparse.Namespace, trace: list[dict]) -> dict:
    """Per key: the circular mean (and spread) of its hand-out times modulo its period 1/rps."""
    period = 1.0 / args.rps
    per_key: dict[str, list[float]] = {}
    for a in trace:
        per_key.setdefault(a["key_id"], []).append(a["submitted_at"] + a["queued_ms"] / 1000)
    if not per_key:
        return {}
    ref = min(min(v) for v in per_key.values())
    raw = {}
    for key_id, times in per_key.items():
        times = sorted(times)[len(times) // 10:]  # leave out the start-up burst
        angles = [2 * math.pi * (((t - ref) % period) / period) for t in times]
        c, s = sum(map(math.cos, angles)) / len(angles), sum(map(math.sin, angles)) / len(angles)
        r = max(1e-12, min(1.0, math.hypot(c, s)))
        raw[key_id] = (math.atan2(s, c), math.sqrt(-2 * math.log(r)))
    base = raw.get("k1", next(iter(raw.values())))[0]
    return {key_id: {"phase": round(((angle - base) % (2 * math.pi)) / (2 * math.pi) * period * 1000, 1),
                     "spread": round(spread / (2 * math.pi) * period * 1000, 1)}
            for key_id, (angle, spread) in sorted(raw.items())}


# -- output -------------------------------------------------------------------------------


def fmt(value, unit: str = "", digits: int = 1) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.{digits}f}{unit}"
    return f"{value}{unit}"


def yes(flag: bool) -> str:
    return "[green]yes[/green]" if flag else "[red]NO[/red]"


def print_report(console: Console, args: argparse.Namespace, out: dict) -> None:
    t = out["targets"]
    table = Table("metric", "value", "target", "met", title="ratefleet limits benchmark")
    table.add_row("keys", f"{args.keys} x {args.rps:g} req/s, burst {args.burst:g}", "", "")
    table.add_row("configured aggregate rps", fmt(out["configured_rps"], digits=0), "", "")
    table.add_row("jobs (guest + vip)", f"{args.guest_jobs} + {args.vip_jobs}",
                  "all succeeded", yes(t["every_job_succeeded"]))
    table.add_row("duration (submit -> last result)", fmt(out["duration_s"], " s"), "", "")
    table.add_row("achieved ok calls/s (steady)", fmt(out["achieved_ok_rps"], digits=2), "", "")
    util = out["utilization"]
    table.add_row("utilization", fmt(util * 100 if util is not None else None, " %", 2), ">= 98 %",
                  yes(t["utilization_ge_98pct"]))
    table.add_row("429s (mock)", str(out["rate_limited_429"]), "0", yes(t["no_429"]))
    vq, gq = out["vip_queued_ms"], out["guest_queued_ms"]
    table.add_row("vip queued p50 / p99", f"{fmt(vq['p50'])} / {fmt(vq['p99'])} ms",
                  f"p99 <= {out['vip_target_ms']:.0f} ms", yes(t["vip_p99_le_token_interval_plus_20ms"]))
    table.add_row("guest queued p50", fmt(gq["p50"], " ms"), "", "")
    table.add_row("token interval (1/sum rps)", fmt(out["token_interval_ms"], " ms", 2), "", "")
    table.add_row("targets met", "", "", yes(out["targets_met"]))
    console.print(table)

    diag = out["diagnosis"]
    view = Table("where the time goes", "n", "p50 ms", "p90 ms", "p99 ms", "max ms", title="diagnosis")

    def row(label: str, d: dict | None) -> None:
        if d:
            view.add_row(label, str(d["n"]), fmt(d["p50"]), fmt(d["p90"]), fmt(d["p99"]), fmt(d["max"]))

    split = diag.get("vip_split_ms", {})
    row("vip: stored -> dispatcher hand-out", split.get("stored_to_handout"))
    row("vip: hand-out -> worker call", split.get("handout_to_call"))
    row("vip: stored -> next hand-out (any job)", split.get("stored_to_next_handout_any_job"))
    hand = diag.get("dispatcher_handouts", {})
    row("hand-outs: gap between consecutive", hand.get("gap_ms"))
    row("hand-outs: random instant -> next", hand.get("next_token_wait_ms"))
    arr = diag.get("upstream_arrivals", {})
    row("mock arrivals: gap between consecutive", arr.get("gap_ms"))
    console.print(view)
    if hand:
        console.print(f"hand-out groups (within 2 ms) per s: {hand['groups_per_s']} (ideal {out['configured_rps']:g}); "
                      f"group sizes: {hand['group_size']}")
    phases = diag.get("key_phase_ms")
    if phases:
        keys = {k: v for k, v in phases.items() if isinstance(v, dict)}
        console.print(f"key phases within the {1000 / args.rps:g} ms period (ideal: {1000 / out['configured_rps']:g} ms apart): "
                      + ", ".join(f"{k} {v['phase']:.1f}±{v['spread']:.1f}" for k, v in keys.items()))
    if split:
        over = split["guest_handouts_overtaking_vip"]
        console.print(f"vip jobs overtaken by a guest hand-out: {over['jobs_overtaken']} (max {over['max']} each)")
    console.print(f"CPU seconds during the run: {diag.get('cpu_s')}")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    console = Console()
    machine = machine_info()
    keys = [KeyLimit(f"k{i + 1}", args.rps, args.burst) for i in range(args.keys)]
    dispatcher = {"policy": args.policy} if args.policy else {}
    wall_start = datetime.now(UTC)
    with LocalFleet(keys, workers=args.workers, slots=args.slots, dispatcher=dispatcher,
                    keep_logs=args.keep_logs) as fleet:
        run = anyio.run(drive, args, fleet, console)
        fleet_config = fleet.config()
    out = analyse(args, run)
    print_report(console, args, out)
    for pool in fleet_config.get("pools", {}).values():
        for key in pool["keys"]:
            key["secret"] = key["secret"].split(":", 1)[0] + ":..."
    report = {
        "benchmark": "limits",
        "command": shlex.join([".venv/bin/python", "bench/limits.py", *(sys.argv[1:] if argv is None else argv)]),
        "started_at": wall_start.isoformat(timespec="seconds"),
        "machine": machine,
        "setup": {"keys": [vars(k) for k in keys], "workers": args.workers, "slots": args.slots,
                  "guest_jobs": args.guest_jobs, "vip_jobs": args.vip_jobs, "vip_interval_ms": args.vip_interval_ms,
                  "vip_delay_s": args.vip_delay_s, "vip_jitter": args.vip_jitter, "seed": args.seed,
                  "warmup_s": args.warmup_s, "trace": not args.no_trace,
                  "fleet_config": fleet_config},
        **out,
        "fleet_status_at_end": run["status"],
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2, default=str) + "\n")
    if args.raw is not None:
        raw = {"clock_offset": run["clock_offset"], "mock_log": run["log"], "assignments": run["assignments"],
               "vip_results": [r.model_dump(mode="json", by_alias=True) for r in run["results"][VIP_BATCH].values()]}
        args.raw.parent.mkdir(parents=True, exist_ok=True)
        args.raw.write_text(json.dumps(raw) + "\n")
        console.print(f"wrote {args.raw}")
    console.print(f"wrote {args.out}")
    return 0 if out["targets_met"] else 1


if __name__ == "__main__":
    sys.exit(main())
