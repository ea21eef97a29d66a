"""`ratefleet results --batch B [--wait] [--out F] [--order input] [--out-format openai]` and `ratefleet result JOB_ID`.

`results` writes every Result stored under batch B as JSONL (to F, else stdout), one per job
(RATEFLEET_RESULTS keeps one per job id). `--wait` follows until the batch is complete: the
number of jobs comes from the record `ratefleet submit` leaves (`ratefleet.batches`), so the
input file is not needed. `--order input` puts Results in the file's line order using the line
number in the deterministic ids, holding back only Results that arrive before an earlier
line's (known gaps — blank, invalid, own-id lines — are skipped using the record).

A `dlq replay` of a job supersedes its Result (ratefleet.results_replays): one Result counts per
line, the latest replay written in place of the original (at its line with `--order input`).
`--out -` is stdout.

Exit codes: 0 every Result succeeded (and, with a record, the batch is complete); 1 some
failed or are missing; 2 usage error or nothing known of the batch/job; 130 Ctrl-C; 141 stdout's
reader went away (cli_support.quiet_broken_pipe).
"""

from __future__ import annotations

import contextlib
import functools
import shlex
import signal
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import TextIO

import anyio
import typer
from rich.console import Console

from ratefleet.batches import (
    BatchRecord,
    InputOrder,
    load_record,
    own_ids_note,
    queue_lost,
    queue_mark,
    replays_sent,
    waiting_hint,
)
from ratefleet.cli_support import (
    batch_value,
    check_wait_nats_s,
    client_target,
    connection_args,
    fail,
    make_console,
    nats_lost,
    require_out_path,
    ride_out_nats,
    run_async,
)
from ratefleet.client import Client
from ratefleet.key_watch import watch_keys
from ratefleet.openai_batch import format_result
from ratefleet.phases import Phases
from ratefleet.results_replays import Replays, gave_up, replay_hint, replay_of, scan_replays
from ratefleet.runtime.connect import redact_url
from ratefleet.schemas import Result
from ratefleet.schemas.config_nats import NatsAuthConfig
from ratefleet.schemas.subjects import is_token
from ratefleet.submit_report import count_results

RECORD_POLL_S = 2.0
# the same options as the other client commands (ratefleet/cli.py)
ConfigOpt = typer.Option(None, "--config", "-c", help="TOML config (else $RATEFLEET_CONFIG, else ./ratefleet.toml)")
NatsOpt = typer.Option(None, "--nats", envvar="RATEFLEET_NATS_URL",
                       help="NATS URL, over the config's [nats].url (default nats://127.0.0.1:4222)")
PrefixOpt = typer.Option(None, "--prefix", help="subject prefix, over the config's [nats].prefix (default ratefleet)")


