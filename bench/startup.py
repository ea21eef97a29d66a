"""CPU a `ratefleet` process spends starting, per command, for one or more revisions.

A coarse measure: the spread of one command within a sitting here is about ±0.2 s, so a change
of tens of milliseconds needs many rounds (or timing the imports alone, in-process).

Every fleet process and CLI command is a new Python interpreter that imports the CLI, pydantic,
nats-py, aiohttp, httpx and OpenTelemetry before it does anything: a worker added by an
autoscaler, a standby dispatcher, each `ratefleet submit` or `status`. The test suite starts
about 700 of them, and they were about half of its CPU (counted with an atexit hook per
process). This benchmark measures, in the same sitting for each revision:

- `--version`: the whole CLI imported, nothing run;
- `config check FILE`: the whole CLI and a config read, no NATS;
- `dispatcher`: started against a nats-server of its own, until it logs `became leader`;
- `worker`: started beside that leader, until it logs `worker started`.

CPU is user + system seconds of the process (/proc/PID/stat) at that moment; the roles are
then stopped with SIGTERM. Rounds alternate the revisions (machine drift lands on both); the
table gives the median and the spread.

Revisions are checked out as bench/ab_latency.py does (`.`: the working tree) and run with
PYTHONPATH set to them, so each process imports that revision.

Prints a table; writes bench/results/startup.json.
Run: .venv/bin/python bench/startup.py [--revs HEAD .] [--rounds 7]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from rich.console import Console
from rich.table import Table

sys.path.insert(0, str(Path(__file__).parent))
from ab_latency import ROOT, _free_port, checkout  # noqa: E402

from ratefleet.runtime.embedded import nats_server_binary  # noqa: E402

TICK = os.sysconf("SC_CLK_TCK")
READY = {"dispatcher": "became leader", "worker": "worker started"}


def cpu_s(pid: int) -> float:
    """User + system CPU seconds of a running process (/proc/PID/stat fields 14 and 15)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICK


def run_cpu(args: list[str], env: dict[str, str], cwd: Path) -> float:
    """CPU seconds of `python -m ratefleet ARGS` run to its end (its rusage, from wait4)."""
    proc = subprocess.Popen([sys.executable, "-m", "ratefleet", *args], env=env, cwd=cwd,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode not in (0, 1):
        raise RuntimeError(f"ratefleet {' '.join(args)} exited {proc.returncode}")
    return usage.ru_utime + usage.ru_stime


def role_cpu(role: str, env: dict[str, str], cwd: Path, config: Path, timeout: float = 60.0) -> tuple[float, subprocess.Popen]:
    """Start `ratefleet ROLE`, wait for its ready line; (CPU seconds then, the running process)."""
    log = cwd / f"{role}-{time.monotonic_ns()}.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen([sys.executable, "-m", "ratefleet", role, "--config", str(config)], env=env, cwd=cwd,
                                stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    deadline = time.monotonic() + timeout
    while READY[role] not in log.read_text(errors="replace"):
        if proc.poll() is not None or time.monotonic() > deadline:
            stop(proc)
            raise RuntimeError(f"ratefleet {role} did not log {READY[role]!r}: {log.read_text()[-2000:]}")
        time.sleep(0.01)
    return cpu_s(proc.pid), proc


def stop(proc: subprocess.Popen) -> None:
    with contextlib.suppress(ProcessLookupError):
        proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(15)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def one_round(path: Path, home: Path, url: str, config: Path) -> dict[str, float]:
    env = {**os.environ, "PYTHONPATH": str(path), "BENCH_KEY": "sk-startup-bench", "HOME": str(home),
           "RATEFLEET_LOG_FORMAT": "json"}
    env.pop("RATEFLEET_CONFIG", None)
    env.pop("RATEFLEET_NATS_URL", None)
    cpu = {"--version": run_cpu(["--version"], env, home), "config check": run_cpu(["config", "check", str(config)], env, home)}
    cpu["dispatcher"], leader = role_cpu("dispatcher", env, home, config)
    try:
        cpu["worker"], worker = role_cpu("worker", env, home, config)
        stop(worker)
    finally:
        stop(leader)
    return cpu


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--revs", nargs="+", default=["."], help="git revisions ('.': the working tree)")
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "startup.json")
    args = parser.parse_args()
    console = Console()
    samples: dict[str, dict[str, list[float]]] = {rev: {} for rev in args.revs}
    with tempfile.TemporaryDirectory(prefix="rf-startup-") as tmp_name:
        tmp = Path(tmp_name)
        trees = {rev: checkout(rev, tmp, f"r{i}") for i, rev in enumerate(args.revs)}
        url = f"nats://127.0.0.1:{_free_port()}"
        port = int(url.rsplit(":", 1)[1])
        server = subprocess.Popen([nats_server_binary(), "-a", "127.0.0.1", "-p", str(port), "-js", "-sd",
                                   str(tmp / "js")], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            time.sleep(0.5)
            config = tmp / "ratefleet.toml"
            config.write_text(f"""[nats]
url = "{url}"
[upstreams.u]
base_url = "http://127.0.0.1:9"
[pools.p]
upstream = "u"
keys = [ {{ id = "k1", secret = "env:BENCH_KEY", rps = 10 }} ]
""")
            for n in range(args.rounds):
                for i, rev in enumerate(args.revs):
                    home = tmp / f"home-{i}-{n}"
                    home.mkdir()
                    for command, seconds in one_round(trees[rev], home, url, config).items():
                        samples[rev].setdefault(command, []).append(seconds)
                console.print(f"round {n + 1}/{args.rounds} done")
        finally:
            server.terminate()
            server.wait()
            for i, rev in enumerate(args.revs):
                if rev != ".":
                    subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force", str(tmp / f"tree-r{i}")],
                                   check=False, capture_output=True)
            subprocess.run(["git", "-C", str(ROOT), "worktree", "prune"], check=False)
    table = Table(title=f"start-up CPU per process (s; median \\[min-max] of {args.rounds})")
    table.add_column("command")
    for rev in args.revs:
        table.add_column(rev, justify="right")
    commands = list(samples[args.revs[0]])
    for command in commands:
        table.add_row(command, *(f"{statistics.median(samples[rev][command]):.3f} "
                                 f"[{min(samples[rev][command]):.3f}-{max(samples[rev][command]):.3f}]"
                                 for rev in args.revs))
    console.print(table)
    revisions = {rev: subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", rev if rev != "." else "HEAD"],
                                     capture_output=True, text=True).stdout.strip() + ("+working tree" if rev == "." else "")
                 for rev in args.revs}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({
        "benchmark": "startup", "rounds": args.rounds, "python": platform.python_version(),
        "load_average": os.getloadavg(), "revisions": revisions,
        "cpu_s": {rev: {command: {"median": statistics.median(values), "min": min(values), "max": max(values),
                                  "samples": values} for command, values in samples[rev].items()}
                  for rev in args.revs},
    }, indent=2) + "\n")
    console.print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
