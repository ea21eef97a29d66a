"""`ratefleet submit`: a JSONL file in, one durable job per line, optionally the Results out.

Order of work, all in constant memory (one line at a time, 8 bytes per job for the id set):

1. print the batch name (given, or generated) first, so an interrupted run can be resumed;
2. check NATS and the tier (fails in well under a second when nothing answers);
3. pass 1 validates every line (nothing is sent if a line is bad, unless --skip-invalid);
4. pass 2 reads the file again and publishes, pipelined, with a bounded window of
   unacknowledged publishes; `--wait` follows the batch's Results meanwhile and writes each
   as it comes.

Lines without an `id` get a deterministic one (`ratefleet.batchfile.line_job_id`), so the same
command run again inside the dedup window sends nothing twice: it says how many lines were
already stored and waits only for this batch's jobs. A line whose own id was already stored
under another batch is looked up: its stored Result is written, or the user is told where it
is queued; `--wait` never waits for it. Ctrl-C exits 130 and prints how many jobs are still
queued, the command that collects them and this command again with `--batch` (a run without it
would be a new batch and pay every line again).
"""

from __future__ import annotations

import contextlib
import functools
import json
import shlex
import signal
import sys
import threading
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import anyio
from pydantic import ValidationError

from ratefleet.batches import (
    BatchRecord,
    InputOrder,
    load_record,
    queue_lost,
    queue_mark,
    save_record,
    waiting_hint,
)
from ratefleet.batchfile import (
    REPEATS_KEPT,
    IdSet,
    LineError,
    Validation,
    id_hash,
    iter_lines,
    line_of,
    packed_problem,
    parse_line,
    spool_stdin,
    stdin_spool_path,
    validate_file,
)
from ratefleet.cli_support import make_console, nats_lost, ride_out_nats
from ratefleet.client import Client, Stored
from ratefleet.key_watch import watch_keys
from ratefleet.phases import Phases
from ratefleet.runtime.cancels import is_cancelled
from ratefleet.schemas import Job
from ratefleet.schemas.config_nats import NatsAuthConfig
from ratefleet.schemas.errors import NatsUnavailable, SubmitError
from ratefleet.schemas.subjects import NO_BATCH, is_token
from ratefleet.submit_report import (
    Run,
    check_tier,
    count_results,
    fleet_upstreams,
    report_end,
    report_interrupt,
    stored_ids,
)


def new_batch_name() -> str:
    """`submit-<UTC yyyymmddThhmmss>-<6 hex>`: the batch name when --batch is not given."""
    return "submit-" + datetime.now(UTC).strftime("%Y%m%dT%H%M%S") + "-" + uuid.uuid4().hex[:6]


async def run_submit(file: Path, tier: str, batch: str | None, wait: bool, out: Path | None, skip_invalid: bool,
                     url: str, prefix: str, out_format: str = "ratefleet", by_input: bool = False,
                     auth: NatsAuthConfig | None = None, upstream: str | None = None,
                     config_args: tuple[str, ...] = (), rejects: Path | None = None) -> int:
    """Run the command; returns the exit code (0 all stored/succeeded, 1 some failed, 2 input, 130 Ctrl-C).
    `rejects`: a file to write every invalid line to, as {"line", "error", "id"?, "custom_id"?} JSON lines.
    `out_format`: "ratefleet" (Result JSON) or "openai" (OpenAI Batch output lines); `by_input`: write
    Results in the file's line order (holding back only those that arrive before an earlier line's);
    `upstream`: the upstream of the lines that name none."""
    console = make_console(stderr=True)  # plain under NO_COLOR / not a terminal

    def say(text: str) -> None:
        console.print(text, markup=False, highlight=False, soft_wrap=True)

    if batch is not None and not is_token(batch):
        say(f"error: --batch {batch!r} must be 1-128 of A-Z a-z 0-9 _ -")
        return 2
    if batch == NO_BATCH:  # the results subject's "no batch": its Results would mix with every unbatched job's
        say(f"error: --batch {NO_BATCH} is reserved (it stands for jobs without a batch); choose another name")
        return 2
    if str(file) != "-" and not file.is_file():
        say(f"error: no such file: {file}")
        return 2
    if upstream is not None and (problem := _upstream_name_problem(upstream)):
        say(f"error: --upstream {upstream!r}: {problem}")
        return 2
    run = Run(file=file, tier=tier, batch=batch or new_batch_name(), wait=wait, out=out, url=url, prefix=prefix,
              out_format=out_format, by_input=by_input, upstream=upstream, config_args=config_args,
              skip_invalid=skip_invalid, rejects=rejects)
    # first: the name a resume needs (a run without --batch would make a new batch and pay again)
    say(f"batch {run.batch}" if batch else f"batch {run.batch}; re-run with --batch {run.batch} to resume")
    work = _Work(run)  # what Ctrl-C stops; the report of what it left behind runs after it
    try:
        async with anyio.create_task_group() as guard:
            guard.start_soon(_watch_sigint, work)
            try:
                return await _connected(run, work, file, skip_invalid, auth, console, say)
            finally:
                guard.cancel_scope.cancel()
    finally:
        if run.interrupted:  # the report is out and only the exit is left: one more Ctrl-C must not
            signal.signal(signal.SIGINT, signal.SIG_IGN)  # turn it into a KeyboardInterrupt traceback


