"""Running the gateway's OpenAI batches through the fleet, surviving a gateway restart.

One batch: read its input file from the Object Store to a temporary file -> check every line
(`batch_lines.check_file`; a bad line fails the batch with `errors.data`, nothing is sent) ->
`in_progress`: submit the lines as jobs of fleet batch `<batch id>` on the caller's batch tier
(`callers.<name>.batch_tier`, else the lowest tier; kept in the record) with
`Client.submit_stream` (the deterministic ids of `ratefleet submit`) while following the batch's
Results to keep `request_counts` -> `finalizing`: the output file (answers with a 2xx status) and
the error file (other answers, and jobs that ended without one) in input order, as OpenAI
Batch output lines (`openai_batch.format_result`) -> `completed`.

Durability: the record (KV) says where a batch is, the jobs and Results are in JetStream. A
gateway that starts runs every unfinished batch again from its record: a batch cut short
while submitting is submitted again without the lines that have a Result (the others are
dropped by JetStream's dedup window if already queued), then followed and finalized.

Several gateways: each batch has one runner at a time, by a lease in its record
(`batch_book.claim`, renewed every `lease_s / 3`); every gateway looks for unfinished batches
whose lease has lapsed every `lease_s` and takes them over, so a batch whose gateway was
killed carries on at another replica within about `2 * lease_s`, and two replicas never
submit, follow or finalize the same batch together (before, each replica that started ran
every unfinished batch, and finalizing could run twice).

Cancel (and the end of the completion window): no further line is sent; the fleet's cancel
marker for the batch is set (ratefleet/runtime/cancels.py, as `ratefleet cancel` does), so the
leader ends the jobs it holds in its window uncalled (Result `failed` / `cancelled`); the jobs no
dispatcher has taken yet (stream sequence past the tier consumer's last delivered one) are
deleted from RATEFLEET_JOBS. None of these is called nor paid; each is an error line
(`batch_cancelled` / `batch_expired`, as OpenAI writes them) and counts as failed. The calls
already under way finish, and the batch becomes `cancelled` (or `expired`) once the taken jobs
have their Results (at most `stop_wait_s`).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import tempfile
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import anyio

from ratefleet.batches import InputOrder
from ratefleet.batchfile import IdSet
from ratefleet.client import Client
from ratefleet.gateway.batch_book import PRIVATE, TERMINAL, BatchBook, held_by_other, holder, set_status
from ratefleet.gateway.batch_lease import BatchLease
from ratefleet.gateway.batch_lines import Checked, batch_jobs, check_file, line_error
from ratefleet.gateway.callers import Caller
from ratefleet.gateway.files import FileStore
from ratefleet.openai_batch import body_withheld, format_result
from ratefleet.runtime.cancels import mark_cancelled
from ratefleet.runtime.logs import get_logger
from ratefleet.runtime.streams import delete_message, tier_consumer
from ratefleet.schemas import ErrorCode, ErrorInfo, Job, Result
from ratefleet.schemas.job import job_size_limit

log = get_logger("ratefleet.gateway")
STOP_WINDOW = 256  # JOBS reads and deletes in flight at a time when a batch stops


@dataclass
class _Progress:
    completed: int = 0
    failed: int = 0
    first_seq: int | None = None
    last_seq: int | None = None
    stop_reason: str | None = None  # "cancelling" | "expired" | None (all answered)


def _answered(result: Result) -> bool:
    return result.response is not None and 200 <= result.response.status < 300 and not body_withheld(result)


def _stopped(result: Result) -> bool:
    """A job the fleet ended uncalled because the batch was cancelled or expired."""
    return result.error is not None and result.error.code == ErrorCode.CANCELLED


class BatchRunner:
    """Runs batches inside `serve()`'s task group; `start(batch_id)` adds one.

    `poll_s`: how often counts are stored and a cancel is looked for (seconds);
    `lease_s`: how long a runner's claim on a batch lasts without renewal (seconds)."""

    def __init__(self, client: Client, book: BatchBook, files: FileStore, callers: dict[str, Caller], *,
                 poll_s: float = 1.0, cancel_grace_s: float = 1.0, stop_wait_s: float = 600.0,
                 lease_s: float = 10.0) -> None:
        self.client, self.book, self.files, self.callers = client, book, files, callers
        self.poll_s = poll_s
        self.cancel_grace_s = cancel_grace_s
        self.stop_wait_s = stop_wait_s
        self.lease_s = lease_s
        self.lease = BatchLease(book, uuid.uuid4().hex[:12], lease_s)
        self._running: set[str] = set()
        self._tg: anyio.abc.TaskGroup | None = None

    async def serve(self, *, task_status=anyio.TASK_STATUS_IGNORED) -> None:
        """Run every unfinished batch nobody else runs, then those `start`ed, and every
        `lease_s` those whose runner's lease lapsed, until cancelled."""
        async with anyio.create_task_group() as tg:
            self._tg = tg
            await self._sweep(tg, first=True)
            task_status.started()
            while True:
                await anyio.sleep(self.lease_s)
                with contextlib.suppress(Exception):  # NATS away for a moment: the next sweep
                    await self._sweep(tg, first=False)

    async def _sweep(self, tg: anyio.abc.TaskGroup, *, first: bool) -> None:
        now = time.time()
        for record in await self.book.all():
            if record["status"] in TERMINAL or record["id"] in self._running or held_by_other(record, None, now):
                continue
            log.info("resuming batch" if first else "taking over batch", batch=record["id"], status=record["status"])
            self._running.add(record["id"])
            tg.start_soon(self.run, record["id"])

    def start(self, batch_id: str) -> None:
        assert self._tg is not None, "serve() first"
        self._running.add(batch_id)
        self._tg.start_soon(self.run, batch_id)

    async def run(self, batch_id: str) -> None:
        """Carry one batch to its end if this runner gets its lease; an unexpected error (or a
        lost lease) leaves it to the next sweep of any gateway."""
        self._running.add(batch_id)
        try:
            if not await self.lease.claim(batch_id):
                return
            with tempfile.TemporaryDirectory(prefix="ratefleet-batch-") as tmp:
                async with anyio.create_task_group() as tg:
                    tg.start_soon(self.lease.keep, batch_id, tg.cancel_scope)
                    await self._run(batch_id, Path(tmp))
                    tg.cancel_scope.cancel()
        except Exception as exc:  # noqa: BLE001 - one batch's trouble must not stop the gateway
            # (BatchBook.update's KeyError, raised inside the task group: an ExceptionGroup here)
            gone = isinstance(exc, KeyError) or (isinstance(exc, BaseExceptionGroup) and exc.subgroup(KeyError))
            if gone:  # its record is gone: no sweep can find it again
                log.error("batch stopped: its record is gone from the batches bucket (deleted, or NATS lost its "
                          "store); the calls already made stay paid; create the batch again to get an output file",
                          batch=batch_id)
            else:
                log.exception("batch stopped; another sweep carries it on", batch=batch_id)
        finally:
            self._running.discard(batch_id)
            with anyio.CancelScope(shield=True), contextlib.suppress(Exception):
                await self.lease.release(batch_id)

    async def _run(self, batch_id: str, tmp: Path) -> None:
        record = await self.book.get(batch_id)
        if record is None or record["status"] in TERMINAL:
            return
        caller = self.callers.get(record[PRIVATE]["caller"])
        path = tmp / "input.jsonl"
        with path.open("wb") as handle:
            meta = None if caller is None else await self.files.read_into(caller.name, record["input_file_id"], handle)
        if caller is None or meta is None:
            why = "the caller is no longer configured" if caller is None else "the input file is gone"
            await self._fail(batch_id, [line_error(0, "input_unavailable", why)])
            return
        size_limit = job_size_limit(None, self.client.nc.max_payload)  # as Client._payload checks each job
        found = await anyio.to_thread.run_sync(check_file, path, batch_id, record["endpoint"], caller, size_limit)
        if record["status"] == "validating":
            if found.error_count or not found.jobs:
                await self._fail(batch_id, found.errors or [line_error(0, "empty_file", "the input file has no lines")])
                return
            record = await self.book.update(batch_id, lambda r: _started(r, found.jobs))
        progress = _Progress(first_seq=record[PRIVATE]["first_seq"], last_seq=record[PRIVATE]["last_seq"])
        if record["status"] == "in_progress" and time.time() >= record["expires_at"]:
            progress.stop_reason = "expired"  # e.g. a gateway down past the window: nothing more is sent
        elif record["status"] == "in_progress":
            await self._progress(record, found, path, caller, progress)
            if progress.stop_reason is None and (await self.book.get(batch_id) or {}).get("status") == "cancelling":
                # cancelled while its last jobs ended (the cancel route's marker ends them uncalled,
                # so every job can have its Result before the next look at the record)
                progress.stop_reason = "cancelling"
        elif record["status"] == "cancelling":  # (also a batch cancelled while validating)
            progress.stop_reason = "cancelling"
        final = "completed"
        if progress.stop_reason is not None:
            final = "cancelled" if progress.stop_reason == "cancelling" else "expired"
            await self.stop_calls(batch_id, final)
            await self._stop_queued(batch_id, record[PRIVATE]["tier"], progress)
            await anyio.sleep(self.cancel_grace_s)
        await self._finalize(batch_id, found, final, tmp, unsent=None if final == "completed" else (path, record, caller))

    async def _fail(self, batch_id: str, errors: list[dict[str, Any]]) -> None:
        def change(record: dict[str, Any]) -> dict[str, Any]:
            record["errors"] = {"object": "list", "data": errors}
            return set_status(record, "failed")

        await self.book.update(batch_id, change)
        log.info("batch failed validation", batch=batch_id, errors=len(errors))

    async def _progress(self, record: dict[str, Any], found: Checked, path: Path, caller: Caller,
                        progress: _Progress) -> None:
        """Submit (unless done before) and follow until every job has a Result, or a stop."""
        async with anyio.create_task_group() as tg:
            tg.start_soon(self._watch, record, progress, tg.cancel_scope)
            tg.start_soon(self._follow, record["id"], found, progress, tg.cancel_scope)
            if not record[PRIVATE]["submitted"]:
                await self._submit(record, found, path, caller, progress)

    async def _submit(self, record: dict[str, Any], found: Checked, path: Path, caller: Caller,
                      progress: _Progress) -> None:
        batch_id = record["id"]
        done = await self._answered_ids(batch_id) if progress.first_seq is not None else None
        jobs = (job for _, job in batch_jobs(path, batch_id, record["endpoint"], caller)
                if isinstance(job, Job) and job.id in found.ids and (done is None or job.id not in done))
        saved_at = 0.0
        try:
            # resumed (done is not None): lines sent before may still be queued past the dedup window
            stream = self.client.submit_stream(jobs, record[PRIVATE]["tier"], repeat=done is not None)
            async with contextlib.aclosing(stream):
                async for stored in stream:
                    progress.first_seq = min(progress.first_seq or stored.seq, stored.seq)
                    progress.last_seq = max(progress.last_seq or stored.seq, stored.seq)
                    if time.monotonic() - saved_at > self.poll_s:
                        saved_at = time.monotonic()
                        await self._save_seqs(batch_id, progress, submitted=False)
            await self._save_seqs(batch_id, progress, submitted=True)
            log.info("batch submitted", batch=batch_id, jobs=found.jobs, tier=record[PRIVATE]["tier"])
        finally:
            with anyio.CancelScope(shield=True), contextlib.suppress(Exception):
                await self._save_seqs(batch_id, progress, submitted=None)

    async def _answered_ids(self, batch_id: str) -> IdSet:
        """Ids of the batch's jobs that have a Result already (a resumed submit skips them)."""
        done = IdSet()
        async for result in self.client.results(batch_id):
            done.add(result.job_id)
        done.freeze()
        return done

    async def _save_seqs(self, batch_id: str, progress: _Progress, *, submitted: bool | None) -> None:
        def change(record: dict[str, Any]) -> dict[str, Any]:
            private = record[PRIVATE]
            private["first_seq"], private["last_seq"] = progress.first_seq, progress.last_seq
            if submitted is not None:
                private["submitted"] = submitted
            return record

        await self.book.update(batch_id, change)

    async def _follow(self, batch_id: str, found: Checked, progress: _Progress, scope: anyio.CancelScope) -> None:
        async for result in self.client.results(batch_id, follow=True):
            if result.job_id not in found.ids:
                continue
            if _answered(result):
                progress.completed += 1
            else:
                progress.failed += 1
            if progress.completed + progress.failed >= found.jobs:
                scope.cancel()
                return

    async def _watch(self, record: dict[str, Any], progress: _Progress, scope: anyio.CancelScope) -> None:
        """Every `poll_s`: store the counts; stop on a cancel or at the end of the window."""
        while True:
            await anyio.sleep(self.poll_s)

            def change(current: dict[str, Any]) -> dict[str, Any] | None:
                if current["status"] != "in_progress":
                    return None
                counts = {**current["request_counts"], "completed": progress.completed, "failed": progress.failed}
                if counts == current["request_counts"]:
                    return None
                current["request_counts"] = counts
                return current

            current = await self.book.update(record["id"], change)
            if current["status"] != "in_progress" or time.time() >= current["expires_at"]:
                progress.stop_reason = current["status"] if current["status"] != "in_progress" else "expired"
                scope.cancel()
                return

    async def stop_calls(self, batch_id: str, final: str) -> None:
        """The fleet's cancel marker for the batch (ratefleet/runtime/cancels.py): the leader
        then ends the batch's jobs it holds in its window, and any it reads later, without a
        call. Without it a dispatcher's window (`dispatcher.window` jobs per tier) would still
        be called after the cancel. A marker NATS refuses is logged; the queued jobs are
        deleted all the same."""
        try:
            await mark_cancelled(self.client.js, self.client.subjects, batch_id, by=f"gateway ({final})")
        except Exception as exc:  # noqa: BLE001 - the deletion below still stops what is queued
            log.warning("batch stop: the fleet's cancel marker was refused; jobs held by the leader are still called",
                        batch=batch_id, error=str(exc))

    async def _stop_queued(self, batch_id: str, tier: str, progress: _Progress) -> None:
        """Delete the batch's jobs no dispatcher has taken yet (none of them is paid for),
        then wait for those already taken (their calls may be under way) to end with a
        Result: the JOBS message of a job is gone once its Result is stored (invariant 1)."""
        if progress.first_seq is None:
            return
        js, stream = self.client.js, self.client.subjects.jobs_stream
        last = (await js.stream_info(stream)).state.last_seq
        delivered = (await js.consumer_info(stream, tier_consumer(tier))).delivered.stream_seq
        taken, deleted = [], 0

        async def stop(seq: int) -> None:
            nonlocal deleted
            try:
                job = await self.client.queued_job(seq)
            except Exception as exc:  # noqa: BLE001 - not known whether it is there: waited for below
                log.warning("batch stop: a queued job could not be read; waiting for it", batch=batch_id, seq=seq,
                            error=type(exc).__name__)
                taken.append(seq)
                return
            if job is None or job.batch != batch_id:
                return
            if seq > delivered:
                try:
                    await delete_message(js, stream, seq)
                    deleted += 1
                    return
                except Exception:  # noqa: BLE001 - taken and finished meanwhile
                    pass
            taken.append(seq)

        # STOP_WINDOW reads (and deletes) in flight at a time: one after the other, a 60,000-line
        # batch's cancel took 44 s of round trips (the JOBS stream is a work queue, so no second
        # consumer can stream them instead)
        for start in range(progress.first_seq, last + 1, STOP_WINDOW):
            await asyncio.gather(*(stop(seq) for seq in range(start, min(start + STOP_WINDOW, last + 1))))
        taken.sort()
        log.info("batch stopped: queued jobs deleted, taken ones finish", batch=batch_id, deleted=deleted,
                 taken=len(taken))
        with anyio.move_on_after(self.stop_wait_s):
            while taken:
                await anyio.sleep(self.poll_s)
                still = await asyncio.gather(*(self.client.queued_job(seq) for seq in taken[:STOP_WINDOW]),
                                             return_exceptions=True)  # no answer: still waited for
                taken = [seq for seq, job in zip(taken, still) if job is not None] + taken[STOP_WINDOW:]

    async def _finalize(self, batch_id: str, found: Checked, final: str, tmp: Path,
                        unsent: tuple[Path, dict[str, Any], Caller] | None = None) -> None:
        """Write the output and error files and end the batch `final`. `unsent` (the input
        file, the record and the caller) for a batch stopped before every line ran: each such
        line gets its error line (see `_write_files`)."""
        if final == "completed":  # (a batch found `finalizing` after a restart is finalized again)
            await self.book.update(batch_id, lambda r: set_status(r, "finalizing"))
        caller_name = (await self.book.get(batch_id))[PRIVATE]["caller"]
        paths = {"output": tmp / "output.jsonl", "error": tmp / "error.jsonl"}
        counts = await self._write_files(batch_id, found, paths, final, unsent)
        ids: dict[str, str | None] = {}
        for kind, path in paths.items():
            size = path.stat().st_size
            ids[kind] = None
            if size:
                with path.open("rb") as handle:
                    meta = await self.files.put(caller_name, f"{batch_id}_{kind}.jsonl", "batch_output", handle, size)
                ids[kind] = meta["id"]

        def change(record: dict[str, Any]) -> dict[str, Any] | None:
            if holder(record) != self.lease.runner_id:
                return None  # the lease lapsed and another gateway runs it now: its files count
            record["output_file_id"], record["error_file_id"] = ids["output"], ids["error"]
            record["request_counts"] = {"total": found.jobs, "completed": counts[0], "failed": counts[1]}
            return set_status(record, final)

        await self.book.update(batch_id, change)
        log.info("batch finished", batch=batch_id, status=final, completed=counts[0], failed=counts[1])

    async def _write_files(self, batch_id: str, found: Checked, paths: dict[str, Path], final: str = "completed",
                           unsent: tuple[Path, dict[str, Any], Caller] | None = None) -> tuple[int, int]:
        """The output and error files, in input order; (answered, failed) counts.

        A line that was never sent (its job deleted from the queue, or ended uncalled by the
        fleet's cancel marker) is an error line with OpenAI's code for it, `batch_cancelled`
        or `batch_expired` (platform.openai.com/docs/guides/batch: "Expired requests will be
        written to your error file"), and counts as failed: every line of the input is in one
        of the two files, so a caller can send what never ran again by its custom_id."""
        order = InputOrder(found.gaps)
        counts = [0, 0]
        seen = IdSet()
        with paths["output"].open("w", encoding="utf-8") as out, paths["error"].open("w", encoding="utf-8") as err:
            def write(results: list[Result]) -> None:
                for result in results:
                    if _stopped(result):
                        counts[1] += 1
                        err.write(json.dumps(_unsent_line(result, final), ensure_ascii=False) + "\n")
                        continue
                    ok = _answered(result)
                    counts[0 if ok else 1] += 1
                    (out if ok else err).write(format_result(result, "openai") + "\n")

            async for result in self.client.results(batch_id):
                if result.job_id in found.ids:
                    seen.add(result.job_id)
                    write(order.push(result))
            if unsent is not None:
                seen.freeze()
                path, record, caller = unsent
                for never_run in await anyio.to_thread.run_sync(_never_run, path, record, caller, found, seen):
                    write(order.push(never_run))
            write(order.flush())
        return counts[0], counts[1]


