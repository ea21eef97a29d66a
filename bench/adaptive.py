"""Benchmark: a fleet whose config claims more than the provider allows adapts to the real limit.

    .venv/bin/python bench/adaptive.py          # ~45 s: 2 keys really 2 req/s (burst 2), config says 20; 150 jobs
    .venv/bin/python bench/adaptive.py --jobs 300 --real-rps 2 --claimed-rps 20 --claimed-burst 5

Starts an embedded nats-server, the mock upstream enforcing --real-rps/--real-burst per key
(429 + Retry-After and x-ratelimit-* on every answer, as OpenAI does), one dispatcher and W
workers configured with --claimed-rps/--claimed-burst per key. Stores N jobs (tier normal,
batch bench-adaptive), follows every Result, and reads the mock's /_mock/stats and /_mock/log.

Measures (not a timed test: prints a table, writes bench/results/adaptive.json):
1. every job succeeded (429s are waits, not failures);
2. 429s as a share of all upstream calls; target <= 5 %;
3. throughput: successful calls per second over [first call, last successful call] at the
   upstream, against the sum of the keys' real rates; target >= 90 %;
4. each key's effective rate at the end (`ratefleet status`) against configured and real.
"""

from __future__ import annotations

import argparse
import json
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
if str(ROOT) not in sys.path:  # `python bench/adaptive.py` puts bench/ first, not the repo
    sys.path.insert(0, str(ROOT))

from ratefleet import Client  # noqa: E402
from ratefleet.localfleet import KeyLimit, LocalFleet  # noqa: E402

BATCH = "bench-adaptive"
MAX_429_SHARE = 0.05
MIN_THROUGHPUT = 0.90


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--jobs", type=int, default=150, help="jobs (default 150)")
    p.add_argument("--keys", type=int, default=2, help="API keys (default 2)")
    p.add_argument("--real-rps", type=float, default=2.0, help="req/s the mock allows per key (default 2)")
    p.add_argument("--real-burst", type=float, default=2.0, help="burst the mock allows per key (default 2)")
    p.add_argument("--claimed-rps", type=float, default=20.0, help="req/s the config claims per key (default 20)")
    p.add_argument("--claimed-burst", type=float, default=5.0, help="burst the config claims per key (default 5)")
    p.add_argument("--workers", type=int, default=2, help="worker processes (default 2)")
    p.add_argument("--no-adapt", action="store_true",
                   help="keep every key at its configured rate (dispatcher.adaptive_rate = false), for comparison")
    p.add_argument("--timeout-s", type=float, default=300.0, help="give up after this long (default 300)")
    p.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "adaptive.json", help="JSON output")
    p.add_argument("--keep-logs", type=Path, default=None, help="copy the fleet's process logs to this directory")
    return p.parse_args(argv)


def job(i: int) -> dict:
    return {"id": f"a{i:05d}", "request": {"method": "POST", "path": "/v1/chat/completions",
                                          "json": {"model": "m", "messages": [{"role": "user", "content": f"q {i}"}]}}}


async def drive(args: argparse.Namespace, fleet: LocalFleet) -> dict:
    async with await Client.connect(fleet.nats_url) as client:
        await fleet.wait_ready(client)
        started = time.monotonic()
        ids = await client.submit_many([job(i) for i in range(args.jobs)], "normal", batch=BATCH)
        results: dict = {}
        with anyio.move_on_after(args.timeout_s) as scope:
            async for result in client.results(BATCH, follow=True):
                results[result.job_id] = result
                if len(results) >= len(ids):
                    break
        elapsed = time.monotonic() - started
        status = await client.status(timeout=2.0)
    async with httpx.AsyncClient(trust_env=False, timeout=30) as http:
        stats = (await http.get(fleet.upstream + "/_mock/stats")).json()
        log = (await http.get(fleet.upstream + "/_mock/log", params={"limit": 100_000})).json()
    return {"results": results, "elapsed_s": elapsed, "timed_out": scope.cancel_called, "status": status,
            "stats": stats, "log": [row for row in log if row["path"].startswith("/v1/")]}


