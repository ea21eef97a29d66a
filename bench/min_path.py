"""The floor under `Client.request`'s overhead: the fleet's hops, hand-written, with nothing else.

`Client.request` takes these steps, each needed by an invariant of ../shared/design.md:

    client   -> JetStream publish of the job (stored first: a crash never loses it)
    leader   <- the job from its pull consumer; -> an assignment to a worker (core NATS)
                (one writer of key state: only the leader hands out calls)
    worker   -> the upstream call; -> the Result to the results stream, its PubAck awaited
                (one Result per job: the reply must be the stored Result); -> the reply to the
                client's inbox (core NATS); -> the job's ack
    client   <- the reply

This benchmark runs exactly those steps with no scheduling, no keys, no validation, no
tracing and no reports: a `leader` process that forwards each pulled job to the worker
subject with its ack subject, a `worker` process (httpx over the aiohttp transport, as the
fleet's workers) that calls, stores, replies and acks, and the client in this process. Same
embedded nats-server build, same fast upstream (bench/fast_upstream.py: nginx, else aiohttp),
same loads and arithmetic as bench/overhead.py: one request at a time, then steady arrivals at
each `--rates` value for `--seconds`, latency from the scheduled arrival, minus a direct httpx
call measured just before; CPU per request of each process from /proc.

With `--fleet`, the fleet (`ratefleet` dispatcher + 1 worker x 64 slots, 2 keys far above the
load, as bench/throughput.py's overhead rows) is measured in the same sitting after the floor,
so the two compare on the same machine state. Whatever the floor's overhead at a load is, the
fleet's cannot be lower there without dropping one of those steps.

Prints a table; writes bench/results/min_path.json.
Run: .venv/bin/python bench/min_path.py [--rates 250 500] [--seconds 10] [--fleet]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import subprocess
import sys
import tempfile
import uuid
from pathlib import Path

import anyio
import httpx
import nats
from httpx_aiohttp import AiohttpTransport
from nats.js.api import ConsumerConfig, DiscardPolicy, RetentionPolicy, StorageType, StreamConfig
from rich.console import Console
from rich.table import Table

sys.path.insert(0, str(Path(__file__).parent))
from fast_upstream import FastUpstream  # noqa: E402
from overhead import JOB, _row, _serial, _steady, measure_overhead  # noqa: E402
from throughput import BenchFleet, cpu_s  # noqa: E402

from ratefleet.client import Client  # noqa: E402
from ratefleet.localfleet import KeyLimit  # noqa: E402
from ratefleet.runtime.embedded import EmbeddedNats  # noqa: E402

PULL_BATCH = 64  # the leader's pull request size; pulled again at half
SLOTS = 64  # the worker's upstream connections, as the fleet's --slots


async def leader(url: str) -> None:
    """Pull jobs; forward each to `min.assign` with its ack subject and the client's inbox."""
    nc = await nats.connect(url)
    js = nc.jetstream()
    await js.add_consumer("MIN_JOBS", ConsumerConfig(durable_name="leader", ack_policy="explicit", ack_wait=30,
                                                     max_ack_pending=10_000))
    inbox = nc.new_inbox()
    waiting = 0

    async def pull() -> None:
        nonlocal waiting
        waiting += PULL_BATCH
        await nc.publish("$JS.API.CONSUMER.MSG.NEXT.MIN_JOBS.leader", json.dumps({"batch": PULL_BATCH}).encode(),
                         reply=inbox)

    async def on_job(msg) -> None:
        nonlocal waiting
        if not msg.reply:  # a status message (no ack subject)
            return
        waiting -= 1
        await nc.publish("min.assign", msg.data, headers={"Ack": msg.reply, "Reply": msg.headers["Reply"]})
        if waiting <= PULL_BATCH // 2:
            await pull()

    await nc.subscribe(inbox, cb=on_job)
    await pull()
    await pull()
    print("ready", flush=True)
    await asyncio.Event().wait()


