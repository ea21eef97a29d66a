"""`ratefleet demo`: the whole system on this machine in about a minute.

Starts an embedded nats-server, the mock upstream (4 keys, each with its own limits),
one dispatcher and N workers as real processes; submits a guest flood and then a few vip
jobs; shows live progress; prints jobs by status, per-key calls and 429s, and the queue
wait of vip against guest jobs. Exit 0 when every job has exactly one result and no key
was ever refused by the upstream for going over its limit.
"""

from __future__ import annotations

import signal
import statistics
import time
from collections import Counter

import anyio
import httpx
from rich.console import Console
from rich.live import Live
from rich.table import Table

from ratefleet.cli_support import make_console, run_async
from ratefleet.client import Client
from ratefleet.localfleet import KeyLimit, LocalFleet, in_main_thread

DEMO_KEYS = {"k1": 20, "k2": 20, "k3": 10, "k4": 10}  # requests per second each
# The fleet's config states each key's rate with a burst of 2; the mock upstream enforces the
# same rate with a burst of 4, as providers allow some burst: on a loaded machine the hand-out ->
# call delay bunches calls the dispatcher handed out on schedule (a CI run in four test processes
# on 2 cores saw 1 x 429 with equal bursts). The rate is still the limit: a fleet that
# overspends it gets 429s and the demo exits 1.
FLEET_BURST, UPSTREAM_BURST = 2, 4


def _job(i: int, tier: str) -> dict:
    return {"request": {"path": "/v1/chat/completions",
                        "json": {"model": "demo", "messages": [{"role": "user", "content": f"{tier} {i}"}]}},
            "metadata": {"n": i}}


def run_demo(guest_jobs: int = 400, vip_jobs: int = 20, workers: int = 2) -> int:
    """Run the demo; its exit code. SIGTERM ends it as Ctrl-C does (exit 130), and the fleet's
    processes and files go with it (before, they stayed running with no parent); a SIGKILL still
    takes the processes (`LocalFleet`: each dies with its parent)."""
    def keys(burst: int) -> list[KeyLimit]:
        return [KeyLimit(key_id, rps, burst) for key_id, rps in DEMO_KEYS.items()]

    main = in_main_thread()  # (signal handlers: the main thread's only)
    previous = signal.signal(signal.SIGTERM, signal.default_int_handler) if main else None  # raises KeyboardInterrupt
    try:
        with LocalFleet(keys(UPSTREAM_BURST), workers=workers, slots=32, claimed=keys(FLEET_BURST)) as fleet:
            return run_async(_drive, make_console(), fleet, guest_jobs, vip_jobs, term_as_interrupt=True)
    finally:
        if main:
            signal.signal(signal.SIGTERM, previous)


async def _drive(console: Console, fleet: LocalFleet, guest_jobs: int, vip_jobs: int) -> int:
    upstream = fleet.upstream
    async with await Client.connect(fleet.nats_url, reconnect_forever=False) as client:
        console.print("[bold]ratefleet demo[/bold]: embedded NATS, mock upstream with 4 keys "
                      f"({sum(DEMO_KEYS.values())} req/s in all), 1 dispatcher, {fleet.workers} workers")
        await fleet.wait_ready(client)
        started = time.monotonic()
        await client.submit_many([_job(i, "guest") for i in range(guest_jobs)], "guest", batch="demo-guest")
        await anyio.sleep(1.0)  # the flood is queued; now the vip jobs arrive behind it
        await client.submit_many([_job(i, "vip") for i in range(vip_jobs)], "vip", batch="demo-vip")
        results = await _follow(console, client, {"demo-guest": guest_jobs, "demo-vip": vip_jobs})
        elapsed = time.monotonic() - started
    async with httpx.AsyncClient(trust_env=False) as http:
        stats = (await http.get(upstream + "/_mock/stats")).json()
    return _summary(console, results, stats, guest_jobs + vip_jobs, elapsed)


async def _follow(console: Console, client: Client, expected: dict[str, int]) -> dict[str, list]:
    results: dict[str, dict] = {batch: {} for batch in expected}

    def table() -> Table:
        view = Table("batch", "done", "of", "succeeded", "other", title="progress")
        for batch, total in expected.items():
            got = results[batch].values()
            ok = sum(1 for r in got if r.ok)
            view.add_row(batch, str(len(got)), str(total), str(ok), str(len(got) - ok))
        return view

    async def follow(batch: str) -> None:
        async for result in client.results(batch, follow=True):
            results[batch].setdefault(result.job_id, result)
            if len(results[batch]) >= expected[batch]:
                return

    with Live(table(), console=console, refresh_per_second=4) as live:
        with anyio.move_on_after(90):
            async with anyio.create_task_group() as tg:
                for batch in expected:
                    tg.start_soon(follow, batch)

                async def refresh() -> None:
                    while True:
                        live.update(table())
                        await anyio.sleep(0.25)

                tg.start_soon(refresh)
                while any(len(results[b]) < n for b, n in expected.items()):
                    await anyio.sleep(0.1)
                tg.cancel_scope.cancel()
        live.update(table())
    return {batch: list(found.values()) for batch, found in results.items()}


def _queued_ms(results: list) -> list[float]:
    """Queue waits in ms of the results that have one (jobs never called have none)."""
    return [r.timings.queued_ms for r in results if r.timings.queued_ms is not None]


def _pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def _summary(console: Console, results: dict[str, list], stats: dict, total: int, elapsed: float) -> int:
    all_results = [r for batch in results.values() for r in batch]
    by_status = Counter(r.status for r in all_results)
    console.print()
    console.print(f"[bold]{len(all_results)} of {total} jobs finished in {elapsed:.1f} s[/bold]")
    jobs = Table("status", "jobs", title="jobs by status")
    for status, count in sorted(by_status.items()):
        jobs.add_row(status, str(count))
    keys = Table("key", "limit req/s", "calls", "ok", "429s", "errors", title="per key (as the upstream counted)")
    for key_id, k in sorted(stats.get("keys", {}).items()):
        keys.add_row(key_id, str(DEMO_KEYS.get(key_id, "?")), str(k["calls"]), str(k["ok"]),
                      str(k["rate_limited"]), str(k["errors"]))
    waits = Table("tier", "jobs", "wait median ms", "wait p95 ms", "wait max ms", title="queue wait (submitted -> call)")
    medians: dict[str, float] = {}
    for batch, label in (("demo-vip", "vip"), ("demo-guest", "guest")):
        queued = _queued_ms(results[batch])
        medians[label] = statistics.median(queued) if queued else float("nan")
        waits.add_row(label, str(len(queued)), f"{medians[label]:.0f}", f"{_pct(queued, 0.95):.0f}",
                      f"{max(queued) if queued else float('nan'):.0f}")
    for view in (jobs, keys, waits):
        console.print(view)
    rate_limited = sum(k["rate_limited"] for k in stats.get("keys", {}).values())
    ok = len(all_results) == total and rate_limited == 0
    console.print("[green]every job has one result; no key went over its limit[/green]" if ok else
                  f"[red]{total - len(all_results)} jobs without a result, {rate_limited} x 429[/red]")
    if _queued_ms(results["demo-vip"]) and _queued_ms(results["demo-guest"]):  # the same medians as the table
        console.print(f"vip jobs waited {medians['vip']:.0f} ms (median) while the guest flood before them "
                      f"waited {medians['guest']:.0f} ms")
    return 0 if ok else 1
