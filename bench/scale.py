"""Benchmark: jobs/s with 1, 2 and 4 worker processes against a slow upstream, until the keys bind.

    .venv/bin/python bench/scale.py                 # ~2 min: 1, 2, 4 workers x 8 slots, 200 ms upstream
    .venv/bin/python bench/scale.py --quick         # ~1 min: 6 s steady window per row
    .venv/bin/python bench/scale.py --workers 1 2 3 4 --slots 8 --latency-ms 200 --keys 4 --rps 25

For each worker count W a fresh local fleet (ratefleet/localfleet.py: embedded nats-server,
the mock upstream enforcing N keys x rps, one dispatcher, W workers x S slots, configured with
the same limits) is started, the mock is told to take `--latency-ms` per call
(`/_mock/config`), and enough jobs for `--steady-s` seconds at the expected rate are stored
with `submit_many` and every Result followed. A slot is busy for the whole call, so the
fleet can carry at most W x S / latency calls/s, and the keys at most sum(rps): expected =
min(both). Measured = successful calls/s as the mock admitted them (`/_mock/log`, monotonic
arrival times) over the steady window [first call + warm-up, last call]; 429s as the mock
counted them. Prints a table, writes bench/results/scale.json (command, machine, commit).
Exit status 0 when every row has 0 x 429, every job succeeded, and the measured rate is within
[95 %, 102 %] of the keys' rate where the keys bind, [80 %, 102 %] of slots/latency where the
slots bind (a slot is also busy while the Result is stored and the next job handed out: the
table's "slot cycle ms" = slots / measured rate shows how long).
"""

from __future__ import annotations

import argparse
import json
import shlex
import statistics
import sys
import time
from collections import Counter
from datetime import UTC, datetime
from pathlib import Path

import anyio
import httpx
from rich.console import Console
from rich.table import Table

sys.path.insert(0, str(Path(__file__).resolve().parent))
from limits import ROOT, dist, machine_info  # noqa: E402

from ratefleet import Client  # noqa: E402
from ratefleet.localfleet import KeyLimit, LocalFleet  # noqa: E402
from ratefleet.schemas.internal import read_assignments  # noqa: E402

BATCH = "bench-scale"
# the keys' rate is a hard ceiling the fleet should fill; slots/latency is an upper bound, since
# a slot also stays busy while the Result is stored and until the next hand-out reaches it
KEYS_FLOOR, SLOTS_FLOOR, CEILING = 0.95, 0.80, 1.02


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workers", type=int, nargs="+", default=[1, 2, 4], help="worker counts, one fleet each (default 1 2 4)")
    p.add_argument("--slots", type=int, default=8, help="slots per worker (default 8)")
    p.add_argument("--latency-ms", type=float, default=200.0, help="upstream time per call (default 200)")
    p.add_argument("--latency-jitter-ms", type=float, default=0.0,
                   help="each call takes latency +- uniform(jitter) ms (default 0: slots that start together finish together)")
    p.add_argument("--keys", type=int, default=4, help="API keys (default 4)")
    p.add_argument("--rps", type=float, default=25.0, help="requests/s of each key (default 25)")
    p.add_argument("--burst", type=float, default=5.0, help="burst of each key (default 5)")
    p.add_argument("--safety-ms", type=float, default=None,
                   help="dispatcher.safety_ms: the part of each key's burst the fleet leaves unused to absorb "
                        "jitter between hand-out and call (default: the product default, 50)")
    p.add_argument("--steady-s", type=float, default=None, help="seconds of steady window per row (default 15; --quick 6)")
    p.add_argument("--warmup-s", type=float, default=2.0, help="start of each run left out (default 2)")
    p.add_argument("--quick", action="store_true", help="short rows (6 s steady window)")
    p.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "scale.json", help="JSON output")
    args = p.parse_args(argv)
    if args.steady_s is None:
        args.steady_s = 6.0 if args.quick else 15.0
    if min(args.workers) < 1 or args.slots < 1 or args.latency_ms <= 0 or args.keys < 1 or args.rps <= 0:
        p.error("--workers/--slots/--keys must be >= 1, --latency-ms and --rps > 0")
    return args


def expected_rate(workers: int, slots: int, latency_s: float, key_rps: float) -> tuple[float, str]:
    """min(slots in the fleet / seconds per call, the keys' total rate) in calls/s, and which binds."""
    by_slots = workers * slots / latency_s
    return (by_slots, "slots") if by_slots < key_rps else (key_rps, "keys")