def _never_run(path: Path, record: dict[str, Any], caller: Caller, found: Checked, seen: IdSet) -> list[Result]:
    """A stand-in Result (`failed` / `cancelled`) for each good line of the input without a
    Result: the jobs deleted from the queue when the batch stopped."""
    missing = []
    for _, job in batch_jobs(path, record["id"], record["endpoint"], caller):
        if isinstance(job, Job) and job.id in found.ids and job.id not in seen:
            missing.append(Result(job_id=job.id, status="failed", batch=record["id"], metadata=job.metadata,
                                  error=ErrorInfo(code=ErrorCode.CANCELLED, message="never sent")))
    return missing


_UNSENT = {"cancelled": ("batch_cancelled", "This request was not executed because the batch was cancelled."),
           "expired": ("batch_expired", "This request could not be executed before the completion window expired.")}


def _unsent_line(result: Result, final: str) -> dict[str, Any]:
    """The OpenAI Batch error line of a request the batch never ran (`final`: cancelled or expired)."""
    code, message = _UNSENT.get(final, _UNSENT["cancelled"])
    return {"id": f"batch_req_{result.job_id}", "custom_id": result.metadata.get("custom_id"), "response": None,
            "error": {"code": code, "message": message}}


def _started(record: dict[str, Any], jobs: int) -> dict[str, Any] | None:
    if record["status"] != "validating":
        return None  # cancelled while validating
    record["request_counts"] = {"total": jobs, "completed": 0, "failed": 0}
    return set_status(record, "in_progress")