@dataclass
class Collect:
    """One `results` run: where Results go, how many came, and the batch's record."""

    batch: str
    sink: TextIO
    order: InputOrder | None
    record: BatchRecord | None
    wait: bool
    count: int = 0           # lines with a Result (a replay counts for the line it replays)
    statuses: Counter = field(default_factory=Counter)
    stale: bool = False
    stored_before: int = 0  # Results the batch had when this run began (read back at once: not in the rate)
    lost: str | None = None  # how the NATS server lost the queued jobs waited for (batches.queue_lost)
    replays: Replays = field(default_factory=Replays)
    out_format: str = "ratefleet"  # or "openai": OpenAI Batch output lines
    open_lines: dict[str, str] = field(default_factory=dict)  # root id -> status, lines not succeeded
    swap: dict[str, Result] = field(default_factory=dict)      # held for --order input: original -> replay
    superseded: int = 0      # Results replaced by a later replay of the same line
    given_up: dict[str, bool] = field(default_factory=dict)  # root id -> its Result has a GAVE_UP code
    replays_sent: int = 0    # jobs `dlq replay` sent again for the batch (batches.replays_sent)
    lost_nats: str | None = None  # why the read stopped: NATS went away or stopped answering (cli_support.nats_lost)
    held: dict[str, tuple[Result, Result]] = field(default_factory=dict)  # root -> (its Result, the one shown)
    doubled: int = 0         # lines written twice: the original went out before `dlq replay` sent it again
    out: dict[str, bool] = field(default_factory=dict)  # root of a line not succeeded -> written (False: queued)

    async def take(self, client: Client, result: Result) -> None:
        """Count and write one stored Result; a replay stands in for the Result it replays.

        With --wait, while `dlq replay` has sent jobs of the batch whose Results are not back
        (`replays_out`), a line that did not succeed is held, not written: its replay may come
        and take its place. It goes out when its replay comes, when no replay is pending any more,
        or at the end (`finish`). A line written before a replay of it was sent (the replay was
        sent during this wait) cannot be taken back: the replay is written after it (`doubled`)."""
        root = self.replays.roots.get(result.job_id)
        if root is not None:
            return  # found by the first scan: written in place of its original
        root = self.replays.add(result.job_id, replay_of(result.metadata))
        if root is not None:  # stored since the scan (--wait): its original may be written already
            if root in self.open_lines:
                self.statuses[self.open_lines.pop(root)] -= 1
                self.count -= 1
                self.superseded += 1
            self._count(root, result)
            if root in self.held:
                self.held[root] = (self.held[root][0], result)
                if not self._holds(result):
                    self._release(root)
            elif self.out.get(root) is False:  # in --order input's buffer, not written yet: takes its place
                self.swap[root] = result
            else:
                self.doubled += root in self.out
                self._write(result)
            self._release_all_if_none_pending()
            return
        shown, latest = result, self.replays.latest.get(result.job_id)
        if latest is not None:
            shown = await client.stored_result(latest) or result
            self.superseded += shown is not result
        self._count(result.job_id, shown)
        if self._holds(shown):
            self.held[result.job_id] = (result, shown)
        else:
            self._emit(result, shown)
            self._release_all_if_none_pending()

    @property
    def replays_out(self) -> int:
        """Jobs `dlq replay` sent again for the batch whose Results have not been read yet."""
        return self.replays_sent - len(self.replays.roots)

    def _holds(self, shown: Result) -> bool:
        return self.wait and shown.status != "succeeded" and self.replays_out > 0

    def _release(self, root: str) -> None:
        """Write a held line (`_emit`)."""
        self._emit(*self.held.pop(root))

    def _emit(self, original: Result, shown: Result) -> None:
        """Write a line: the latest Result for it (`shown`), at `original`'s place with --order input."""
        root = original.job_id
        if shown is not original:
            self.swap[root] = shown
        if shown.status != "succeeded":
            self.out[root] = False
        for ready in self.order.push(original) if self.order else [original]:
            self._put(ready)

    def _put(self, ready: Result) -> None:
        """Write a line the order releases (its latest replay in its place)."""
        if ready.job_id in self.out:
            self.out[ready.job_id] = True
        self._write(self.swap.pop(ready.job_id, ready))

    def _release_all_if_none_pending(self) -> None:
        if self.held and self.replays_out <= 0:
            for root in list(self.held):
                self._release(root)

    def _count(self, root: str, shown: Result) -> None:
        self.count += 1
        self.statuses[shown.status] += 1
        if gave_up(shown):
            self.given_up[root] = True
        else:  # a replay that ended otherwise stands for its line
            self.given_up.pop(root, None)
        if shown.status != "succeeded":
            self.open_lines[root] = shown.status

    def _write(self, result: Result) -> None:
        self.sink.write(format_result(result, self.out_format) + "\n")

    def finish(self) -> None:
        for root in list(self.held):  # the wait ended with replays still out: each line as it stands
            self._release(root)
        for ready in self.order.flush() if self.order else []:
            self._put(ready)
        self.sink.flush()

    @property
    def complete(self) -> bool:
        """Every line has a Result, and every replay `dlq replay` counted for the batch its own."""
        record = self.record
        return (record is not None and record.state != "submitting" and self.count >= record.jobs
                and len(self.replays.roots) >= self.replays_sent)


