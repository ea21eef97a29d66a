"""What `ratefleet submit` records about a batch, so `ratefleet results --batch B --wait` knows
when it is complete without the input file; and the `--order input` buffer.

The record lives in the KV bucket `ratefleet_batches` (key: the batch name; kept as long as
Results are, RATEFLEET_RESULTS' max age; `cancelled.<batch>` keys there are cancel markers,
ratefleet/runtime/cancels.py). Its JSON:

    {"batch": "b", "tier": "normal", "state": "submitting" | "submitted" | "interrupted",
     "jobs": 300,          # Results that will land in this batch (fresh + stored by an earlier run)
     "lines": 301,         # last line number of the file
     "gaps": [[1, 1], [7, 9]],  # line ranges with no numbered Result here (blank, invalid, own id);
                                # null when there were too many to record
     "updated_at": 1764400000.0}   # unix seconds; a "submitting" record is refreshed every few seconds

Beside it, key `replays.<batch>` holds how many jobs `ratefleet dlq replay` sent again for the
batch (a decimal count, raised by compare-and-set), so `results --wait` waits for their Results
too: a key of its own, so a resumed submit rewriting the record keeps it, an older ratefleet
reading the record is not met with a field it does not know, and it stays a few bytes.
"""

from __future__ import annotations

import datetime
import heapq
import json
import os
import tempfile
import time
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass, fields
from typing import Any, BinaryIO

import anyio
from nats.js import JetStreamContext
from nats.js.errors import BadRequestError, KeyNotFoundError, KeyWrongLastSequenceError, NotFoundError

from ratefleet.batchfile import line_of
from ratefleet.phases import STALL_HINT
from ratefleet.runtime.cancels import is_cancelled, open_batches_bucket
from ratefleet.schemas import Result, Subjects

STALE_AFTER_S = 30.0  # a "submitting" record older than this: its submit died
QUEUE_CHECK_S = 5.0  # how often a wait checks that the server still holds the jobs it waits for


@dataclass
class BatchRecord:
    """One batch as `ratefleet submit` left it (see the module docstring for the JSON)."""

    batch: str
    tier: str
    state: str = "submitting"
    jobs: int = 0
    lines: int = 0
    gaps: list[list[int]] | None = None
    updated_at: float = 0.0

    def stale(self, now: float) -> bool:
        """True when a submit that was still running stopped refreshing its record (killed)."""
        return self.state == "submitting" and now - self.updated_at > STALE_AFTER_S


async def save_record(js: JetStreamContext, subjects: Subjects, record: BatchRecord) -> None:
    """Store (replace) the record of `record.batch`, stamping `updated_at` now."""
    record.updated_at = time.time()
    kv = await open_batches_bucket(js, subjects, create=True)
    await kv.put(record.batch, json.dumps(asdict(record)).encode())


async def jobs_stream_created(js: JetStreamContext, subjects: Subjects) -> datetime.datetime | None:
    """When the JOBS stream was created (UTC, as the server reports it), or None when there is
    no such stream now. Raises what nats-py raises for other errors (NATS away, no permission)."""
    try:
        return (await js.stream_info(subjects.jobs_stream)).created
    except NotFoundError:
        return None


async def queue_mark(js: JetStreamContext, subjects: Subjects) -> datetime.datetime | None:
    """`jobs_stream_created`, or None when it cannot be read (a producer's NATS permissions need not
    allow it): `queue_lost` then stays quiet."""
    try:
        return await jobs_stream_created(js, subjects)
    except Exception:  # noqa: BLE001 - see docstring
        return None


async def queue_lost(js: JetStreamContext, subjects: Subjects, since: datetime.datetime | None) -> str:
    """Wait until the jobs queued before now are lost, and say how; never returns otherwise (run
    it beside a wait and cancel it after).

    `since`: the JOBS stream's creation time when the wait began (`jobs_stream_created`); None
    (unknown) waits for ever. Lost means the stream was created anew after it (the server came
    back without its store, or the stream was deleted, and a dispatcher made it again), or it is
    missing on two checks in a row (one check can fall between a deletion and its rebuild).
    Checked every QUEUE_CHECK_S seconds; a check that fails (NATS away, no permission to read the
    stream) tells nothing and the watch goes on."""
    missing = 0
    while True:
        await anyio.sleep(QUEUE_CHECK_S)
        if since is None:
            continue
        try:
            created = await jobs_stream_created(js, subjects)
        except Exception:  # noqa: BLE001 - see docstring
            continue
        if created is not None and created != since:
            return (f"stream {subjects.jobs_stream} was created anew at {created:%Y-%m-%d %H:%M:%S} UTC (the NATS "
                    "server came back without its store, or the stream was deleted)")
        missing = missing + 1 if created is None else 0
        if missing >= 2:
            return f"stream {subjects.jobs_stream} no longer exists on the NATS server"


