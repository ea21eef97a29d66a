"""State of one `ratefleet submit` run and what it tells the user (summary, Ctrl-C, commands)."""

from __future__ import annotations

import shlex
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TextIO

import anyio
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy
from nats.js.errors import NotFoundError

from ratefleet.batches import BatchRecord, InputOrder, own_ids_note
from ratefleet.batchfile import IdSet, Validation
from ratefleet.cli_support import connection_args
from ratefleet.client import Client
from ratefleet.openai_batch import format_result
from ratefleet.results_replays import gave_up, replay_hint
from ratefleet.runtime.connect import denial_expected
from ratefleet.runtime.logs import redact_text
from ratefleet.schemas import Result
from ratefleet.schemas.config_store import CURRENT_KEY, StoredConfig
from ratefleet.schemas.errors import ConfigError, SubmitError
from ratefleet.schemas.job import UpstreamRoutes

FLUSH_EVERY = 500  # Results written between flushes of --out


CONFIG_READ_S = 0.5  # seconds for reading the fleet's live config (milliseconds when permitted)


@dataclass
class Run:
    """Counters of one submit run; `expected` is how many Results land in this batch."""

    file: Path
    tier: str
    batch: str
    wait: bool
    out: Path | None
    url: str
    prefix: str
    config_args: tuple[str, ...] = ()  # `--config FILE` when its [nats] holds credentials (ClientTarget)
    found: Validation | None = None
    interrupted: bool = False
    submitted: bool = False
    stored: int = 0          # lines acknowledged by JetStream (new or duplicate)
    handed: int = 0          # lines sent or skipped (their Result stored); minus `stored`: sent, not yet acknowledged
    fresh: int = 0           # new jobs
    earlier: int = 0         # stored before, under this batch (an earlier run or an earlier line)
    foreign: int = 0         # ids stored before under another batch
    foreign_ids: set[str] = field(default_factory=set)  # those ids: a line repeating one is a repeat, not one more
    foreign_queued: list[tuple[str, str | None]] = field(default_factory=list)
    foreign_queued_more: int = 0
    results_before: int = 0  # Results the batch had when this run started
    done_ids: IdSet | None = None  # (their id hashes) lines with one are not sent again, whenever it was
    changed: list[int] = field(default_factory=list)  # lines edited between the two passes (not sent)
    unsent: int = 0          # distinct ids the validation pass found that the send pass did not send
    repeats: list[tuple[int, str, int]] = field(default_factory=list)  # (line, id, its first line): the first 10
    collected: int = 0       # this batch's Results seen by --wait
    given_up: int = 0        # Results with a GAVE_UP code (each has a dead letter to replay)
    statuses: Counter = field(default_factory=Counter)
    written: int = 0
    sink: TextIO | None = None
    out_format: str = "ratefleet"  # or "openai": OpenAI Batch output lines
    by_input: bool = False
    order: InputOrder | None = None  # --order input: holds Results that arrive before an earlier line's
    upstreams: dict[str, str] | None = None  # the fleet's (name -> auth header), from its live config when readable
    upstream: str | None = None  # --upstream: for the lines that name none
    skip_invalid: bool = False  # --skip-invalid: a resume must skip the same bad lines, not refuse the file
    rejects: Path | None = None  # --rejects: every invalid line's number and error, one JSON object a line
    before: BatchRecord | None = None  # the batch's record from an earlier run (read before this run's)
    lost: str | None = None  # --wait: how the NATS server lost the queued jobs waited for (batches.queue_lost)
    all_collected: anyio.Event = field(default_factory=anyio.Event)
    record_lock: anyio.Lock = field(default_factory=anyio.Lock)

    @property
    def expected(self) -> int:
        return (len(self.found.ids) if self.found else 0) - self.foreign - len(self.changed)

    def write(self, result: Result, *, foreign: bool = False) -> None:
        """Count a Result (and write it to --out). `foreign`: another batch's, whose dead letter
        `dlq replay --batch` of this batch does not take (not counted as given up here)."""
        self.statuses[result.status] += 1
        self.given_up += gave_up(result) and not foreign
        self.written += 1
        for ready in self.order.push(result) if self.order is not None else [result]:
            self._emit(ready)

    def _emit(self, result: Result) -> None:
        if self.sink is not None:
            self.sink.write(format_result(result, self.out_format) + "\n")
            if self.written % FLUSH_EVERY == 0:
                self.sink.flush()

    def flush_held(self) -> None:
        """Write what --order input still holds (in line order), e.g. at the end or on Ctrl-C."""
        for ready in self.order.flush() if self.order is not None else []:
            self._emit(ready)

    def check_collected(self) -> bool:
        """True (and wake the waiter) once everything is sent and every expected Result was seen."""
        if self.submitted and self.collected >= self.expected:
            self.all_collected.set()
            return True
        return False

    def _nats_args(self) -> list[str]:
        return connection_args(self.url, self.prefix, self.config_args)  # no password on screen

    def results_command(self) -> str:
        """The command that collects this batch (NATS password masked)."""
        out = str(self.out) if self.out and str(self.out) != "-" else f"{self.batch}.results.jsonl"
        return shlex.join(["ratefleet", "results", "--batch", self.batch, "--wait", "--out", out, *self._format_args(),
                           *self._nats_args()])

    def _format_args(self) -> list[str]:
        return ((["--out-format", self.out_format] if self.out_format != "ratefleet" else [])
                + (["--order", "input"] if self.by_input else []))

    def rejects_note(self) -> str:
        """", each in FILE" when --rejects names a file, else ""."""
        return f", each in {self.rejects}" if self.rejects is not None else ""

    def submit_command(self) -> str:
        """This run's command again, with the batch name: it sends only what is not stored yet."""
        args = ["ratefleet", "submit", str(self.file), "--tier", self.tier, "--batch", self.batch]
        args += ["--upstream", self.upstream] if self.upstream is not None else []
        args += (["--wait"] if self.wait else []) + (["--out", str(self.out)] if self.out else [])
        args += ["--skip-invalid"] if self.skip_invalid else []
        args += ["--rejects", str(self.rejects)] if self.rejects is not None else []
        return shlex.join(args + self._format_args() + self._nats_args())


