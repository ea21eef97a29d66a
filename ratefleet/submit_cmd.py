"""`ratefleet submit`: validate a JSONL file, store every job, optionally collect the Results."""

from __future__ import annotations

import json
import sys
import uuid
from collections import Counter
from datetime import datetime, timezone
from pathlib import Path

import anyio
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from ratefleet.cli_support import make_console
from ratefleet.client import Client, as_job
from ratefleet.errors import JobInvalid
from schemas import Job


def read_jobs(lines: list[str], batch: str | None) -> tuple[list[Job], list[str]]:
    """Parse and validate every line; return (jobs, 'line N: why' errors)."""
    jobs, errors = [], []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            jobs.append(as_job(json.loads(line), batch=batch))
        except (ValueError, RecursionError) as exc:
            errors.append(f"line {number}: not valid JSON ({type(exc).__name__}: {exc})")
        except JobInvalid as exc:
            errors.append(f"line {number}: {exc}")
    return jobs, errors


def _progress(console: Console) -> Progress:
    return Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                    console=console, transient=False)


async def run_submit(file: Path, tier: str, batch: str | None, wait: bool, out: Path | None, skip_invalid: bool,
                     url: str, prefix: str) -> int:
    console = make_console(stderr=True)  # plain under NO_COLOR / not a terminal
    text = sys.stdin.read() if str(file) == "-" else file.read_text()
    if wait and batch is None:
        batch = "submit-" + datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%S") + "-" + uuid.uuid4().hex[:6]
    jobs, errors = read_jobs(text.splitlines(), batch)
    if errors:
        for line in errors[:20]:
            console.print(f"[red]{line}[/red]")
        if len(errors) > 20:
            console.print(f"[red]... and {len(errors) - 20} more invalid lines[/red]")
        if not skip_invalid:
            console.print("nothing was submitted; fix the lines above or pass --skip-invalid")
            return 2
    if not jobs:
        console.print("no jobs to submit")
        return 2
    async with await Client.connect(url, prefix=prefix) as client:
        with _progress(console) as progress:
            sent = progress.add_task("submitted", total=len(jobs))
            done = progress.add_task("results  ", total=len(jobs), visible=wait)
            counts: Counter[str] = Counter()
            async with anyio.create_task_group() as tg:
                if wait:
                    tg.start_soon(_collect, client, jobs, out, progress, done, counts)
                await client.submit_many(jobs, tier, progress=lambda n: progress.advance(sent, n))
        console.print(f"submitted {len(jobs)} jobs to tier {tier!r}" + (f", batch {batch!r}" if batch else ""))
        if not wait:
            return 0
        console.print("results: " + ", ".join(f"{status} {n}" for status, n in sorted(counts.items())))
        return 0 if counts.get("succeeded", 0) == len({j.id for j in jobs}) else 1


async def _collect(client: Client, jobs: list[Job], out: Path | None, progress: Progress, task, counts: Counter) -> None:
    expected = {job.id for job in jobs}
    batches = {job.batch for job in jobs}
    seen: set[str] = set()
    sink = out.open("w") if out else None
    try:
        async with anyio.create_task_group() as tg:
            for batch in batches:
                tg.start_soon(_follow, client, batch, expected, seen, sink, progress, task, counts, tg)
    finally:
        if sink:
            sink.close()


async def _follow(client: Client, batch, expected, seen, sink, progress, task, counts, tg) -> None:
    async for result in client.results(batch, follow=True):
        if result.job_id not in expected or result.job_id in seen:
            continue
        seen.add(result.job_id)
        counts[result.status] += 1
        if sink:
            sink.write(result.model_dump_json(by_alias=True) + "\n")
        failed = sum(n for status, n in counts.items() if status != "succeeded")
        progress.update(task, advance=1, description=f"results   (failed {failed})")
        if len(seen) == len(expected):
            tg.cancel_scope.cancel()
            return
