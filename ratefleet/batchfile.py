"""A JSONL batch file read as a stream: the deterministic id rule and the validation pass.

Id rule (so re-running a file is idempotent): a line without an `id` gets

    <batch>-<line number>-<h>      h = blake2b(batch + "\\n" + line text, 5 bytes) in hex

where the line number counts from 1 (blank lines count too) and the line text is the line
without its trailing whitespace. The same file submitted again under the same batch gives the
same ids, so JetStream's dedup window (`streams.duplicate_window_s`) drops the repeats; a line
that was edited gets a new id (it is a different job). When the batch name is long, it is cut
so the id stays within 128 characters; the hash still covers the whole name. The line number
sits in the id so `ratefleet results --order input` can order Results without the file
(`line_of(job_id)`). A line that carries its own `id` keeps it.

Memory: nothing here holds more than one line, except `IdSet`, 8 bytes per job (sorted
`array('Q')`s of id hashes: 8 MB for a million lines).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shlex
import sys
import tempfile
from array import array
from bisect import bisect_left
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from ratefleet.openai_batch import openai_line_as_job
from ratefleet.schemas import Job
from ratefleet.schemas.errors import JobInvalid, JobRejected
from ratefleet.schemas.job import parse_job, upstream_problem
from ratefleet.schemas.wire import find_surrogate

MAX_ID = 128
_GENERATED = re.compile(r"-(\d{1,12})-([0-9a-f]{10})$")
_UNDECODABLE = re.compile("[\udc80-\udcff]")  # bytes that are not UTF-8, as iter_lines keeps them
SHOWN_ERRORS = 20
MAX_GAPS = 10_000


def line_job_id(batch: str, line_number: int, text: str) -> str:
    """The id of line `line_number` (1-based) of a batch file whose line has no id."""
    digest = hashlib.blake2b(f"{batch}\n{text}".encode(), digest_size=5).hexdigest()
    tail = f"-{line_number}-{digest}"
    return batch[: MAX_ID - len(tail)] + tail


def line_of(job_id: str) -> int | None:
    """The line number a generated id encodes, or None for an id the producer chose."""
    match = _GENERATED.search(job_id)
    return int(match.group(1)) if match else None


def id_hash(job_id: str) -> int:
    """A 64-bit hash of a job id, for `IdSet`."""
    return int.from_bytes(hashlib.blake2b(job_id.encode(), digest_size=8).digest(), "little")


class LineError(JobInvalid, ValueError):
    """A line that is not a valid Job; str() is `line N: why`. A JobInvalid (nothing of it
    is sent) and, as before, a ValueError."""


def parse_line(text: str, number: int, batch: str, upstreams: Mapping[str, str] | None = None, *,
               upstream: str | None = None) -> Job:
    """Validate one line as a Job of `batch`, with its id (own or deterministic). Raises LineError.
    A line may also be an OpenAI Batch API input line (`ratefleet.openai_batch`).

    The same check as every other door into the fleet (`schemas.job.parse_job`), so a line
    that passes here is not refused later; with `upstreams` (the fleet's live config: name ->
    auth header) also the dispatcher's check of the upstream (`schemas.job.upstream_problem`).
    `upstream` (`submit --upstream`): the upstream of a line that names none (an OpenAI Batch
    line never does); a line's own `upstream` wins. The line's id does not depend on it."""
    if isinstance(text, TooLong):
        raise LineError(f"line {number}: longer than {MAX_LINE_CHARS:,} characters, more than any job can be "
                        "(a NATS message is at most 64 MiB); is the file one job per line (JSONL)?")
    bad = find_surrogate(text, _UNDECODABLE)  # no scan for a line that is UTF-8
    if bad:
        raise LineError(f"line {number}: not UTF-8 (byte 0x{ord(bad.group()) - 0xDC00:02x} at character "
                        f"{bad.start() + 1}); save the file as UTF-8")
    try:
        converted = openai_line_as_job(text)  # an OpenAI Batch API input line, taken as it is
    except ValueError as exc:
        raise LineError(f"line {number}: {exc}") from None
    try:
        job = parse_job(converted if converted is not None else text.encode("utf-8", "surrogatepass"))
    except JobRejected as exc:
        message = exc.message if converted is None else _openai_names(exc.message)
        raise LineError(f"line {number}: {message}") from None
    if job.batch is not None and job.batch != batch:
        raise LineError(f"line {number}: batch {job.batch!r} differs from this run's batch {batch!r} "
                        "(one file is one batch: drop the field or pass --batch)")
    if upstream is not None and job.upstream is None:
        job = job.model_copy(update={"upstream": upstream})
    if upstreams is not None and (problem := upstream_problem(job, upstreams)) is not None:
        hint = ""
        if job.upstream is None:
            hint = (" (pass --upstream NAME: an OpenAI Batch API line cannot name one itself)" if converted is not None
                    else ' (add "upstream": "<name>" to the line, or pass --upstream NAME for the lines that name none)')
        raise LineError(f"line {number}: {problem[1]}{hint}")
    update = {"batch": batch}
    if job.id is None:
        update["id"] = line_job_id(batch, number, text)
    return job.model_copy(update=update)


class TooLong(str):
    """The start of a line longer than MAX_LINE_CHARS (the rest was read and dropped, never
    held): parse_line refuses it by its length."""


MAX_LINE_CHARS = 64 << 20  # no job is longer: NATS caps a message at 64 MiB (max_payload)
_SKIP_CHARS = 1 << 20  # the rest of a too long line is read and dropped this much at a time


# the Job fields an OpenAI Batch input line's fields become (openai_batch.openai_line_as_job)
_OPENAI_FIELDS = (("request.method", "method"), ("request.path", "url"), ("request.json", "body"))


def _openai_names(message: str) -> str:
    """A Job validation message about an OpenAI Batch line, in the line's own field names."""
    for ours, theirs in _OPENAI_FIELDS:
        message = re.sub(rf"\b{re.escape(ours)}\b", theirs, message)
    return message