async def check_tier(client: Client, tier: str) -> str | None:
    """None when the JOBS stream takes `tier`; else what is wrong. Raises SubmitError with no streams."""
    try:
        info = await client.js.stream_info(client.subjects.jobs_stream)
    except NotFoundError:
        raise SubmitError(f"stream {client.subjects.jobs_stream} does not exist on this NATS server; start "
                          "`ratefleet up` or a dispatcher once to create the streams") from None
    subjects = info.config.subjects or []
    if client.subjects.jobs(tier) in subjects:
        return None
    tiers = ", ".join(s.rsplit(".", 1)[-1] for s in subjects)
    return f"unknown tier {tier!r}; this fleet's tiers: {tiers}"


async def fleet_upstreams(client: Client, warn: Callable[[str], None] | None = None,
                          tier: str | None = None) -> UpstreamRoutes | None:
    """The fleet's upstreams (name -> the header its keys go in) from its live config (the
    config bucket, which `ratefleet up` and `ratefleet config push` fill), or None when none
    was pushed or it cannot be read within CONFIG_READ_S seconds (a producer's NATS permissions
    need not allow the bucket): then only the dispatcher checks each job's upstream. A stored
    config that does not validate (the fleet keeps running on the one before it) also gives
    None, and `warn(sentence)` says so."""
    try:
        # bounded: a request the account does not permit gets no answer (nats-server sends the
        # client an -ERR instead), so a producer without the bucket would wait out nats-py's 5 s
        # a refusal is not worth a warning: the read is optional (see above)
        with denial_expected(f"KV_{client.subjects.config_bucket}"), anyio.fail_after(CONFIG_READ_S):
            kv = await client.js.key_value(client.subjects.config_bucket)  # never created here
            entry = await kv.get(CURRENT_KEY)
    except Exception:  # noqa: BLE001 - see docstring
        return None
    try:
        config = StoredConfig.model_validate_json(entry.value or b"").validated(entry.revision)
    except (ConfigError, ValueError) as exc:
        if warn is not None:
            warn(f"warning: the fleet's stored config (revision {entry.revision}) is invalid, so the lines' "
                 "upstreams are not checked here (the dispatcher still checks each job, on the config it ran before): "
                 f"{redact_text(str(exc))[:400]}; push a valid one with `ratefleet config push FILE`")
        return None
    if tier is not None and warn is not None and tier not in config.tiers:
        warn(f"warning: tier {tier!r} is not in the fleet's live config (revision {entry.revision}; its tiers: "
             f"{', '.join(config.tiers)}): the jobs are stored but nothing runs them until a config with "
             f"[tiers.{tier}] is pushed again (`ratefleet config push FILE`)")
    return config.upstream_routes()


