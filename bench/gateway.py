"""What the gateway adds to a call: latency through `ratefleet gateway` -> NATS -> dispatcher ->
worker -> upstream against a direct call to the same mock upstream.

A local fleet (embedded nats-server, the mock upstream with 2 keys x 1000 req/s, one dispatcher,
W workers, `ratefleet gateway` with one caller), then N chat completions with C in flight, each
pair sent direct (httpx with a key's secret) and through the gateway (httpx with the caller's
key, as the OpenAI SDK would send it) alternately, so both see the same machine load; then
streamed chat completions ("stream": true), timing the first byte of the body and its end. Prints
tables, writes bench/results/gateway.json.
Run: .venv/bin/python bench/gateway.py [--requests N] [--concurrency C] [--workers W]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from pathlib import Path

import anyio
import httpx
from rich.console import Console
from rich.table import Table

from ratefleet.client import Client
from ratefleet.localfleet import KeyLimit, LocalFleet

CALLER_ENV = "RATEFLEET_BENCH_CALLER"
BODY = {"model": "mock", "messages": [{"role": "user", "content": "how long does this take?"}]}
# streamed: 8 events (role, 5 words, finish, [DONE]), 20 ms apart at the upstream
STREAM_BODY = {**BODY, "stream": True, "mock": {"chunk_ms": 20}}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=400, help="requests per path (direct, gateway)")
    parser.add_argument("--concurrency", type=int, default=1)
    parser.add_argument("--warmup", type=int, default=30)
    parser.add_argument("--stream-requests", type=int, default=100, help="streamed requests per path (time to first byte)")
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "gateway.json")
    return parser.parse_args(argv)


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))]


def summary(values: list[float]) -> dict:
    return {"n": len(values), "p50_ms": percentile(values, 50), "p90_ms": percentile(values, 90),
            "p99_ms": percentile(values, 99), "mean_ms": statistics.fmean(values), "max_ms": max(values)}


async def wait_gateway(fleet: LocalFleet, http: httpx.AsyncClient) -> None:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            if (await http.get(fleet.gateway_url + "/healthz")).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        await anyio.sleep(0.2)
    raise RuntimeError(f"the gateway did not come up\n{fleet.logs()}")


async def timed(http: httpx.AsyncClient, url: str, key: str) -> float:
    started = time.perf_counter()
    answer = await http.post(url, json=BODY, headers={"authorization": f"Bearer {key}"})
    elapsed = (time.perf_counter() - started) * 1000
    if answer.status_code != 200:
        raise RuntimeError(f"{url} answered {answer.status_code}: {answer.text[:300]}")
    return elapsed


async def first_byte(http: httpx.AsyncClient, url: str, key: str) -> tuple[float, float]:
    """(ms to the first byte of the body, ms to its end) of one streamed chat completion."""
    started = time.perf_counter()
    first = None
    async with http.stream("POST", url, json=STREAM_BODY, headers={"authorization": f"Bearer {key}"}) as answer:
        if answer.status_code != 200 or not answer.headers.get("content-type", "").startswith("text/event-stream"):
            raise RuntimeError(f"{url} answered {answer.status_code} {answer.headers.get('content-type')}")
        async for _ in answer.aiter_raw():
            first = first if first is not None else (time.perf_counter() - started) * 1000
    return first or 0.0, (time.perf_counter() - started) * 1000


async def drive_streams(args: argparse.Namespace, http: httpx.AsyncClient, paths: dict[str, tuple[str, str]]) -> dict:
    samples: dict[str, list[tuple[float, float]]] = {name: [] for name in paths}
    for _ in range(args.stream_requests):
        for name, (url, key) in paths.items():
            samples[name].append(await first_byte(http, url, key))
    return {f"{name}_stream": {"first_byte": summary([s[0] for s in values]), "complete": summary([s[1] for s in values])}
            for name, values in samples.items()}


async def drive(args: argparse.Namespace, fleet: LocalFleet, caller_key: str) -> dict:
    direct_url = fleet.upstream + "/v1/chat/completions"
    gateway_url = fleet.gateway_url + "/v1/chat/completions"
    direct_key = fleet.secret("k1")
    samples: dict[str, list[float]] = {"direct": [], "gateway": []}
    limits = httpx.Limits(max_connections=2 * args.concurrency + 4)
    async with await Client.connect(fleet.nats_url) as client, \
            httpx.AsyncClient(trust_env=False, timeout=30, limits=limits) as http:
        await fleet.wait_ready(client)
        await wait_gateway(fleet, http)
        for _ in range(args.warmup):
            await timed(http, direct_url, direct_key)
            await timed(http, gateway_url, caller_key)
        todo = iter(range(args.requests))

        async def runner() -> None:
            for _ in todo:
                samples["direct"].append(await timed(http, direct_url, direct_key))
                samples["gateway"].append(await timed(http, gateway_url, caller_key))

        started = time.monotonic()
        async with anyio.create_task_group() as tg:
            for _ in range(args.concurrency):
                tg.start_soon(runner)
        elapsed = time.monotonic() - started
        streams = await drive_streams(args, http, {"direct": (direct_url, direct_key), "gateway": (gateway_url, caller_key)})
    return {"direct": summary(samples["direct"]), "gateway": summary(samples["gateway"]), "elapsed_s": elapsed,
            **streams}


def report(args: argparse.Namespace, measured: dict) -> None:
    table = Table(title=f"gateway added latency: {args.requests} chat completions per path, "
                        f"{args.concurrency} in flight, {args.workers} worker(s)")
    for column in ("path", "p50 ms", "p90 ms", "p99 ms", "mean ms", "max ms"):
        table.add_column(column, justify="right" if column != "path" else "left")
    for path in ("direct", "gateway"):
        row = measured[path]
        table.add_row(path, *(f"{row[k]:.2f}" for k in ("p50_ms", "p90_ms", "p99_ms", "mean_ms", "max_ms")))
    added = {k: measured["gateway"][k] - measured["direct"][k] for k in ("p50_ms", "p99_ms", "mean_ms")}
    table.add_row("added", f"{added['p50_ms']:.2f}", "", f"{added['p99_ms']:.2f}", f"{added['mean_ms']:.2f}", "")
    measured["added"] = added
    Console().print(table)
    streams = Table(title=f"streamed chat completions ({args.stream_requests} per path; 8 events 20 ms apart upstream)")
    for column in ("path", "first byte p50 ms", "first byte p99 ms", "complete p50 ms", "complete p99 ms"):
        streams.add_column(column, justify="right" if column != "path" else "left")
    for path in ("direct", "gateway"):
        row = measured[f"{path}_stream"]
        streams.add_row(path, *(f"{row[part][k]:.2f}" for part in ("first_byte", "complete") for k in ("p50_ms", "p99_ms")))
    Console().print(streams)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    caller_key = "rk-bench-" + os.urandom(8).hex()
    os.environ[CALLER_ENV] = caller_key  # the gateway child reads it (env:); never printed
    keys = [KeyLimit("k1", 1000, 100), KeyLimit("k2", 1000, 100)]
    callers = {"bench": {"key": f"env:{CALLER_ENV}", "tier": "vip"}}
    with LocalFleet(keys, workers=args.workers, slots=64, callers=callers) as fleet:
        measured = anyio.run(drive, args, fleet, caller_key)
    report(args, measured)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()}, **measured,
                                    "machine": {"nproc": os.cpu_count(), "python": platform.python_version()}},
                                   indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