def job(i: int) -> dict:
    return {"request": {"path": "/v1/chat/completions",
                        "json": {"model": "bench", "messages": [{"role": "user", "content": f"scale {i}"}]}}}


async def drive(fleet: LocalFleet, jobs: int, latency_ms: float, jitter_ms: float) -> dict:
    async with await Client.connect(fleet.nats_url, name="ratefleet-bench-scale") as client:
        await fleet.wait_ready(client)
        async with httpx.AsyncClient(trust_env=False, timeout=30) as http:
            latency = {"latency_ms": latency_ms, "latency_jitter_ms": jitter_ms}
            (await http.post(fleet.upstream + "/_mock/config", json=latency)).raise_for_status()
        handouts: dict[str, float] = {}  # job id -> queued_ms when the dispatcher handed it out

        async def on_assign(msg) -> None:
            for a in read_assignments(msg.data):  # one message may carry a dispatch pass's batch
                handouts.setdefault(a.job_id, a.queued_ms)

        trace = await client.nc.subscribe(f"{client.subjects.prefix}.internal.assign.*", cb=on_assign,
                                          pending_msgs_limit=0)
        started = time.monotonic()
        await client.submit_many([job(i) for i in range(jobs)], "normal", batch=BATCH)
        stored_s = time.monotonic() - started
        statuses: Counter[str] = Counter()
        seen: set[str] = set()
        upstream_ms: list[float] = []
        hops: list[float] = []
        with anyio.move_on_after(max(120.0, jobs / 5)):
            async for result in client.results(BATCH, follow=True):
                if result.job_id not in seen:
                    seen.add(result.job_id)
                    statuses[result.status] += 1
                    if result.timings.upstream_ms is not None:
                        upstream_ms.append(result.timings.upstream_ms)
                    if result.job_id in handouts and result.timings.queued_ms is not None:
                        hops.append(result.timings.queued_ms - handouts[result.job_id])
                if len(seen) >= jobs:
                    break
        elapsed = time.monotonic() - started
        await trace.unsubscribe()
        async with httpx.AsyncClient(trust_env=False, timeout=30) as http:
            stats = (await http.get(fleet.upstream + "/_mock/stats")).json()
            log = (await http.get(fleet.upstream + "/_mock/log", params={"limit": jobs * 3 + 100})).json()
    return {"statuses": dict(statuses), "call_ms_mean": statistics.fmean(upstream_ms) if upstream_ms else None,
            "handout_to_call_ms_mean": statistics.fmean(hops) if hops else None,
            "handout_to_call_ms": dist(hops), "call_ms": dist(upstream_ms), "stored_s": stored_s, "elapsed_s": elapsed,
            "stats": stats, "log": log}


def measure(run: dict, warmup_s: float) -> dict:
    """Calls/s the mock admitted over [first call + warm-up, last call], and its 429 count."""
    calls = sorted((row["t"], row["status"]) for row in run["log"] if row["path"].startswith("/v1/"))
    keys = run["stats"].get("keys", {})
    out = {"calls": len(calls), "rate_limited_429": sum(k["rate_limited"] for k in keys.values()),
           "max_in_flight_per_key": {kid: k["max_in_flight"] for kid, k in sorted(keys.items())}}
    if len(calls) < 2:
        return {**out, "measured_rps": None}
    start, end = calls[0][0] + warmup_s, calls[-1][0]
    ok = [t for t, status in calls if start <= t <= end and 200 <= status < 300]
    span = end - start
    per_second = Counter(int(t - start) for t in ok if t - start < int(span))
    return {**out, "window_s": round(span, 2), "ok_in_window": len(ok),
            "measured_rps": round(len(ok) / span, 2) if span > 0 else None,
            "ok_per_second": {"min": min(per_second.values(), default=None),
                              "max": max(per_second.values(), default=None)}}


def slot_cycle(slots: int, rate: float | None, call_ms: float | None, hop_ms: float | None) -> dict:
    """How long one slot is busy per job (slots / measured rate, ms), split into the hand-out
    reaching the worker, the call (worker-measured), and the rest: storing the Result, acking,
    the outcome report and the dispatcher's next hand-out (means, so the parts add up)."""
    cycle = slots * 1000 / rate if rate else None
    rest = None if None in (cycle, call_ms, hop_ms) else cycle - call_ms - hop_ms
    return {"slot_cycle_ms": None if cycle is None else round(cycle, 1),
            "handout_to_call_ms": None if hop_ms is None else round(hop_ms, 1),
            "call_ms": None if call_ms is None else round(call_ms, 1),
            "after_call_ms": None if rest is None else round(rest, 1)}