def _upstream_name_problem(name: str) -> str | None:
    """Why `name` cannot be a Job's `upstream` (empty, or the Job model's own check), or None."""
    if not name.strip():
        return "an upstream name is not empty; name one of the fleet's upstreams"
    try:
        Job.model_validate({"request": {"path": "/"}, "upstream": name})
    except ValidationError as exc:
        return "; ".join(error["msg"] for error in exc.errors())
    return None


class _Work:
    """The steps Ctrl-C stops, one cancel scope each (`step()`); once interrupted, a step
    that starts is cancelled at once."""

    def __init__(self, run: Run) -> None:
        self.run = run
        self.scope: anyio.CancelScope | None = None

    def stop(self) -> None:
        self.run.interrupted = True
        if self.scope is not None:
            self.scope.cancel()

    @contextlib.contextmanager
    def step(self) -> Iterator[None]:
        with anyio.CancelScope() as scope:
            if self.run.interrupted:
                scope.cancel()
            self.scope = scope
            try:
                yield
            finally:
                self.scope = None


async def _watch_sigint(work: _Work) -> None:
    """From before the connection until the command's last line: the first Ctrl-C stops the
    work (the report of what is stored and the commands to carry on follow); later ones change
    nothing, so they cannot cut that report short."""
    with anyio.open_signal_receiver(signal.SIGINT) as signals:
        async for _ in signals:
            work.stop()


async def _connected(run: Run, work: _Work, file: Path, skip_invalid: bool,
                     auth: NatsAuthConfig | None, console, say) -> int:
    async with contextlib.AsyncExitStack() as stack:
        problem: str | None = None
        with work.step():  # Ctrl-C while connecting or checking the tier: the client (if any) is closed
            # --wait reconnects for ever and rides out NATS being away for up to wait_nats_s() (ride_out_nats)
            client = await stack.enter_async_context(await Client.connect(run.url, prefix=run.prefix, auth=auth,
                                                                          reconnect_forever=run.wait))
            problem = await check_tier(client, run.tier)
        if run.interrupted:
            say(f"interrupted before anything was sent; run it again with: {run.submit_command()}")
            return 130
        if problem:
            say(f"error: {problem}; nothing was sent")
            return 2
        path = await _spool_stdin(work) if str(file) == "-" else file
        if path is None:  # Ctrl-C while reading standard input
            say(f"interrupted while reading standard input; nothing was sent; run it again with: "
                f"{run.submit_command()}")
            return 130
        try:
            with Phases(console) as phases:
                return await _interruptible(run, work, client, path, phases, skip_invalid)
        finally:
            if path is not file:
                path.unlink(missing_ok=True)


async def _spool_stdin(work: _Work) -> Path | None:
    """Standard input copied to a temporary file, or None when Ctrl-C came first (the file is
    then removed). The copy runs in a daemon thread: a blocking read in the event loop would
    hold the Ctrl-C back until the producer closes the pipe, and an abandoned copy must not
    keep the process from exiting."""
    path = stdin_spool_path()
    done = threading.Event()
    failure: list[BaseException] = []

    def copy() -> None:
        try:
            spool_stdin(path)
        except BaseException as exc:  # noqa: BLE001 - raised again below, in the command
            failure.append(exc)
        finally:
            done.set()

    threading.Thread(target=copy, name="ratefleet-stdin", daemon=True).start()
    with work.step():
        while not done.is_set():
            await anyio.sleep(0.05)
    if done.is_set() and not failure:
        return path
    path.unlink(missing_ok=True)
    if failure:
        raise failure[0]
    return None


