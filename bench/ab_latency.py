"""`Client.request` latency of two ratefleet revisions side by side, one request at a time.

Latency differences of a few tenths of a millisecond drown in the run-to-run spread of a
shared 2-core machine (the same code measured twice differs by more). So both revisions run
at once: two fleets (`ratefleet up --workers 1`, keys far above the load, each with its own
embedded nats-server) call one fast upstream (nginx, else aiohttp: bench/fast_upstream.py),
and one client alternates its requests between them (A then B, then B then A, ...). Each
pair of requests saw the same machine, and the median of the pairs' differences (A - B, ms)
is the figure; it is printed per round with each side's p50 / p90.

`--a` and `--b` are git revisions, checked out in temporary worktrees; `.` is the working
tree. The fleets run from those trees (PYTHONPATH); the client is the installed ratefleet,
so both revisions must speak its wire protocol.

`--rate R` sends instead R requests/s to each fleet at once (A and B at the same instants, in
alternating order) and reports each side's p50 / p99 and its CPU per request: the CPU time
(/proc, user + system) of the fleet's processes (`up`, the dispatcher, the worker and its
nats-server) over the round, divided by the requests it answered. Idle CPU is in that figure
too, on both sides alike. CPU is what decides whether a rate queues on a shared machine, and
per request it varies far less between runs than the latency tail does.

Run: .venv/bin/python bench/ab_latency.py --a HEAD~1 --b . [--requests 400] [--rounds 3] [--rate 200]
Writes bench/results/ab_latency.json.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import anyio
from rich.console import Console
from rich.table import Table

sys.path.insert(0, str(Path(__file__).parent))
from fast_upstream import FastUpstream  # noqa: E402

from ratefleet.client import Client  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
JOB = {"request": {"path": "/v1/chat/completions", "json": {"model": "m", "messages": []}}}
MAPPED = ("schemas", "dispatcher", "workers")  # folders setuptools maps into ratefleet.* (pyproject package-dir)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def checkout(rev: str, tmp: Path, name: str) -> Path:
    """A directory whose `ratefleet` package is revision `rev` (`.`: the working tree): a
    detached worktree, and for the package-dir layout a tree of links that maps the top-level
    folders into `ratefleet/` as the installed package does. Raises CalledProcessError for an
    unknown revision."""
    if rev == ".":
        src = ROOT
    else:
        src = tmp / f"tree-{name}"
        subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "--detach", "-q", str(src), rev], check=True)
    if "package-dir" not in (src / "pyproject.toml").read_text():
        return src  # the older layout: top-level packages
    farm = tmp / f"path-{name}"
    (farm / "ratefleet").mkdir(parents=True)
    for entry in (src / "ratefleet").iterdir():
        (farm / "ratefleet" / entry.name).symlink_to(entry)
    for folder in MAPPED:
        (farm / "ratefleet" / folder).symlink_to(src / folder)
    return farm


def start_fleet(path: Path, home: Path, upstream_url: str) -> tuple[subprocess.Popen, str]:
    """`ratefleet up --workers 1` from `path` with its own embedded nats-server; (process, NATS URL)."""
    home.mkdir(parents=True)
    url = f"nats://127.0.0.1:{_free_port()}"
    config = home / "ratefleet.toml"
    config.write_text(f"""[nats]
url = "{url}"
[upstreams.u]
base_url = "{upstream_url}"
[pools.p]
upstream = "u"
keys = [ {{ id = "k1", secret = "env:AB_KEY", rps = 5000, burst = 100 }},
         {{ id = "k2", secret = "env:AB_KEY", rps = 5000, burst = 100 }} ]