async def count_results(client: Client, batch: str) -> int:
    """How many Results batch `batch` has stored now (0 when it cannot tell)."""
    config = ConsumerConfig(filter_subject=client.subjects.batch_results(batch), deliver_policy=DeliverPolicy.ALL,
                            ack_policy=AckPolicy.NONE, inactive_threshold=10.0, mem_storage=True)
    try:
        info = await client.js.add_consumer(client.subjects.results_stream, config=config)
    except Exception:  # noqa: BLE001 - only a figure for the summary
        return 0
    try:
        await client.js.delete_consumer(client.subjects.results_stream, info.name)
    except Exception:  # noqa: BLE001 - it expires after inactive_threshold anyway
        pass
    return info.num_pending or 0


async def stored_ids(client: Client, batch: str, expected: int, progress=None) -> IdSet:
    """The `id_hash`es of the jobs of batch `batch` that have a stored Result, read from the
    Results' subjects (`<prefix>.results.<batch>.<job id>`) with a headers-only ordered
    consumer: no bodies cross the wire. `expected`: how many there are (`count_results`);
    reading stops there, or when the stream has no more. `progress(n)`: called per 1,000.
    Raises what nats-py raises when the consumer cannot be made (the caller decides)."""
    ids = IdSet()
    if expected <= 0:
        ids.freeze()
        return ids
    sub = await client.js.subscribe(client.subjects.batch_results(batch), stream=client.subjects.results_stream,
                                    ordered_consumer=True, deliver_policy=DeliverPolicy.ALL, headers_only=True)
    try:
        read = 0
        while read < expected:
            try:
                msg = await sub.next_msg(timeout=5.0)
            except TimeoutError:  # fewer than counted (expired meanwhile): what came is what there is
                break
            ids.add(msg.subject.rsplit(".", 1)[-1])
            read += 1
            if progress is not None and read % 1000 == 0:
                progress(1000)
            if msg.metadata.num_pending == 0:
                break
    finally:
        try:
            await sub.unsubscribe()
        except Exception:  # noqa: BLE001 - the connection is closing: nothing to undo
            pass
    ids.freeze()
    return ids


def report_end(run: Run, phases, *, submitted_only: bool = False) -> int:
    """Print the submission summary (or, at the end, the Results summary); return the exit code."""
    if submitted_only:
        done = min(run.earlier, run.results_before)
        repeats = min(run.found.repeated_ids if run.found else 0, run.earlier - done)  # this file's own lines
        phases.print(f"stored {run.stored:,} jobs in tier {run.tier!r}, batch {run.batch}: {run.fresh:,} new, "
                     f"{run.earlier - done - repeats:,} already queued, {done:,} already done"
                     + (f", {repeats:,} repeat an earlier line's id (one job: not run again; exit code 1)"
                        if repeats else ""))
        _report_foreign(run, phases)
        _report_other_lines(run, phases, repeats)
        if run.changed:
            phases.print(f"{len(run.changed):,} lines changed while this command ran and were not sent (first: "
                         f"line {run.changed[0]}); run the command again to send them")
        for line, job_id, first in run.repeats:
            phases.print(f"line {line} repeats the id {job_id!r} of line {first}: a job id is one job, so its request "
                         "does not run (JetStream keeps the first); give it its own id, or drop `id` for a line id")
        more = (run.found.repeated_ids if run.found else 0) - len(run.repeats)
        if run.repeats and more > 0:
            phases.print(f"... and {more:,} more lines repeat an id of an earlier line")
        if run.unsent:
            phases.print(f"{run.unsent:,} of the {len(run.found.ids):,} validated jobs were not sent: {run.file} changed "
                         "while this command ran (lines edited, or gone as it shrank or was rewritten)"
                         + (" and this run does not wait for Results" if run.wait else "")
                         + f"; exit code 1. Run the same command again to send them: {run.submit_command()}")
        if not run.wait:
            phases.print(f"collect the Results with: {run.results_command()}")
        return 0
    summary = ", ".join(f"{status} {n:,}" for status, n in sorted(run.statuses.items())) or "none"
    where = (f"; written to {'stdout' if str(run.out) == '-' else run.out}" if run.out else
             f"; not written anywhere (no --out): write them with {run.results_command()}")
    phases.print(f"results: {summary}{where}")
    failed = run.written - run.statuses.get("succeeded", 0)
    if failed > 0 and run.out is not None and str(run.out) != "-" and run.out_format == "ratefleet":
        phases.print(f"why each of the {failed:,} did not succeed is in its `error`: jq -c 'select(.status != "
                     f"\"succeeded\") | {{job_id, status, error}}' {shlex.quote(str(run.out))}")
    if run.given_up:
        phases.print(replay_hint(run.batch, run.given_up, run._nats_args()))
    if note := own_ids_note(run.order):
        phases.print(note)
    if run.lost:
        left = run.expected - run.collected
        phases.print(f"error: the NATS server lost the jobs of batch {run.batch} still queued: {run.lost}. "
                     f"{left:,} of {run.expected:,} jobs have no Result and are no longer queued; send them again (lines "
                     f"with a stored Result are not sent again): {run.submit_command()}")
        return 1
    skipped = run.found.error_count if run.found else 0
    if skipped:  # --skip-invalid: those lines were not done, so the batch did not all succeed
        phases.print(f"{skipped:,} invalid lines were skipped (not submitted{run.rejects_note()}); exit code 1")
    ok = (run.statuses.get("succeeded", 0) == run.written and not (run.foreign_queued or run.foreign_queued_more)
          and not run.changed and not run.unsent and not skipped and not (run.found and run.found.repeated_ids))
    return 0 if ok else 1


