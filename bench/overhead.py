"""Per-job overhead of `Client.request` over a direct httpx call to the same upstream (bench/throughput.py).

The direct call uses httpx over the aiohttp transport, as the workers do. Loads: one
request at a time (`serial_n` requests), then steady arrivals at each rate (req/s) for
`seconds`: a request starts every 1/rate s whether or not the earlier ones are done.
Latency is measured from the scheduled arrival, so a queue that builds up counts.
Returns one row per load with p50/p99 in ms (direct, fleet, fleet - direct) and n; with
`cpu` (a reader of CPU seconds per process so far), also the CPU each process spent per
fleet request (µs) and `cores_needed`: their sum times the arrival rate, the share of the
machine the fleet path needs at that rate (above the core count it cannot keep up).
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Awaitable, Callable

import anyio
import httpx
from httpx_aiohttp import AiohttpTransport

from ratefleet.client import Client

JOB = {"request": {"path": "/v1/chat/completions", "json": {"model": "m", "messages": []}}}


def _pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


async def _serial(call: Callable[[], Awaitable[None]], n: int) -> list[float]:
    out = []
    for _ in range(n):
        started = time.perf_counter()
        await call()
        out.append((time.perf_counter() - started) * 1000)
    return out


async def _steady(call: Callable[[], Awaitable[None]], rate: float, seconds: float) -> list[float]:
    out: list[float] = []
    interval = 1.0 / rate

    async def one(at: float) -> None:
        try:
            await call()
        except Exception:  # noqa: BLE001 - a failed call has no latency; counted by the caller (n)
            return
        out.append((time.perf_counter() - at) * 1000)

    async with anyio.create_task_group() as tg:
        start = time.perf_counter()
        for i in range(int(rate * seconds)):
            at = start + i * interval
            delay = at - time.perf_counter()
            if delay > 0:
                await anyio.sleep(delay)
            tg.start_soon(one, at)
    return out


def _row(load: str, direct: list[float], fleet: list[float], sent: int | None = None,
         cpu_us: dict[str, int] | None = None, rate: float | None = None) -> dict:
    if not direct or not fleet:
        return {"load": load, "n": len(fleet), "failed": "every call failed"}
    extra: dict = {}
    if cpu_us:
        total = sum(cpu_us.values())
        extra = {"fleet_cpu_us_per_request": cpu_us, "fleet_cpu_us_total": total,
                 "cores_needed": round(total * rate / 1e6, 2) if rate else None}
    d50, d99, f50, f99 = _pct(direct, 0.5), _pct(direct, 0.99), _pct(fleet, 0.5), _pct(fleet, 0.99)
    return {"load": load, "n": len(fleet), "direct_p50_ms": round(d50, 2), "direct_p99_ms": round(d99, 2),
            "fleet_p50_ms": round(f50, 2), "fleet_p99_ms": round(f99, 2), "overhead_p50_ms": round(f50 - d50, 2),
            "overhead_p99_ms": round(f99 - d99, 2), "fleet_mean_ms": round(statistics.fmean(fleet), 2),
            "failed_direct": (sent or len(direct)) - len(direct), "failed_fleet": (sent or len(fleet)) - len(fleet),
            **extra}


async def measure_overhead(client: Client, upstream: str, rates: list[float], seconds: float,
                           serial_n: int = 300, cpu: Callable[[], dict[str, float]] | None = None) -> list[dict]:
    limits = httpx.Limits(max_connections=64, max_keepalive_connections=64)
    async with httpx.AsyncClient(transport=AiohttpTransport(limits=limits, trust_env=False), trust_env=False,
                                 timeout=60.0) as http:
        async def direct() -> None:
            (await http.post(upstream + JOB["request"]["path"], json=JOB["request"]["json"])).raise_for_status()

        async def fleet() -> None:
            result = await client.request(JOB, "normal", timeout=60)
            if result.status != "succeeded":
                raise RuntimeError(f"request ended {result.status}: {result.error}")

        async def fleet_cpu(run: Awaitable[list[float]], sent: int) -> tuple[list[float], dict[str, int] | None]:
            before = cpu() if cpu else {}
            latencies = await run
            after = cpu() if cpu else {}
            return latencies, {name: round((after[name] - before[name]) * 1e6 / sent) for name in before} or None

        await _serial(direct, 20)  # warm both paths
        await _serial(fleet, 20)
        serial_direct = await _serial(direct, serial_n)
        serial_fleet, serial_cpu = await fleet_cpu(_serial(fleet, serial_n), serial_n)
        rows = [_row("1 in flight", serial_direct, serial_fleet, cpu_us=serial_cpu)]
        for rate in rates:
            sent = int(rate * seconds)
            steady_direct = await _steady(direct, rate, seconds)
            steady_fleet, steady_cpu = await fleet_cpu(_steady(fleet, rate, seconds), sent)
            rows.append(_row(f"{rate:g}/s arrivals", steady_direct, steady_fleet, sent, steady_cpu, rate))
    return rows