def results(batch: str = typer.Option(..., "--batch", "-b", metavar="NAME", callback=batch_value,
                                   help="the batch name `submit` printed first"),
            wait: bool = typer.Option(False, "--wait", is_flag=True, metavar="",
                                      help="follow until every job of the batch has a Result"),
            out: Path | None = typer.Option(None, "--out", "-o", help="write Results here (JSONL; default or '-': stdout)"),
            order: str = typer.Option("arrival", "--order", help="arrival (as stored) or input (the file's line order)"),
            out_format: str = typer.Option("ratefleet", "--out-format", metavar="FORMAT",
                                           help="ratefleet (Result JSON) or openai (OpenAI Batch output lines)"),
            config: Path | None = ConfigOpt, nats: str | None = NatsOpt, prefix: str | None = PrefixOpt):
    """Collect the Results of a batch as JSONL; --wait follows until the batch is complete."""
    if order not in ("arrival", "input"):
        fail(f"--order must be 'arrival' or 'input', not {order!r}")
    if out_format not in ("ratefleet", "openai"):
        fail(f"--out-format must be 'ratefleet' or 'openai', not {out_format!r}")
    if not is_token(batch):
        fail(f"--batch {batch!r} must be 1-128 of A-Z a-z 0-9 _ -")
    out = None if out is not None and str(out) == "-" else require_out_path(out)  # `--out -`: stdout
    if wait:
        check_wait_nats_s()
    target = client_target(config, nats, prefix)
    console = make_console(stderr=True)
    code = _run(_collect_batch, console, batch, wait, out, order == "input", target.url, target.prefix, out_format,
                target.nats, target.config_args)
    raise typer.Exit(code)


def result(job_id: str = typer.Argument(..., help="a job id"), config: Path | None = ConfigOpt,
           nats: str | None = NatsOpt, prefix: str | None = PrefixOpt):
    """Print one job's stored Result (JSON); exit 0 if it succeeded, 1 if not, 2 if none is stored.
    A job that did not succeed and was replayed (`ratefleet dlq replay`) also gets a line on
    stderr naming its latest replay and how that ended (an operations trial: after a replay of
    every given-up job succeeded, `result` of an original id said `failed`, with no hint of the
    replay's id, and the dead letter that held it was gone)."""
    if not is_token(job_id):
        fail(f"{job_id!r} is not a job id (1-128 of A-Z a-z 0-9 _ -)")
    target = client_target(config, nats, prefix)

    async def lookup() -> tuple[Result | None, Result | None]:
        async with await Client.connect(target.url, prefix=target.prefix, auth=target.nats, reconnect_forever=False) as client:
            found = await client.stored_result(job_id)
            replay = None
            if found is not None and not found.ok and found.batch is not None:
                latest = (await scan_replays(client, found.batch)).latest.get(job_id)
                if latest is not None:
                    replay = await client.stored_result(latest, found.batch)
            return found, replay

    found, replay = _run(lookup)
    if found is None:
        fail(f"no Result stored for job {job_id}: it is still queued or running, was never submitted, "
             "or its Result expired (streams.results_max_age_s)")
    typer.echo(found.model_dump_json(by_alias=True, indent=2))
    if replay is not None:
        typer.echo(f"note: job {job_id} was replayed (`ratefleet dlq replay`); its latest replay {replay.job_id} "
                   f"{replay.status}: `ratefleet result {replay.job_id}` (`ratefleet results --batch {found.batch}` "
                   "writes it in place of this one)", err=True)
    raise typer.Exit(0 if found.ok else 1)


def register(app: typer.Typer) -> None:
    """Add `results` and `result` to the `ratefleet` command line."""
    app.command("results")(results)
    app.command("result")(result)


def _run(fn, *args):
    return run_async(fn, *args, term_as_interrupt=True)


