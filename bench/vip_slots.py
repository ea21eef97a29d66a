"""Top-tier latency while slow calls of a bulk tier fill every worker slot, with and without the
slot reserve (`dispatcher.priority_slots`).

One local fleet per setting (bench/../ratefleet/localfleet.py: embedded nats-server, the mock
upstream, 1 dispatcher, 1 worker x `--slots`, 2 keys far above the load). `--guest` guest jobs
whose calls take `--call-ms` each are stored first (they fill every slot, started together, so
they end together); after the first wave is under way, `--vip` vip requests are sent one at a
time, `--gap-s` apart (`Client.request`, fast calls). Prints each setting's vip latency (p50,
max, ms) and writes bench/results/vip_slots.json.

Run: .venv/bin/python bench/vip_slots.py [--slots 32] [--guest 300] [--call-ms 3000] [--vip 12]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import time
from pathlib import Path

from rich.console import Console
from rich.table import Table

from ratefleet.client import Client
from ratefleet.localfleet import KeyLimit, LocalFleet

FAST = {"request": {"path": "/v1/chat/completions", "json": {"model": "m", "messages": []}}}


async def measure(fleet: LocalFleet, args: argparse.Namespace) -> list[float]:
    slow = {"request": {"path": "/v1/chat/completions",
                        "json": {"model": "m", "messages": [], "mock": {"sleep_ms": args.call_ms}}}}
    async with await Client.connect(fleet.nats_url) as client:
        await fleet.wait_ready(client)
        await client.submit_many([dict(slow) for _ in range(args.guest)], "guest", batch="flood")
        await asyncio.sleep(args.call_ms / 1000 * 1.5)  # the first wave ended, the second is under way
        waits = []
        for _ in range(args.vip):
            started = time.monotonic()
            result = await client.request(dict(FAST), "vip", timeout=60)
            if result.status != "succeeded":
                raise RuntimeError(f"a vip request ended {result.status}: {result.error}")
            waits.append((time.monotonic() - started) * 1000)
            await asyncio.sleep(args.gap_s)
        return waits


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--slots", type=int, default=32)
    parser.add_argument("--guest", type=int, default=300)
    parser.add_argument("--call-ms", type=int, default=3000)
    parser.add_argument("--vip", type=int, default=12)
    parser.add_argument("--gap-s", type=float, default=0.37)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "vip_slots.json")
    args = parser.parse_args()
    rows = []
    for reserve in (0, 1):
        fleet = LocalFleet([KeyLimit("k1", 1000, 100), KeyLimit("k2", 1000, 100)], workers=1, slots=args.slots,
                           dispatcher={"priority_slots": reserve})
        with fleet:
            waits = sorted(asyncio.run(measure(fleet, args)))
        rows.append({"priority_slots": reserve, "vip_p50_ms": round(statistics.median(waits), 1),
                     "vip_max_ms": round(waits[-1], 1), "vip_ms": [round(w, 1) for w in waits]})
    table = Table(title=f"vip requests while {args.guest} guest calls of {args.call_ms} ms fill {args.slots} slots")
    for column in ("priority_slots", "vip p50 ms", "vip max ms"):
        table.add_column(column)
    for row in rows:
        table.add_row(str(row["priority_slots"]), f"{row['vip_p50_ms']:.0f}", f"{row['vip_max_ms']:.0f}")
    Console().print(table)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()}, "rows": rows}, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