async def worker(url: str, upstream: str) -> None:
    """Take assignments: call, store the Result (PubAck awaited), reply, ack."""
    nc = await nats.connect(url)
    js = nc.jetstream()
    limits = httpx.Limits(max_connections=SLOTS, max_keepalive_connections=SLOTS)
    http = httpx.AsyncClient(transport=AiohttpTransport(limits=limits, trust_env=False), trust_env=False)
    tasks: set[asyncio.Task] = set()

    async def run(msg) -> None:
        job = json.loads(msg.data)
        request = job["request"]
        response = await http.post(upstream + request["path"], json=request["json"])
        result = json.dumps({"job_id": job["id"], "status": "succeeded",
                             "response": {"status": response.status_code, "body": response.json()}}).encode()
        await js.publish(f"min.results.{job['id']}", result)
        await nc.publish(msg.headers["Reply"], result)
        await nc.publish(msg.headers["Ack"], b"+ACK")

    async def on_assign(msg) -> None:
        task = asyncio.create_task(run(msg))
        tasks.add(task)
        task.add_done_callback(tasks.discard)

    await nc.subscribe("min.assign", cb=on_assign)
    print("ready", flush=True)
    await asyncio.Event().wait()


class MinPath:
    """The client side: publish the job (PubAck awaited, as Client.request), await the reply on
    one wildcard inbox subscription (a future per request, as Client.request)."""

    def __init__(self, nc) -> None:
        self.nc = nc
        self.js = nc.jetstream()
        self.prefix = nc.new_inbox()
        self.waiting: dict[str, asyncio.Future] = {}

    async def start(self) -> None:
        async def on_reply(msg) -> None:
            future = self.waiting.pop(msg.subject.rsplit(".", 1)[1], None)
            if future is not None and not future.done():
                future.set_result(msg.data)

        await self.nc.subscribe(f"{self.prefix}.*", cb=on_reply)

    async def request(self) -> None:
        job_id = uuid.uuid4().hex
        future = asyncio.get_running_loop().create_future()
        self.waiting[job_id] = future
        payload = json.dumps({"id": job_id, **JOB}).encode()
        await self.js.publish("min.jobs", payload, headers={"Nats-Msg-Id": job_id, "Reply": f"{self.prefix}.{job_id}"})
        data = await asyncio.wait_for(future, 60)
        if json.loads(data)["response"]["status"] != 200:
            raise RuntimeError("the upstream did not answer 200")


def _spawn(role: str, *args: str) -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, __file__, role, *args], stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    if proc.stdout.readline().strip() != "ready":
        proc.kill()
        raise RuntimeError(f"the {role} process did not start")
    return proc


async def measure_floor(url: str, upstream: str, rates: list[float], seconds: float, serial_n: int,
                       server_pid: int) -> list[dict]:
    nc = await nats.connect(url)
    js = nc.jetstream()
    await js.add_stream(StreamConfig(name="MIN_JOBS", subjects=["min.jobs"], retention=RetentionPolicy.WORK_QUEUE,
                                     storage=StorageType.FILE))
    await js.add_stream(StreamConfig(name="MIN_RESULTS", subjects=["min.results.*"], storage=StorageType.FILE,
                                     max_msgs_per_subject=1, discard=DiscardPolicy.NEW, discard_new_per_subject=True))
    procs = {"leader": _spawn("leader", url), "worker": _spawn("worker", url, upstream)}
    path = MinPath(nc)
    await path.start()
    limits = httpx.Limits(max_connections=64, max_keepalive_connections=64)
    http = httpx.AsyncClient(transport=AiohttpTransport(limits=limits, trust_env=False), trust_env=False)

    async def direct() -> None:
        (await http.post(upstream + JOB["request"]["path"], json=JOB["request"]["json"])).raise_for_status()

    pids = {name: p.pid for name, p in procs.items()} | {"nats-server": server_pid, "client": os.getpid()}

    async def with_cpu(run, sent: int):
        before = {n: cpu_s(pid) for n, pid in pids.items()}
        latencies = await run
        return latencies, {n: round((cpu_s(pid) - before[n]) * 1e6 / sent) for n, pid in pids.items()}

    try:
        await _serial(direct, 20)
        await _serial(path.request, 20)
        serial_direct = await _serial(direct, serial_n)
        serial_path, serial_cpu = await with_cpu(_serial(path.request, serial_n), serial_n)
        rows = [_row("1 in flight", serial_direct, serial_path, cpu_us=serial_cpu)]
        for rate in rates:
            sent = int(rate * seconds)
            steady_direct = await _steady(direct, rate, seconds)
            steady_path, steady_cpu = await with_cpu(_steady(path.request, rate, seconds), sent)
            rows.append(_row(f"{rate:g}/s arrivals", steady_direct, steady_path, sent, steady_cpu, rate))
    finally:
        for proc in procs.values():
            proc.kill()
            proc.wait()
        await http.aclose()
        await nc.close()
    return rows


