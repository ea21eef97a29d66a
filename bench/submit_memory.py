"""Peak memory and rate of `ratefleet submit` for a large file (not a timed test).

Generates a JSONL file of N chat jobs (no ids: the deterministic ids are part of the cost),
starts a real nats-server, creates the streams with room for N messages
(`[streams] jobs_max_msgs`), runs the real `ratefleet submit FILE --tier normal --batch B`
as a child process, takes its peak RSS from the kernel (`os.wait4` rusage `ru_maxrss`, the
same figure `/usr/bin/time -v` prints) and prints a table; writes bench/results/submit_memory.json. No fleet is needed:
what is measured is reading, validating and storing the jobs.

    .venv/bin/python bench/submit_memory.py --lines 1000000
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from ratefleet.runtime.embedded import EmbeddedNats
from ratefleet.runtime.streams import ensure_topology
from ratefleet.schemas.config import parse_config

RESULTS = Path(__file__).parent / "results" / "submit_memory.json"


def write_jobs(path: Path, lines: int) -> int:
    with path.open("w") as handle:
        for i in range(lines):
            handle.write(json.dumps({"request": {"method": "POST", "path": "/v1/chat/completions", "json": {
                "model": "m", "messages": [{"role": "user", "content": f"summarise row {i} of the nightly export"}]}},
                "metadata": {"row": i}}) + "\n")
    return path.stat().st_size


async def make_streams(url: str, lines: int) -> None:
    import nats

    nc = await nats.connect(url)
    await ensure_topology(nc.jetstream(), parse_config({"streams": {"jobs_max_msgs": lines + 1000}}))
    await nc.close()


def run_submit(url: str, file: Path, log: Path) -> dict:
    command = [sys.executable, "-m", "ratefleet", "submit", str(file), "--tier", "normal", "--batch", "bench-mem",
               "--nats", url]
    started = time.monotonic()
    with log.open("w") as sink:
        child = subprocess.Popen(command, stdout=sink, stderr=subprocess.STDOUT)
        _, status, usage = os.wait4(child.pid, 0)
    elapsed = time.monotonic() - started
    child.returncode = os.waitstatus_to_exitcode(status)
    text = log.read_text()
    return {"command": " ".join(["ratefleet", *command[3:]]), "exit": child.returncode, "seconds": elapsed,
            "peak_rss_bytes": usage.ru_maxrss * 1024, "phase_seconds": phase_seconds(text),
            "log_tail": text.strip().splitlines()[-4:]}


def phase_seconds(log: str) -> dict[str, float]:
    """{"validating": s, "submitting": s} from the final progress lines (`name: ... (in 12.3s, ...)`)."""
    found = {}
    for match in re.finditer(r"^(validating|submitting): .*\(in ([0-9.]+)s", log, re.M):
        found[match[1]] = float(match[2])
    return found


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lines", type=int, default=1_000_000)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="rf-submit-mem-") as tmp:
        file = Path(tmp) / "jobs.jsonl"
        size = write_jobs(file, args.lines)
        with EmbeddedNats(Path(tmp) / "nats") as server:
            asyncio.run(make_streams(server.url, args.lines))
            run = run_submit(server.url, file, Path(tmp) / "submit.log")
    row = {"lines": args.lines, "file_bytes": size, **run, "jobs_per_s": args.lines / run["seconds"],
           "peak_rss_mb": run["peak_rss_bytes"] / 1e6}
    phases = run["phase_seconds"]
    validate_rate = args.lines / phases["validating"] if phases.get("validating") else 0
    send_rate = args.lines / phases["submitting"] if phases.get("submitting") else 0
    print(f"{'lines':>10} {'file MB':>8} {'exit':>4} {'seconds':>8} {'jobs/s':>8} {'validate/s':>10} "
          f"{'send/s':>8} {'peak RSS MB':>12}")
    print(f"{row['lines']:>10,} {size / 1e6:>8.1f} {row['exit']:>4} {row['seconds']:>8.1f} "
          f"{row['jobs_per_s']:>8,.0f} {validate_rate:>10,.0f} {send_rate:>8,.0f} {row['peak_rss_mb']:>12.1f}")
    print("\n".join(run["log_tail"]))
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(row, indent=2) + "\n")
    if row["exit"] != 0:
        sys.exit(f"submit failed with exit {row['exit']}")


if __name__ == "__main__":
    main()