async def _interruptible(run: Run, work: _Work, client: Client, path: Path, phases: Phases,
                         skip_invalid: bool) -> int:
    code = 0
    with work.step():
        try:
            code = await _submit(run, client, path, phases, skip_invalid)
        except BaseException as exc:
            if (cause := nats_lost(exc)) is None or run.found is None:
                raise
            phases.print(f"error: {cause} while {'waiting for Results' if run.submitted else 'submitting'}; what "
                         "is stored stays stored and runs once NATS is back; carry on then with the commands below")
            report_interrupt(run, phases, head="stopped")
            return 1
        finally:
            run.flush_held()
            if run.sink is sys.stdout:
                run.sink.flush()
            elif run.sink is not None:
                run.sink.close()
    if run.interrupted:
        if not run.submitted:  # a finished submission keeps its "submitted" record and count
            with anyio.CancelScope(shield=True):
                await _save(client, run, "interrupted")
        report_interrupt(run, phases)
        return 130
    return code


async def _submit(run: Run, client: Client, path: Path, phases: Phases, skip_invalid: bool) -> int:
    if str(run.file) == "-" and (problem := packed_problem(path, "standard input")) is not None:  # (a file: cli.py)
        phases.print(f"error: {problem}")
        return 2
    if await _cancelled(client, run.batch):
        phases.print(f"error: batch {run.batch} was cancelled (`ratefleet cancel`): its jobs would end without a call; "
                     "nothing was submitted: submit under another --batch name")
        return 2
    # lines the dispatcher would refuse are refused here (and a tier the live config lacks is named)
    run.upstreams = await fleet_upstreams(client, warn=phases.print, tier=run.tier)
    if await client.no_dispatcher(timeout=0.5):
        phases.print(f"note: no dispatcher is running (nothing answers {client.subjects.admin_status}): the jobs are "
                     "stored and wait until one starts (`ratefleet up`, or `ratefleet dispatcher` and workers)")
    if run.upstream is not None and run.upstreams is not None and run.upstream not in run.upstreams:
        phases.print(f"error: --upstream {run.upstream!r} is not one of this fleet's upstreams "
                     f"({', '.join(sorted(run.upstreams))}); nothing was submitted")
        return 2
    found = await _validate(run, path, phases)
    if found.repeated_custom_ids:  # not a bad line to skip: which of the lines is meant cannot be told
        n = found.repeated_custom_ids
        repeats = _custom_id_repeats(run, path, found.custom_ids.repeated)
        for number, custom_id, first in repeats[:SHOWN_REPEATS]:
            phases.print(f"line {number} repeats the custom_id {custom_id!r} of line {first}")
        if run.rejects is not None and repeats:  # (pass 1 rewrote the file: this run's lines only)
            with run.rejects.open("a", encoding="utf-8") as sink:
                for number, custom_id, first in repeats:
                    sink.write(json.dumps({"line": number, "error": f"repeats the custom_id of line {first}",
                                           "custom_id": custom_id}) + "\n")
        shown = min(len(repeats), SHOWN_REPEATS)
        named = ""
        if 0 < shown < n:
            named = f" ({shown:,} of them named above{'; all in --rejects' if run.rejects else ''})"
        phases.print(f"{n:,} {'line repeats' if n == 1 else 'lines repeat'} the custom_id of an earlier line{named}; "
                     "OpenAI's Batch API refuses such a file and their Results could not be told apart; nothing was "
                     "submitted: give each line its own custom_id")
        return 2
    if found.error_count and not skip_invalid:
        phases.print("nothing was submitted; fix the lines above or pass --skip-invalid")
        return 2
    if not found.jobs:
        phases.print("no jobs to submit")
        return 2
    run.found = found
    run.order = InputOrder(found.gaps) if run.by_input else None
    run.results_before = await count_results(client, run.batch)
    if run.results_before:  # a resumed batch: its lines with a Result are not sent again, also past the
        handle = phases.start("reading stored Results", run.results_before, unit="results")  # dedup window
        run.done_ids = await stored_ids(client, run.batch, run.results_before,
                                        lambda n: phases.update(handle, advance=n))
        phases.update(handle, completed=len(run.done_ids))  # (progress comes per 1,000)
        phases.finish(handle)
    run.before = await _record_before(client, run.batch)  # before this run's replaces it
    await _save(client, run, "submitting")
    since = await queue_mark(client.js, client.subjects) if run.wait else None
    if run.wait and run.out is not None:  # without --wait nothing is written here (the results command is)
        run.sink = sys.stdout if str(run.out) == "-" else run.out.open("w", encoding="utf-8")
    async with anyio.create_task_group() as tg:
        if run.wait:
            tg.start_soon(ride_out_nats, client, phases.print)
            tg.start_soon(_follow, run, client, phases)
            tg.start_soon(_watch_queue, run, client, since)
        tg.start_soon(_refresh_record, run, client)
        try:
            await _publish_all(run, client, path, phases)
        except SubmitError as exc:  # refused mid-way (queue full, NATS gone): say what is stored
            with anyio.CancelScope(shield=True), contextlib.suppress(Exception):
                await _save(client, run, "interrupted")
            raise type(exc)(f"{exc}. {run.stored:,} of {found.jobs:,} jobs are stored; once fixed, run the "
                            f"same command again (stored lines are not sent again): {run.submit_command()}") from None
        async with run.record_lock:
            run.submitted = True
            await _save(client, run, "submitted")
        report_end(run, phases, submitted_only=True)
        if run.unsent:  # what --wait would wait for is not known: never a wrong "complete", never a hang
            tg.cancel_scope.cancel()
            return 1
        run.check_collected()
        if run.wait:
            await run.all_collected.wait()
        tg.cancel_scope.cancel()
    if run.wait:
        return report_end(run, phases)
    if found.error_count:  # --skip-invalid: not every line was submitted (the README's exit code 1)
        phases.print(f"{found.error_count:,} invalid lines were skipped (not submitted{run.rejects_note()}); exit code 1")
        return 1
    return 1 if found.repeated_ids else 0  # those lines have no job (and no Result) of their own