def own_ids_note(order: InputOrder | None) -> str | None:
    """What to say after an `--order input` run that wrote Results of lines carrying their own
    id (not in line order: a Result names no line then), or None."""
    if order is None or not order.own_ids:
        return None
    n = order.own_ids
    return (f"{n:,} {'Result' if n == 1 else 'Results'} of lines with their own `id` came after the others, in "
            "arrival order, not in line order (--order input orders only lines without an `id`); join them "
            "to your lines by job_id")


async def waiting_hint(js: JetStreamContext, subjects: Subjects, batch: str) -> str:
    """What to look at while a batch's Results do not come: a cancelled batch's queued jobs end
    `cancelled` (no call) only when the dispatcher reaches them in their tier's queue, behind
    the jobs queued there before them, so the keys and workers are not the cause; else
    STALL_HINT. STALL_HINT too when the marker cannot be read."""
    try:
        cancelled = await is_cancelled(js, subjects, batch)
    except Exception:  # noqa: BLE001 - see docstring
        cancelled = False
    if not cancelled:
        return STALL_HINT
    return (f"batch {batch} is cancelled: its queued jobs end `cancelled` without a call when the dispatcher "
            "reaches them in their tier's queue, after the jobs queued there before them (`ratefleet status`)")


async def load_record(js: JetStreamContext, subjects: Subjects, batch: str) -> BatchRecord | None:
    """The record of `batch`, or None when no `ratefleet submit` recorded it (or it expired)."""
    kv = await open_batches_bucket(js, subjects, create=False)
    if kv is None:
        return None
    try:
        entry = await kv.get(batch)
    except (KeyNotFoundError, NotFoundError):
        return None
    if entry.value is None:
        return None
    data = json.loads(entry.value)
    known = {f.name for f in fields(BatchRecord)}
    return BatchRecord(**{key: value for key, value in data.items() if key in known})  # (a later version's too)


REPLAYS_PREFIX = "replays."  # key of a batch's replay count (batch names are tokens: no dots)


async def note_replays(js: JetStreamContext, subjects: Subjects, batch: str, count: int) -> bool:
    """Add `count` (jobs `dlq replay` just sent again for `batch`) to the batch's replay count
    (module docstring), so `results --batch B --wait` waits for their Results instead of ending
    on the Results they replace (a nightly-batch trial: it ended at once with 5,360 'failed'
    while the replays ran, and told to replay them again). Compare-and-set, so two replays at
    once both count. False when the batch has no record (nothing to wait by). Raises what
    nats-py raises when NATS refuses it."""
    if await load_record(js, subjects, batch) is None:
        return False
    kv = await open_batches_bucket(js, subjects, create=True)
    key = REPLAYS_PREFIX + batch
    for _ in range(20):
        entry = await _replay_entry(kv, batch)
        try:
            if entry is None or entry.value is None:
                await kv.create(key, str(count).encode())
            else:
                await kv.update(key, str(int(entry.value) + count).encode(), last=entry.revision)
            return True
        except (KeyWrongLastSequenceError, BadRequestError):  # another replay counted meanwhile: read again
            continue
    raise RuntimeError(f"the replay count of batch {batch} kept changing; run `ratefleet results --wait` later")


async def replays_sent(js: JetStreamContext, subjects: Subjects, batch: str) -> int:
    """How many jobs `dlq replay` sent again for `batch` (0: none, or no bucket)."""
    kv = await open_batches_bucket(js, subjects, create=False)
    entry = None if kv is None else await _replay_entry(kv, batch)
    try:
        return int(entry.value or b"0") if entry is not None else 0
    except ValueError:
        return 0