def iter_lines(path: Path) -> Iterator[tuple[int, str]]:
    """(line number, text without trailing whitespace) of every non-blank line, one at a time.
    Bytes that are not UTF-8 stay as lone surrogates (errors="surrogateescape"): parse_line names them.
    A UTF-8 byte order mark at the start (Notepad, PowerShell's Out-File) is dropped ("utf-8-sig").
    A line longer than MAX_LINE_CHARS comes as a TooLong of its first 100 characters, so memory
    stays bounded whatever the file holds (a 200 MB line took 1.2 GB to be refused)."""
    with path.open("r", encoding="utf-8-sig", errors="surrogateescape") as handle:
        number = 0
        while line := handle.readline(MAX_LINE_CHARS + 1):
            number += 1
            if len(line) > MAX_LINE_CHARS and not line.endswith("\n"):
                start = TooLong(line[:100])
                del line
                while (rest := handle.readline(_SKIP_CHARS)) and not rest.endswith("\n"):
                    pass
                yield number, start
                continue
            text = line.rstrip()
            if text:
                yield number, text


# (magic bytes, what the file is, the command that streams it as text): compressed and archive
# formats a jobs file arrives in; read as text they were "line 1: not UTF-8 (byte 0x8b ...)"
_PACKED = ((b"\x1f\x8b", "gzip-compressed", "zcat"), (b"\x28\xb5\x2f\xfd", "zstd-compressed", "zstdcat"),
           (b"BZh", "bzip2-compressed", "bzcat"), (b"\xfd7zXZ\x00", "xz-compressed", "xzcat"),
           (b"PK\x03\x04", "a zip archive", "unzip -p"), (b"7z\xbc\xaf\x27\x1c", "a 7-Zip archive", "7z x -so"),
           (b"PAR1", "a Parquet file", None), (b"SQLite format 3\x00", "an SQLite database", None))


def packed_problem(path: Path, name: str, again: str | None = None) -> str | None:
    """What to tell the user when the jobs file at `path` (called `name`) starts with the magic
    bytes of a compressed file or another binary format (gzip RFC 1952, zstd RFC 8878, bzip2, xz,
    zip, 7z, Parquet, SQLite): what it is and, given `again` (the submit command reading standard
    input), the command that streams it as text into that. None for any other file. Raises OSError
    when it cannot be read."""
    with path.open("rb") as handle:
        head = handle.read(16)
    for magic, what, command in _PACKED:
        if head.startswith(magic):
            if command and again:
                how = f"decompress it first, or stream it as text: {command} {shlex.quote(name)} | {again}"
            else:
                how = "write the jobs as JSONL text (one JSON job per line" + (f", e.g. through {command})" if command
                                                                               else ")")
            return f"{name} is {what}, not JSONL text; {how}; nothing was submitted"
    return None


def stdin_spool_path() -> Path:
    """A new empty temporary file for `spool_stdin` (the caller removes it)."""
    with tempfile.NamedTemporaryFile("wb", prefix="ratefleet-stdin-", suffix=".jsonl", delete=False) as handle:
        return Path(handle.name)


def spool_stdin(target: Path) -> None:
    """Copy stdin to `target` in constant memory, so it can be read twice. It reads the file
    descriptor itself, not `sys.stdin.buffer`: a copy abandoned in a daemon thread (Ctrl-C)
    then holds no lock that the interpreter needs at exit ("could not acquire lock for
    <stdin> at interpreter shutdown")."""
    with target.open("wb") as handle:
        while chunk := os.read(sys.stdin.fileno(), 1 << 20):
            handle.write(chunk)


REPEATS_KEPT = 10  # repeated ids `IdSet.freeze` keeps, and lines `submit` names (the count covers them all)