async def _collect_batch(console: Console, batch: str, wait: bool, out: Path | None, by_input: bool,
                         url: str, prefix: str, out_format: str = "ratefleet",
                         auth: NatsAuthConfig | None = None, config_args: tuple[str, ...] = ()) -> int:
    # --wait reconnects for ever and rides out NATS being away for up to wait_nats_s() (ride_out_nats)
    async with await Client.connect(url, prefix=prefix, auth=auth, reconnect_forever=wait) as client:
        record = await load_record(client.js, client.subjects, batch)
        if wait and record is None:
            console.print(f"error: batch {batch} has no record (it was not sent with `ratefleet submit`, or it "
                          "expired), so --wait cannot know when it is complete; without --wait you get what is "
                          "stored", markup=False, highlight=False, soft_wrap=True)
            return 2
        sent = await replays_sent(client.js, client.subjects, batch)  # (before the scan: a replay counted is seen)
        replays = await scan_replays(client, batch)
        sink = out.open("w", encoding="utf-8") if out else sys.stdout
        run = Collect(batch, sink, InputOrder(record.gaps if record else None) if by_input else None, record, wait,
                      replays=replays, out_format=out_format, replays_sent=sent)
        if wait:
            run.stored_before = await count_results(client, batch)
        interrupted = False
        try:
            with Phases(console) as phases:
                interrupted = await _follow(client, run, phases)
        except BaseException as exc:
            if (cause := nats_lost(exc)) is None:
                raise
            run.lost_nats = cause
        finally:
            run.finish()
            if out:
                sink.close()
        code = _report(console, run, out, interrupted, url, prefix, config_args)
        if run.lost_nats is not None:  # (said already: closing a client whose NATS is gone can fail as well)
            with contextlib.suppress(Exception):
                await client.close()
    return code


async def _follow(client: Client, run: Collect, phases: Phases) -> bool:
    """Read (and with --wait, follow) the batch's Results; True when Ctrl-C stopped it."""
    handle = phases.start("results", run.record.jobs if run.record else None, unit="results", base=run.stored_before)
    interrupted = False
    async with anyio.create_task_group() as tg:
        async def on_sigint() -> None:
            nonlocal interrupted
            with anyio.open_signal_receiver(signal.SIGINT) as signals:
                async for _ in signals:
                    interrupted = True
                    tg.cancel_scope.cancel()

        tg.start_soon(on_sigint)
        if run.wait:
            tg.start_soon(ride_out_nats, client, phases.print)
            tg.start_soon(_watch_record, client, run, tg.cancel_scope)
            tg.start_soon(_watch_queue, client, run, await queue_mark(client.js, client.subjects), tg.cancel_scope)
            tg.start_soon(functools.partial(phases.remind, handle,
                                            hint=functools.partial(waiting_hint, client.js, client.subjects, run.batch)))
            tg.start_soon(watch_keys, client, phases.print)
        if not (run.wait and run.complete):
            async for item in client.results(run.batch, follow=run.wait):
                await run.take(client, item)
                phases.update(handle, completed=run.count)
                if run.wait and run.complete:
                    break
        tg.cancel_scope.cancel()
    phases.finish(handle)
    return interrupted


async def _watch_record(client: Client, run: Collect, scope: anyio.CancelScope) -> None:
    """With --wait: pick up the final count of a batch still being submitted; stop when complete or when
    the submit died (its record went stale)."""
    while True:
        await anyio.sleep(RECORD_POLL_S)
        try:
            record = await load_record(client.js, client.subjects, run.batch)
            sent = await replays_sent(client.js, client.subjects, run.batch)
        except Exception as exc:
            if nats_lost(exc) is None:
                raise
            continue  # NATS away: ride_out_nats says so, and ends the wait if it stays away
        if record is not None:
            run.record = record
        run.replays_sent = max(run.replays_sent, sent)
        if run.complete or (run.record is not None and run.record.stale(time.time())):
            run.stale = not run.complete
            scope.cancel()
            return