async def _replay_entry(kv: Any, batch: str) -> Any:
    """The KV entry of `batch`'s replay count, None when there is none."""
    try:
        return await kv.get(REPLAYS_PREFIX + batch)
    except (KeyNotFoundError, NotFoundError):
        return None


class InputOrder:
    """Puts Results back in the file's line order, holding only those that arrive early.

    A Result is released as soon as every line before it has been released or is a known
    gap (`gaps`: line ranges that have no numbered Result, from the batch record). Without
    gap information, what is held past an unknown gap comes out at `flush()` (in line
    order). Results of lines that carried their own id have no line number: they come last,
    in arrival order.

    What is held waits in an anonymous temporary file, not in memory: a file whose lines all
    carry their own id holds every Result until the end, and one slow early line holds all
    that arrive meanwhile (50,000 small Results held in memory took 386 MB against 113 MB).
    Memory is a few integers per held Result.
    """

    def __init__(self, gaps: list[list[int]] | None = None) -> None:
        self._gaps = sorted((int(a), int(b)) for a, b in gaps or [])
        self._gaps.reverse()  # pop() from the end: the lowest range
        self._next = 1
        self._held: list[tuple[int, int, int, int]] = []  # (line, arrival, offset, size) in the spill file
        self._unnumbered: list[tuple[int, int]] = []  # (offset, size)
        self._arrival = 0
        self.own_ids = 0  # Results without a line number taken so far (written last, in arrival order)
        self._spill: BinaryIO | None = None  # opened on the first Result held

    @property
    def held(self) -> int:
        return len(self._held) + len(self._unnumbered)

    def push(self, result: Result) -> Iterable[Result]:
        """Take one Result; return those now releasable, in order. Those it held are read back
        from the spill file one at a time as they are iterated (all at once, one slow early
        line's wait came back into memory when it ended): iterate them before the next push."""
        line = line_of(result.job_id)
        if line is None:
            self.own_ids += 1
            self._unnumbered.append(self._keep(result))
            return []
        if not self._held and not self._waits(line):  # the next line, nothing held: straight through
            self._next = max(self._next, line + 1)
            return [result]
        self._arrival += 1
        heapq.heappush(self._held, (line, self._arrival, *self._keep(result)))
        places = []
        while self._held and not self._waits(self._held[0][0]):
            line, _, offset, size = heapq.heappop(self._held)
            self._next = max(self._next, line + 1)
            places.append((offset, size))
        return self._loaded(places) if places else []

    def _waits(self, line: int) -> bool:
        """True while a line before `line` has neither been released nor is a known gap."""
        self._skip_gaps()
        return line > self._next

    def _skip_gaps(self) -> None:
        while self._gaps and self._gaps[-1][0] <= self._next:
            start, end = self._gaps.pop()
            self._next = max(self._next, end + 1)

    def flush(self) -> Iterator[Result]:
        """Everything still held: numbered in line order, then the unnumbered ones (read one
        at a time: iterate it before the next push). The spill file is closed at the end."""
        held, unnumbered = sorted(self._held), self._unnumbered
        self._held, self._unnumbered = [], []
        yield from self._loaded([(offset, size) for _, _, offset, size in held])
        yield from self._loaded(unnumbered)
        if self._spill is not None and not self.held:  # all given back: closed (a later Result opens a new one)
            self._spill.close()
            self._spill = None

    def _keep(self, result: Result) -> tuple[int, int]:
        """Append `result` to the spill file; its (offset, size) there."""
        if self._spill is None:
            self._spill = tempfile.TemporaryFile()  # noqa: SIM115 - closed by flush(); gone on exit
        elif not self.held:  # nothing waits (what was released has been read): the file starts over
            self._spill.seek(0)
            self._spill.truncate()
        data = result.to_json()
        offset = self._spill.seek(0, os.SEEK_END)
        self._spill.write(data)
        return offset, len(data)

    def _loaded(self, places: list[tuple[int, int]]) -> Iterator[Result]:
        """The Results kept at `places` ((offset, size) in the spill file), read one at a time."""
        for offset, size in places:
            yield self._load(offset, size)

    def _load(self, offset: int, size: int) -> Result:
        assert self._spill is not None
        self._spill.seek(offset)
        return Result.from_json(self._spill.read(size))