def run_row(args: argparse.Namespace, workers: int, console: Console) -> dict:
    keys = [KeyLimit(f"k{i + 1}", args.rps, args.burst) for i in range(args.keys)]
    expected, binds = expected_rate(workers, args.slots, args.latency_ms / 1000, args.keys * args.rps)
    jobs = int(expected * (args.steady_s + args.warmup_s + 1))
    console.print(f"{workers} worker(s) x {args.slots} slots: {jobs} jobs, expected {expected:g} calls/s ({binds} bind)")
    dispatcher = {} if args.safety_ms is None else {"safety_ms": args.safety_ms}
    with LocalFleet(keys, workers=workers, slots=args.slots, dispatcher=dispatcher) as fleet:
        run = anyio.run(drive, fleet, jobs, args.latency_ms, args.latency_jitter_ms)
    got = measure(run, args.warmup_s)
    rate = got["measured_rps"]
    floor = KEYS_FLOOR if binds == "keys" else SLOTS_FLOOR
    ok = (rate is not None and floor * expected <= rate <= CEILING * expected and got["rate_limited_429"] == 0
          and run["statuses"].get("succeeded", 0) == jobs)
    return {"workers": workers, "slots": args.slots, "total_slots": workers * args.slots, "jobs": jobs,
            "expected_rps": round(expected, 2), "binds": binds, **got, "statuses": run["statuses"],
            **slot_cycle(workers * args.slots, rate, run["call_ms_mean"], run["handout_to_call_ms_mean"]),
            "submit_s": round(run["stored_s"], 2), "elapsed_s": round(run["elapsed_s"], 2),
            "handout_to_call_ms_dist": run["handout_to_call_ms"], "call_ms_dist": run["call_ms"],
            "of_expected": round(rate / expected, 3) if rate else None, "met": ok}


def print_table(console: Console, args: argparse.Namespace, rows: list[dict]) -> None:
    table = Table("workers", "slots", "expected calls/s", "binds", "measured calls/s", "of expected", "vs first row",
                  "per-second min/max",
                  "429s", "slot cycle ms = hand-out->call + call + after", "jobs ok", "met",
                  title=f"ratefleet scale: {args.keys} keys x {args.rps:g} req/s, upstream {args.latency_ms:g} ms/call")
    base = rows[0]["measured_rps"] if rows else None
    for r in rows:
        per_s = r.get("ok_per_second") or {}
        table.add_row(str(r["workers"]), f"{r['workers']} x {r['slots']}", f"{r['expected_rps']:g}", r["binds"],
                      "-" if r["measured_rps"] is None else f"{r['measured_rps']:.1f}",
                      "-" if r["of_expected"] is None else f"{r['of_expected'] * 100:.0f} %",
                      f"x {r['measured_rps'] / base:.2f}" if base and r["measured_rps"] else "-",
                      f"{per_s.get('min')}/{per_s.get('max')}", str(r["rate_limited_429"]),
                      f"{r['slot_cycle_ms']} = {r['handout_to_call_ms']} + {r['call_ms']} + {r['after_call_ms']}",
                      f"{r['statuses'].get('succeeded', 0)}/{r['jobs']}",
                      "[green]yes[/green]" if r["met"] else "[red]NO[/red]")
    console.print(table)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    console = Console(width=160)
    machine = machine_info()
    started = datetime.now(UTC)
    rows = [run_row(args, workers, console) for workers in args.workers]
    print_table(console, args, rows)
    report = {"benchmark": "scale",
              "command": shlex.join([".venv/bin/python", "bench/scale.py", *(sys.argv[1:] if argv is None else argv)]),
              "started_at": started.isoformat(timespec="seconds"), "machine": machine,
              "setup": {"keys": args.keys, "rps": args.rps, "burst": args.burst, "slots": args.slots,
                        "latency_ms": args.latency_ms, "latency_jitter_ms": args.latency_jitter_ms, "safety_ms": args.safety_ms,
                        "steady_s": args.steady_s, "warmup_s": args.warmup_s},
              "rows": rows, "targets_met": all(r["met"] for r in rows)}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    console.print(f"wrote {args.out}")
    return 0 if report["targets_met"] else 1


if __name__ == "__main__":
    sys.exit(main())