def analyse(args: argparse.Namespace, run: dict) -> dict:
    results, log = run["results"], run["log"]
    statuses = Counter(r.status for r in results.values())
    calls = sorted(row["t"] for row in log)
    oks = sorted(row["t"] for row in log if 200 <= row["status"] < 300)
    throttled = sum(1 for row in log if row["status"] == 429)
    window = (oks[-1] - calls[0]) if oks and calls else None
    real = args.keys * args.real_rps
    ok_rate = len(oks) / window if window else None
    keys = {}
    for key_id, k in (run["status"].get("keys") or {}).items():
        mock = run["stats"]["keys"].get(key_id, {})
        keys[key_id] = {"configured_rps": k.get("rps"), "effective_rps": k.get("effective_rps"),
                        "real_rps": args.real_rps, "calls": mock.get("calls"), "ok": mock.get("ok"),
                        "429": mock.get("rate_limited")}
    share = throttled / len(calls) if calls else None
    throughput = ok_rate / real if ok_rate else None
    max_rate_limited = max((r.attempts for r in results.values()), default=0)
    return {
        "jobs": args.jobs, "results": len(results), "statuses": dict(statuses), "timed_out": run["timed_out"],
        "upstream_calls": len(calls), "ok_calls": len(oks), "calls_429": throttled,
        "share_429": round(share, 4) if share is not None else None,
        "window_s": round(window, 2) if window else None, "ok_per_s": round(ok_rate, 3) if ok_rate else None,
        "real_rps": real, "claimed_rps": args.keys * args.claimed_rps,
        "throughput": round(throughput, 4) if throughput else None,
        "429_at_s": [round(row["t"] - calls[0], 2) for row in log if row["status"] == 429],
        "max_attempts_seen": max_rate_limited, "elapsed_s": round(run["elapsed_s"], 2), "keys": keys,
        "targets": {"all_succeeded": statuses.get("succeeded", 0) == args.jobs,
                    "share_429": share is not None and share <= MAX_429_SHARE,
                    "throughput": throughput is not None and throughput >= MIN_THROUGHPUT},
    }


def print_report(console: Console, out: dict) -> None:
    table = Table(title="adaptive key rates: config claims more than the provider allows")
    for column in ("jobs", "succeeded", "calls", "429s", "429 share", "ok calls/s", "real req/s", "throughput",
                   "window s"):
        table.add_column(column, justify="right")
    table.add_row(str(out["jobs"]), str(out["statuses"].get("succeeded", 0)), str(out["upstream_calls"]),
                  str(out["calls_429"]), f"{100 * (out['share_429'] or 0):.1f} % (≤ 5 %)",
                  str(out["ok_per_s"]), f"{out['real_rps']:g}", f"{100 * (out['throughput'] or 0):.1f} % (≥ 90 %)",
                  str(out["window_s"]))
    console.print(table)
    keys = Table("key", "configured req/s", "effective at the end", "real", "calls", "ok", "429s", title="keys")
    for key_id, k in out["keys"].items():
        keys.add_row(key_id, str(k["configured_rps"]), str(k["effective_rps"]), f"{k['real_rps']:g}",
                     str(k["calls"]), str(k["ok"]), str(k["429"]))
    console.print(keys)
    console.print(f"429s at (s after the first call): {out['429_at_s']}")
    met = all(out["targets"].values())
    console.print(f"targets: {out['targets']} -> {'met' if met else 'NOT met'}")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    console = Console(width=130)
    real = [KeyLimit(f"k{i + 1}", args.real_rps, args.real_burst) for i in range(args.keys)]
    claimed = [KeyLimit(f"k{i + 1}", args.claimed_rps, args.claimed_burst) for i in range(args.keys)]
    dispatcher = {"adaptive_rate": False} if args.no_adapt else {}
    with LocalFleet(real, workers=args.workers, claimed=claimed, dispatcher=dispatcher,
                    keep_logs=args.keep_logs) as fleet:
        run = anyio.run(drive, args, fleet)
    out = analyse(args, run)
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=ROOT).stdout.strip()
    out["command"] = " ".join(shlex.quote(a) for a in [".venv/bin/python", "bench/adaptive.py", *(argv or sys.argv[1:])])
    out["commit"] = commit or None
    out["at"] = datetime.now(UTC).isoformat(timespec="seconds")
    print_report(console, out)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(out, indent=2))
    console.print(f"wrote {args.out}")
    return 0 if all(out["targets"].values()) else 1


if __name__ == "__main__":
    raise SystemExit(main())