def _report_other_lines(run: Run, phases, repeats: int) -> None:
    """Warn when jobs of the batch's earlier run are not lines of this file (another file, or
    lines edited since): they still run, and their Results count in the batch. Fixing a bad
    line, or appending lines, keeps every earlier job and says nothing."""
    if run.before is None or run.before.jobs <= 0:
        return
    missing = run.before.jobs - (run.earlier - repeats)
    if missing > 0:
        phases.print(f"warning: {missing:,} jobs of batch {run.batch}'s earlier run are not lines of this file "
                     "(another file, or lines edited since): they still run and their Results are part of batch "
                     f"{run.batch}, but `--wait` and `ratefleet results --batch {run.batch} --wait` wait for this "
                     f"file's lines only (a later `ratefleet results --batch {run.batch}` lists them all; `ratefleet "
                     f"cancel --batch {run.batch}` stops what is queued); give a new file "
                     "its own --batch name")


def _report_foreign(run: Run, phases) -> None:
    if not run.foreign:
        return
    queued = len(run.foreign_queued) + run.foreign_queued_more
    phases.print(f"{run.foreign:,} lines carry ids already stored under another batch: {run.foreign - queued:,} "
                 f"have a Result (counted and written with this batch's), {queued:,} are still queued there and "
                 "are not waited for")
    for job_id, owner in run.foreign_queued:
        phases.print(f"  job {job_id} (batch {owner or '?'}): see it with `ratefleet result {job_id}`")
    if run.foreign_queued_more:
        phases.print(f"  ... and {run.foreign_queued_more:,} more")


def report_interrupt(run: Run, phases, head: str = "interrupted") -> None:
    """What Ctrl-C (or, `head` "stopped", NATS going away) left behind, and the exact commands to carry on."""
    if run.found is None:
        phases.print(f"{head} while validating; nothing was sent; run it again with: {run.submit_command()}")
        return
    if not run.submitted:
        ours = run.stored - run.foreign
        # published but not acknowledged when Ctrl-C came (up to the pipeline's window): maybe stored
        maybe = max(0, run.handed - run.stored)
        phases.print(f"{head} while submitting: {run.stored:,} of {run.found.jobs:,} jobs stored in batch "
                     f"{run.batch}" + (f", {maybe:,} more sent whose storing was not confirmed yet (they may be "
                                       "stored too)" if maybe else "")
                     + f"; {max(0, run.found.jobs - run.stored - maybe):,} not sent")
        phases.print(f"send the rest (stored lines are not sent again): {run.submit_command()}")
        if ours:
            unfinished = ours - run.collected if run.wait else ours
            phases.print(f"{unfinished:,} stored jobs are still queued or running (they keep running); "
                         f"collect them with: {run.results_command()}")
        return
    left = run.expected - run.collected
    written = f"{run.written:,} results written" + (f" to {run.out}" if run.out else "")
    phases.print(f"{head}: {written}; {left:,} of {run.expected:,} jobs of batch {run.batch} are still "
                 "queued or running (they keep running)")
    phases.print(f"collect them with: {run.results_command()}")
    phases.print(f"or re-run (stored lines are not sent again): {run.submit_command()}")