SHOWN_REPEATS = 20  # lines repeating a custom_id named on the screen (--rejects has every one pass 1 kept)


def _custom_id_repeats(run: Run, path: Path, repeated: set[int]) -> list[tuple[int, str, int]]:
    """(line, custom_id, its first line) of each line repeating the custom_id of an earlier one,
    for the repeated custom_ids pass 1 kept (`IdSet.repeated`: up to REPEATS_KEPT of them)."""
    first: dict[str, int] = {}
    repeats: list[tuple[int, str, int]] = []
    for number, text in iter_lines(path):
        try:
            job = parse_line(text, number, run.batch, run.upstreams, upstream=run.upstream)
        except LineError:
            continue
        custom_id = job.metadata.get("custom_id")
        if isinstance(custom_id, str) and id_hash(custom_id) in repeated:
            if custom_id in first:
                repeats.append((number, custom_id, first[custom_id]))
            else:
                first[custom_id] = number
    return repeats


async def _validate(run: Run, path: Path, phases: Phases) -> Validation:
    size = path.stat().st_size
    handle = phases.start("validating", size or None, unit="bytes")  # an empty file: no "1/1 bytes"
    stop = threading.Event()

    def progress(read: int) -> None:
        if stop.is_set():
            raise anyio.get_cancelled_exc_class()  # Ctrl-C: end the abandoned thread too
        anyio.from_thread.run_sync(lambda: phases.update(handle, completed=read))

    def validate() -> Validation:
        if run.rejects is None:
            return validate_file(path, run.batch, progress, run.upstreams, upstream=run.upstream)
        with run.rejects.open("w", encoding="utf-8") as sink:  # rewritten on every run: never last run's lines
            return validate_file(path, run.batch, progress, run.upstreams, upstream=run.upstream,
                                 rejects=lambda record: sink.write(json.dumps(record) + "\n"))

    try:  # in a thread, so Ctrl-C and the progress display keep working during a long pass
        found = await anyio.to_thread.run_sync(validate, abandon_on_cancel=True)
    finally:
        stop.set()
    if size:
        phases.update(handle, completed=size)
    phases.finish(handle)
    for line in found.errors:
        phases.print(line, style="red")
    if found.error_count > len(found.errors):
        phases.print(f"... and {found.error_count - len(found.errors):,} more invalid lines"
                     + (f" (every one is in {run.rejects})" if run.rejects is not None
                        else " (pass --rejects FILE to have every one written there, one JSON object a line)"))
    elif found.error_count and run.rejects is not None:
        phases.print(f"the invalid lines are also in {run.rejects}")
    if found.error_count and not found.jobs and (hint := _not_jsonl_hint(path)):
        phases.print(hint)
    phases.print(f"{found.jobs:,} valid {'job' if found.jobs == 1 else 'jobs'} on {found.lines:,} "
                 f"{'line' if found.lines == 1 else 'lines'}"
                 + (f", {found.error_count:,} invalid" if found.error_count else "")
                 + (f", {found.repeated_ids:,} repeat an id of an earlier line" if found.repeated_ids else ""))
    return found