class IdSet:
    """The job ids of one run as 64-bit hashes, 8 bytes each: 256 arrays by the hash's top byte,
    each sorted by `freeze()` (so sorting never needs more than 1/256 of them as Python ints);
    membership is a binary search in one of them."""

    def __init__(self) -> None:
        self._buckets = [array("Q") for _ in range(256)]
        self._frozen = False
        self._size = 0
        # hashes of ids added more than once (the first REPEATS_KEPT found by `freeze()`), so a
        # later pass can name the lines that repeat an id
        self.repeated: set[int] = set()

    def add(self, job_id: str) -> None:
        self.add_key(id_hash(job_id))

    def add_key(self, key: int) -> None:
        """Add an id by its `id_hash` (for a caller that has the hash already)."""
        self._buckets[key >> 56].append(key)
        self._frozen = False

    def freeze(self) -> int:
        """Sort and drop repeated ids; return how many repeats were dropped."""
        dropped = 0
        for index, bucket in enumerate(self._buckets):
            unique = array("Q", sorted(set(bucket)))
            if len(unique) < len(bucket) and len(self.repeated) < REPEATS_KEPT:
                ordered = sorted(bucket)
                self.repeated.update(key for key, after in zip(ordered, ordered[1:]) if key == after)
            dropped += len(bucket) - len(unique)
            self._buckets[index] = unique
        self._frozen = True
        self._size = sum(len(bucket) for bucket in self._buckets)
        return dropped

    def __len__(self) -> int:
        """How many distinct ids (after `freeze()`)."""
        return self._size

    def __contains__(self, job_id: object) -> bool:
        return isinstance(job_id, str) and self.has_key(id_hash(job_id))

    def has_key(self, key: int) -> bool:
        """Whether an id with this `id_hash` was added (after `freeze()`)."""
        assert self._frozen, "freeze() first"
        bucket = self._buckets[key >> 56]
        at = bisect_left(bucket, key)
        return at < len(bucket) and bucket[at] == key


@dataclass
class Validation:
    """What the validation pass found: jobs (valid lines), the first errors and their count."""

    jobs: int = 0
    lines: int = 0
    errors: list[str] = field(default_factory=list)
    error_count: int = 0
    repeated_ids: int = 0
    ids: IdSet = field(default_factory=IdSet)
    # lines whose metadata.custom_id (an OpenAI Batch line's) repeats an earlier line's: OpenAI's
    # Batch API refuses such a file, and their Results could not be told apart in its output
    repeated_custom_ids: int = 0
    custom_ids: IdSet = field(default_factory=IdSet)
    gaps: list[list[int]] | None = field(default_factory=list)

    def gap(self, start: int, end: int) -> None:
        """Lines start..end have no numbered Result (blank, invalid, own id)."""
        if self.gaps is None or end < start:
            return
        if self.gaps and self.gaps[-1][1] == start - 1:
            self.gaps[-1][1] = end
        elif len(self.gaps) >= MAX_GAPS:
            self.gaps = None  # too scattered to record: --order input holds what it must
        else:
            self.gaps.append([start, end])


def reject_record(number: int, text: str, error: LineError) -> dict:
    """One invalid line as `submit --rejects` writes it: {"line": N, "error": why, and the line's
    own "id" / "custom_id" when it is a JSON object that has them as strings}. Not the line
    itself: a job's headers may hold credentials, which no file the fleet writes repeats."""
    why = str(error)
    prefix = f"line {number}: "
    record: dict = {"line": number, "error": why[len(prefix):] if why.startswith(prefix) else why}
    if not isinstance(text, TooLong):
        try:
            parsed = json.loads(text)
        except ValueError:
            parsed = None
        if isinstance(parsed, dict):
            for name in ("id", "custom_id"):
                if isinstance(parsed.get(name), str):
                    record[name] = parsed[name]
    return record


def validate_file(path: Path, batch: str, progress: Callable[[int], None] | None = None,
                  upstreams: Mapping[str, str] | None = None, *, upstream: str | None = None,
                  rejects: Callable[[dict], None] | None = None) -> Validation:
    """Pass 1: validate every line in a stream; `progress(bytes read so far)` now and then.
    `upstreams`: the fleet's, when known; `upstream`: for lines that name none (see `parse_line`).
    `rejects`: called with every invalid line's `reject_record` (`found.errors` keeps the first
    SHOWN_ERRORS messages only)."""
    found = Validation()
    read = 0
    for number, text in iter_lines(path):
        found.gap(found.lines + 1, number - 1)  # blank lines before this one
        found.lines = number
        read += len(text) + 1
        if progress and number % 2048 == 0:
            progress(read)
        try:
            job = parse_line(text, number, batch, upstreams, upstream=upstream)
        except LineError as exc:
            found.error_count += 1
            if len(found.errors) < SHOWN_ERRORS:
                found.errors.append(str(exc))
            if rejects is not None:
                rejects(reject_record(number, text, exc))
            found.gap(number, number)
            continue
        if line_of(job.id) != number:
            found.gap(number, number)
        found.jobs += 1
        found.ids.add(job.id)
        custom_id = job.metadata.get("custom_id")
        if isinstance(custom_id, str):
            found.custom_ids.add(custom_id)
    found.repeated_ids = found.ids.freeze()
    found.repeated_custom_ids = found.custom_ids.freeze()
    return found