[workers]
slots = 64
""")
    env = {**os.environ, "PYTHONPATH": str(path), "AB_KEY": "sk-ab-bench", "HOME": str(home),
           "RATEFLEET_LOG_LEVEL": "WARNING"}
    env.pop("RATEFLEET_CONFIG", None)
    env.pop("RATEFLEET_NATS_URL", None)
    with open(home / "up.log", "wb") as log:
        proc = subprocess.Popen([sys.executable, "-m", "ratefleet", "up", "--config", str(config), "--workers", "1"],
                                env=env, cwd=home, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    return proc, url


def stop_fleet(proc: subprocess.Popen) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(30)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


async def ready(url: str, proc: subprocess.Popen, log: Path) -> Client:
    """A client of the fleet at `url` once one request succeeds (60 s at most, or until the
    fleet exits; then its log tail is raised)."""
    deadline = time.monotonic() + 60
    client = None
    while time.monotonic() < deadline and proc.poll() is None:
        try:
            client = client or await Client.connect(url)
            if (await client.request(JOB, "normal", timeout=2)).status == "succeeded":
                return client
        except Exception:  # noqa: BLE001 - not up yet
            pass
        await anyio.sleep(0.5)
    if client is not None:
        await client.close()
    raise RuntimeError(f"fleet did not answer within 60 s:\n{log.read_text(errors='replace')[-3000:]}")


def tree_cpu_s(root: int) -> dict[str, float]:
    """CPU seconds (user + system) so far of process `root` and all its descendants, by role
    (`up`, `dispatcher`, `worker`, `nats-server`, else the program's name), from /proc."""
    tick = os.sysconf("SC_CLK_TCK")
    procs: dict[int, tuple[int, float, str]] = {}  # pid -> (parent, CPU s, role)
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
            words = [w.decode(errors="replace") for w in (stat.parent / "cmdline").read_bytes().split(b"\0") if w]
        except (OSError, ValueError, IndexError):
            continue  # gone meanwhile
        role = next((w for w in ("dispatcher", "worker", "up") if w in words), Path(words[0]).name if words else "?")
        procs[int(stat.parent.name)] = (int(fields[1]), (int(fields[11]) + int(fields[12])) / tick, role)
    tree, out = {root}, {}
    for _ in range(4):  # up -> its children (and a child's own, if any)
        tree |= {pid for pid, (parent, _, _) in procs.items() if parent in tree}
    for pid in tree & procs.keys():
        _, cpu, role = procs[pid]
        out[role] = out.get(role, 0.0) + cpu
    return out


def q(values: list[float], p: float) -> float:
    return sorted(values)[min(len(values) - 1, int(len(values) * p))]


async def steady_round(clients: list[Client], procs: list[subprocess.Popen], requests: int, rate: float) -> dict:
    """`requests` requests per fleet, `rate` per second to each, A and B sent at the same
    instants; each side's p50 / p99 ms and CPU µs per answered request by role."""
    lat: list[list[float]] = [[], []]
    failed = [0, 0]

    async def one(side: int) -> None:
        t0 = time.perf_counter()
        try:
            result = await clients[side].request(JOB, "normal", timeout=10)
        except Exception:  # noqa: BLE001 - counted, not timed
            failed[side] += 1
            return
        if result.status != "succeeded":
            failed[side] += 1
            return
        lat[side].append((time.perf_counter() - t0) * 1e3)

    before = [tree_cpu_s(p.pid) for p in procs]
    async with anyio.create_task_group() as tg:
        start = time.perf_counter()
        for i in range(requests):
            delay = start + i / rate - time.perf_counter()
            if delay > 0:
                await anyio.sleep(delay)
            for side in ((0, 1) if i % 2 == 0 else (1, 0)):
                tg.start_soon(one, side)
    after = [tree_cpu_s(p.pid) for p in procs]
    row: dict = {"requests": requests, "rate": rate, "failed_a": failed[0], "failed_b": failed[1]}
    for side, name in enumerate("ab"):
        answered = max(1, len(lat[side]))
        cpu = {role: round((after[side][role] - before[side].get(role, 0.0)) * 1e6 / answered) for role in after[side]}
        row.update({f"{name}_p50_ms": q(lat[side], 0.5) if lat[side] else math.nan,
                    f"{name}_p99_ms": q(lat[side], 0.99) if lat[side] else math.nan,
                    f"{name}_cpu_us_per_request": cpu, f"{name}_cpu_us_total": sum(cpu.values())})
    return row


async def measure(urls: list[str], procs: list[subprocess.Popen], logs: list[Path], requests: int, rounds: int,
                  warm: int, rate: float | None = None) -> list[dict]:
    clients: list[Client] = []
    try:
        for url, proc, log in zip(urls, procs, logs):
            clients.append(await ready(url, proc, log))
        for _ in range(warm):
            for client in clients:
                result = await client.request(JOB, "normal", timeout=10)
                if result.status != "succeeded":
                    raise RuntimeError(f"a warm-up request ended {result.status}: {result.error}")
        out = []
        for _ in range(rounds):
            if rate:
                out.append(await steady_round(clients, procs, requests, rate))
                continue
            lat: list[list[float]] = [[], []]
            for i in range(requests):
                for side in ((0, 1) if i % 2 == 0 else (1, 0)):
                    t0 = time.perf_counter()
                    result = await clients[side].request(JOB, "normal", timeout=10)
                    lat[side].append((time.perf_counter() - t0) * 1e3)
                    if result.status != "succeeded":
                        raise RuntimeError(f"a request ended {result.status}: {result.error}")
            diffs = [a - b for a, b in zip(lat[0], lat[1])]
            out.append({"a_p50_ms": q(lat[0], 0.5), "a_p90_ms": q(lat[0], 0.9), "b_p50_ms": q(lat[1], 0.5),
                        "b_p90_ms": q(lat[1], 0.9), "paired_median_a_minus_b_ms": statistics.median(diffs),
                        "requests": requests})
        return out
    finally:
        for client in clients:
            await client.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--a", default="HEAD", help="git revision of fleet A (`.`: the working tree)")
    parser.add_argument("--b", default=".", help="git revision of fleet B (`.`: the working tree)")
    parser.add_argument("--requests", type=int, default=400, help="requests per fleet per round")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--warm", type=int, default=50, help="unmeasured requests per fleet first")
    parser.add_argument("--rate", type=float, default=None,
                        help="requests/s to each fleet at once (default: one request at a time, alternating)")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "ab_latency.json")
    args = parser.parse_args()
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # so the fleets and worktrees are cleaned up
    with tempfile.TemporaryDirectory(prefix="ratefleet-ab-") as tmp_name, FastUpstream("auto") as upstream:
        tmp = Path(tmp_name)
        procs: list[subprocess.Popen] = []
        try:
            paths = [checkout(args.a, tmp, "a"), checkout(args.b, tmp, "b")]
            urls, logs = [], []
            for name, path in zip("ab", paths):
                proc, url = start_fleet(path, tmp / f"home-{name}", upstream.url)
                procs.append(proc)
                urls.append(url)
                logs.append(tmp / f"home-{name}" / "up.log")
            rows = anyio.run(measure, urls, procs, logs, args.requests, args.rounds, args.warm, args.rate)
        finally:
            for proc in procs:
                with contextlib.suppress(Exception):  # the other fleet is stopped all the same
                    stop_fleet(proc)
            for name in "ab":
                if (tmp / f"tree-{name}").exists():
                    subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force", str(tmp / f"tree-{name}")],
                                   check=False)
            subprocess.run(["git", "-C", str(ROOT), "worktree", "prune"], check=False)
    if args.rate:
        table = Table(title=f"Client.request at {args.rate:g}/s to each: A = {args.a}, B = {args.b} "
                            f"(upstream: {upstream.kind}); CPU µs per request")
        roles = sorted({role for row in rows for n in "ab" for role in row[f"{n}_cpu_us_per_request"]})
        for column in ("round", "side", "p50 / p99 ms", *roles, "total", "failed"):
            table.add_column(column)
        for i, row in enumerate(rows, 1):
            for n in "ab":
                cpu = row[f"{n}_cpu_us_per_request"]
                table.add_row(str(i), n.upper(), f"{row[f'{n}_p50_ms']:.2f} / {row[f'{n}_p99_ms']:.2f}",
                              *(str(cpu.get(role, "-")) for role in roles), str(row[f"{n}_cpu_us_total"]),
                              str(row[f"failed_{n}"]))
        Console(width=max(120, Console().width)).print(table)
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({"a": args.a, "b": args.b, "upstream": upstream.kind, "rate": args.rate,
                                        "rounds": rows}, indent=2))
        print(f"wrote {args.out}")
        return
    table = Table(title=f"Client.request, one at a time: A = {args.a}, B = {args.b} (upstream: {upstream.kind})")
    for column in ("round", "A p50 / p90 ms", "B p50 / p90 ms", "paired median A - B ms"):
        table.add_column(column)
    for i, row in enumerate(rows, 1):
        table.add_row(str(i), f"{row['a_p50_ms']:.2f} / {row['a_p90_ms']:.2f}", f"{row['b_p50_ms']:.2f} / {row['b_p90_ms']:.2f}",
                      f"{row['paired_median_a_minus_b_ms']:+.3f}")
    Console().print(table)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"a": args.a, "b": args.b, "upstream": upstream.kind, "rounds": rows}, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