def _jobs(run: Run, path: Path):
    """Pass 2: the valid lines again, as jobs. A line edited since pass 1 (its id is not one
    pass 1 saw) is not sent: `--wait` could never count its Result. At the end, `Run.unsent`
    is how many distinct ids pass 1 validated that pass 2 did not send (lines edited, or gone
    from a file that shrank or was rewritten meanwhile)."""
    sent = IdSet()
    repeated = run.found.ids.repeated
    first_line: dict[str, int] = {}  # of the few ids pass 1 found repeated
    for number, text in iter_lines(path):
        try:
            job = parse_line(text, number, run.batch, run.upstreams, upstream=run.upstream)
        except LineError:
            continue  # reported by pass 1 (--skip-invalid)
        key = id_hash(job.id)  # once per line: the lookup, the sent set and the repeats share it
        if key in repeated:
            if job.id not in first_line:
                first_line[job.id] = number
            elif len(run.repeats) < REPEATS_KEPT:
                run.repeats.append((number, job.id, first_line[job.id]))
        if not run.found.ids.has_key(key):
            run.changed.append(number)
            continue
        sent.add_key(key)
        run.handed += 1  # `stored` counts it too once acknowledged, or now when skipped below
        if run.done_ids is not None and run.done_ids.has_key(key):
            run.stored += 1  # its Result is stored: sending it again past the server's dedup window
            run.earlier += 1  # (duplicate_window_s) would pay for a call whose Result is then refused
            continue
        yield job
    sent.freeze()
    run.unsent = len(run.found.ids) - len(sent)


async def _publish_all(run: Run, client: Client, path: Path, phases: Phases) -> None:
    handle = phases.start("submitting", run.found.jobs, unit="jobs")
    # a batch run again: lines sent by an earlier run may still be queued past the dedup window
    stream = client.submit_stream(_jobs(run, path), run.tier, repeat=run.before is not None or bool(run.done_ids))
    async with contextlib.aclosing(stream):
        async for stored in stream:
            await _classify(run, client, stored)
            phases.update(handle, completed=run.stored)
    phases.finish(handle)


async def _classify(run: Run, client: Client, stored: Stored) -> None:
    """Count one acknowledged line: new, stored earlier under this batch, or another batch's."""
    run.stored += 1
    if not stored.duplicate:
        run.fresh += 1
        return
    job = stored.job
    if line_of(job.id) is not None and job.id.startswith(run.batch[:100]):
        run.earlier += 1  # a deterministic id of this batch (the cut batch name keeps >= 100 characters)
        return
    # whose job is it: the message JetStream kept (at `stored.seq`) while it is queued; once it is
    # done, its Result, under this batch first (an id reused from an older batch, e.g. last
    # night's, also has that batch's Result: taking any batch's first sent a resumed run's lines
    # to the older batch and wrote its old answers in their place)
    queued = await client.queued_job(stored.seq)
    result = None
    if queued is not None:
        owner = queued.batch
    else:
        result = await client.stored_result(job.id, run.batch) or await client.stored_result(job.id)
        owner = result.batch if result is not None else None
    if owner == run.batch or job.id in run.foreign_ids:  # (a line repeating an id of this file: one job)
        run.earlier += 1
        return
    run.foreign_ids.add(job.id)
    run.foreign += 1
    if result is not None:
        run.write(result, foreign=True)
    elif len(run.foreign_queued) < 10:
        run.foreign_queued.append((job.id, owner))
    else:
        run.foreign_queued_more += 1