async def _watch_queue(client: Client, run: Collect, since, scope: anyio.CancelScope) -> None:
    """With --wait: stop when the NATS server loses the queued jobs (_report says what to do)."""
    run.lost = await queue_lost(client.js, client.subjects, since)
    scope.cancel()


def _report(console: Console, run: Collect, out: Path | None, interrupted: bool, url: str, prefix: str,
            config_args: tuple[str, ...] = ()) -> int:
    summary = (", ".join(f"{status} {n:,}" for status, n in sorted(run.statuses.items()) if n > 0)
               or "no Results stored yet")
    say = lambda text: console.print(text, markup=False, highlight=False, soft_wrap=True)  # noqa: E731
    record = run.record
    total = f" of {record.jobs:,}" if record else ""
    say(f"batch {run.batch}: {run.count:,}{total} results ({summary})" + (f"; written to {out}" if out else ""))
    again = ["ratefleet", "results", "--batch", run.batch, "--wait"] + (["--out", str(out)] if out else [])
    again += connection_args(url, prefix, config_args)
    missing = (record.jobs - run.count) if record else 0
    if run.superseded:
        noun = "Result was" if run.superseded == 1 else "Results were"
        say(f"{run.superseded:,} {noun} replaced by a later `dlq replay` of the same line (counted once, "
            "the latest replay written in their place)")
    if run.doubled:
        say(f"{run.doubled:,} of them had been written before their replay was read (it was sent or stored "
            f"while this command ran): {'its line is' if run.doubled == 1 else 'their lines are'} in the output "
            "more than once, the replay after the original; `ratefleet results` again writes each line once")
    pending = run.replays_out
    still = max(missing, 0) + max(pending, 0)  # (a replay not back runs for a line already counted)
    if pending > 0:  # replayed and not back yet: replaying them again would pay twice
        one = pending == 1
        say(f"{pending:,} {'job' if one else 'jobs'} of batch {run.batch} {'was' if one else 'were'} sent again "
            f"by `ratefleet dlq replay` and {'has' if one else 'have'} no Result yet (still queued or running); "
            f"wait for {'it' if one else 'them'} with: {shlex.join(again)}")
    elif run.given_up:
        say(replay_hint(run.batch, len(run.given_up), connection_args(url, prefix, config_args)))
    if note := own_ids_note(run.order):
        say(note)
    if record is not None and record.jobs == 0 and record.lines and run.count == 0:
        say(f"none of the {record.lines:,} lines of batch {run.batch} has a job of its own here: their ids were "
            "already stored under other batches (or the lines were invalid); see each with `ratefleet result ID`")
    if run.lost_nats is not None:
        say(f"error: {run.lost_nats} while reading the Results of batch {run.batch}; {still:,} jobs have no Result "
            f"here yet (they keep running once NATS is back); carry on then with: {shlex.join(again)}")
        return 1
    if interrupted:
        say(f"interrupted: {still:,} jobs are still queued or running; collect them with: {shlex.join(again)}")
        return 130
    if run.lost:
        say(f"error: the NATS server lost the jobs of batch {run.batch} still queued: {run.lost}. "
            f"{max(missing, 0):,} jobs have no Result and are no longer queued; send them again with the same "
            f"`ratefleet submit FILE --batch {run.batch}` command (lines with a stored Result are not sent again)")
        return 1
    if run.stale:
        say(f"the submit of batch {run.batch} stopped before it finished (no update for a while); run the same "
            "`ratefleet submit ... --batch` command again to send the rest")
    elif missing > 0:
        say(f"{missing:,} jobs have no Result yet; wait for them with: {shlex.join(again)}")
    if record is None and run.count == 0:
        say(f"no batch {run.batch} is known at {redact_url(url)}" + ("" if prefix == "ratefleet" else f" (prefix {prefix})")
            + ": no record of its submit and no Result; check the name (`ratefleet submit` printed it first) and "
            "--nats, or it is older than the streams keep")
        return 2
    failed = run.count - run.statuses.get("succeeded", 0)
    return 0 if failed == 0 and missing <= 0 and not run.stale else 1