def run_floor(args: argparse.Namespace, upstream: str) -> list[dict]:
    with tempfile.TemporaryDirectory() as tmp:
        server = EmbeddedNats(Path(tmp) / "nats").start()
        try:
            assert server.process is not None
            rows = asyncio.run(measure_floor(server.url, upstream, args.rates, args.seconds, args.serial,
                                             server.process.pid))
        finally:
            server.stop()
    return rows


def run_fleet(args: argparse.Namespace, upstream: str) -> list[dict]:
    fleet = BenchFleet([KeyLimit("k1", 1000.0, 100.0), KeyLimit("k2", 1000.0, 100.0)], workers=1, slots=SLOTS)
    fleet.external = upstream

    async def drive() -> list[dict]:
        procs = {p.fleet_name: p.pid for p in fleet.procs if p.fleet_name != "mock"}  # type: ignore[attr-defined]
        side = {**procs, "nats-server": fleet._nats.process.pid, "client": os.getpid()}
        async with await Client.connect(fleet.nats_url) as client:
            await fleet.wait_ready(client)
            return await measure_overhead(client, upstream, args.rates, args.seconds, serial_n=args.serial,
                                          cpu=lambda: {name: cpu_s(pid) for name, pid in side.items()})

    with fleet:
        return anyio.run(drive)


def report(out: dict) -> None:
    console = Console(width=160)
    table = Table("path", "load", "direct p50 / p99 ms", "p50 / p99 ms", "overhead p50 / p99 ms", "n",
                  "CPU µs/request", title="Client.request's hops hand-written (floor) against the fleet")
    for name in ("floor", "fleet"):
        for row in out.get(name) or []:
            if "overhead_p50_ms" not in row:
                continue
            cpu = row.get("fleet_cpu_us_per_request") or {}
            table.add_row(name, row["load"], f"{row['direct_p50_ms']} / {row['direct_p99_ms']}",
                          f"{row['fleet_p50_ms']} / {row['fleet_p99_ms']}",
                          f"{row['overhead_p50_ms']:+} / {row['overhead_p99_ms']:+}", str(row["n"]),
                          " + ".join(f"{k} {v}" for k, v in cpu.items()) + (f" = {sum(cpu.values())}" if cpu else ""))
    console.print(table)


def main(argv: list[str] | None = None) -> int:
    if argv is None and len(sys.argv) > 1 and sys.argv[1] in ("leader", "worker"):
        role = leader(sys.argv[2]) if sys.argv[1] == "leader" else worker(sys.argv[2], sys.argv[3])
        asyncio.run(role)
        return 0
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rates", type=float, nargs="*", default=[250.0, 500.0], help="arrivals/s")
    parser.add_argument("--seconds", type=float, default=10.0, help="seconds per rate")
    parser.add_argument("--serial", type=int, default=300, help="requests one at a time")
    parser.add_argument("--fleet", action="store_true", help="measure the fleet too, after the floor")
    parser.add_argument("--upstream", choices=("auto", "nginx", "aiohttp"), default="auto")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "min_path.json")
    args = parser.parse_args(argv)
    with FastUpstream(args.upstream) as upstream:
        floor = run_floor(args, upstream.url)
        fleet = run_fleet(args, upstream.url) if args.fleet else None
        kind = upstream.kind
    out = {"benchmark": "min_path", "command": " ".join(sys.argv), "upstream": kind, "floor": floor, "fleet": fleet,
           "machine": {"nproc": os.cpu_count(), "python": platform.python_version(), "loadavg": os.getloadavg()}}
    report(out)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(out, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