async def _follow(run: Run, client: Client, phases: Phases) -> None:
    handle = phases.start("results", run.found.jobs, unit="results", base=run.results_before)
    async with anyio.create_task_group() as tg:
        tg.start_soon(functools.partial(phases.remind, handle,
                                        hint=functools.partial(waiting_hint, client.js, client.subjects, run.batch)))
        tg.start_soon(watch_keys, client, phases.print)
        async for result in client.results(run.batch, follow=True):
            if result.job_id not in run.found.ids:
                continue  # a Result of this batch from an older version of the file
            run.collected += 1
            run.write(result)
            phases.update(handle, completed=run.collected, total=run.expected)
            if run.check_collected():
                break
        tg.cancel_scope.cancel()
    phases.finish(handle)


_HINT_LINE_CHARS = 1 << 16  # how much of the first line `_not_jsonl_hint` looks at


def _not_jsonl_hint(path: Path) -> str | None:
    """What to do with a file of no valid line that looks like JSON but not JSONL: one array,
    or objects spread over several lines (pretty-printed)."""
    try:
        with path.open("r", encoding="utf-8-sig", errors="replace") as handle:
            while (first := handle.readline(_HINT_LINE_CHARS)) and not first.strip():
                pass  # blank lines first
    except OSError:
        return None
    if len(first) >= _HINT_LINE_CHARS and not first.endswith("\n"):
        return None  # a first line this long is no pretty-printed opening: its own error says enough
    head, first_line = first.lstrip(), first.strip()
    if head.startswith("["):
        return ("the file looks like one JSON array; submit reads JSONL: one job (a JSON object) per line, "
                f"e.g. jq -c '.[]' {shlex.quote(str(path))} > jobs.jsonl")
    if head.startswith("{") and not first_line.endswith("}"):
        return ("the file looks like pretty-printed JSON (an object over several lines); submit reads JSONL: one job "
                f"per line, e.g. jq -c . {shlex.quote(str(path))} > jobs.jsonl")
    return None


async def _record_before(client: Client, batch: str) -> BatchRecord | None:
    """The batch's record from an earlier run (None: none, or it cannot be read)."""
    try:
        return await load_record(client.js, client.subjects, batch)
    except Exception:  # noqa: BLE001 - see docstring
        return None


async def _cancelled(client: Client, batch: str) -> bool:
    """Whether `batch` carries a cancel marker (False when it cannot be read: the dispatcher
    still ends a cancelled batch's jobs)."""
    try:
        return await is_cancelled(client.js, client.subjects, batch)
    except Exception:  # noqa: BLE001 - see docstring
        return False


async def _watch_queue(run: Run, client: Client, since) -> None:
    """--wait: end the wait when the NATS server loses the queued jobs (report_end says what to do)."""
    run.lost = await queue_lost(client.js, client.subjects, since)
    run.all_collected.set()


async def _refresh_record(run: Run, client: Client) -> None:
    """Keep the "submitting" record fresh (so `results --wait` can tell a killed submit) until sent."""
    while True:
        await anyio.sleep(5)
        async with run.record_lock:  # never after the "submitted" record
            if run.submitted:
                return
            with contextlib.suppress(Exception):
                await _save(client, run, "submitting")


async def _save(client: Client, run: Run, state: str) -> None:
    if run.found is None:
        return
    record = BatchRecord(batch=run.batch, tier=run.tier, state=state, lines=run.found.lines, gaps=run.found.gaps,
                         jobs=run.expected if state == "submitted" else run.stored - run.foreign)
    try:
        await save_record(client.js, client.subjects, record)
    except Exception as exc:  # noqa: BLE001 - the batch itself is stored; only `results --wait` loses its count
        raise NatsUnavailable(f"could not record batch {run.batch} ({type(exc).__name__})") from None
