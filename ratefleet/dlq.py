"""Dead letters: list them, and replay the ones that hold a job under a new id."""

from __future__ import annotations

import json

import nats.js.errors
from nats.js.api import DeliverPolicy
from rich.table import Column, Table

from ratefleet.batches import note_replays
from ratefleet.cli_support import fail, make_console
from ratefleet.client import Client
from ratefleet.runtime.logs import get_logger
from ratefleet.runtime.store import publish_job
from ratefleet.runtime.streams import delete_message
from ratefleet.schemas.config_nats import NatsAuthConfig
from ratefleet.schemas.job import new_job_id

log = get_logger("ratefleet.dlq")
NARROW = 120  # columns below which `dlq list` prints one block per letter instead of a table


async def read_dead(client: Client, tier: str | None, limit: int | None = None,
                    batch: str | None = None, codes: frozenset[str] | None = None) -> list[tuple[int, dict]]:
    """(stream sequence, letter) pairs, oldest first."""
    return (await read_dead_page(client, tier, limit, batch, codes))[0]


def letter_code(letter: dict) -> str | None:
    """The reason code of a dead letter (`reason.code`: e.g. attempts_exhausted, invalid)."""
    reason = letter.get("reason")
    return str(reason.get("code")) if isinstance(reason, dict) and reason.get("code") is not None else None


def letter_batch(letter: dict) -> str | None:
    """The batch of the job a dead letter holds (None: no job, or a job without a batch)."""
    job = letter.get("job")
    return job.get("batch") if isinstance(job, dict) else None


async def read_dead_page(client: Client, tier: str | None, limit: int | None,
                         batch: str | None = None,
                         codes: frozenset[str] | None = None) -> tuple[list[tuple[int, dict]], int]:
    """The first `limit` (stream sequence, letter) pairs, oldest first, and how many letters
    (of `tier`, else all) come after them. `batch`: only letters holding a job of that batch;
    `codes`: only letters whose reason code is one of these (with either, every letter is read
    to find them; the count after them is then of those only)."""
    filtered = batch is not None or codes is not None
    subject = client.subjects.dead(tier or "*")
    try:
        info = await client.js.stream_info(client.subjects.dead_stream)
    except nats.js.errors.NotFoundError:  # no stream yet: no letters (a refusal or timeout is an error)
        return [], 0
    if info.state.messages == 0:
        return [], 0
    sub = await client.js.subscribe(subject, stream=client.subjects.dead_stream, ordered_consumer=True,
                                    deliver_policy=DeliverPolicy.ALL)
    letters = []
    left = 0
    try:
        while True:
            try:
                msg = await sub.next_msg(timeout=1.0)
            except TimeoutError:
                break
            letter = json.loads(msg.data)
            if (batch is None or letter_batch(letter) == batch) and (codes is None or letter_code(letter) in codes):
                if limit is not None and len(letters) >= limit:
                    left += 1
                else:
                    letters.append((msg.metadata.sequence.stream, letter))
            if not filtered and limit is not None and len(letters) >= limit:
                left += msg.metadata.num_pending  # (+ this one when it was over the limit: --limit 0)
                break
            if msg.metadata.num_pending == 0:
                break
    finally:
        await sub.unsubscribe()
    return letters, left


async def list_dead(url: str, prefix: str, tier: str | None, limit: int, as_json: bool,
                    auth: NatsAuthConfig | None = None, batch: str | None = None,
                    codes: frozenset[str] | None = None) -> None:
    """Print the first `limit` letters (of `batch` only, with one of `codes` only, when given);
    when more are stored, say how many on stderr (and in the title)."""
    async with await Client.connect(url, prefix=prefix, auth=auth, reconnect_forever=False) as client:
        letters, left = await read_dead_page(client, tier, limit, batch, codes)
        if tier is not None and not letters and (problem := await _unknown_tier(client, tier)):
            fail(f"{problem}; `ratefleet dlq list` without --tier lists every tier's letters")  # (an empty table, exit 0)
    if as_json:
        for _seq, letter in letters:
            print(json.dumps(letter))
    else:
        render_dead(letters, make_console(), left)
    if left:  # on stderr: --json output stays one letter a line
        make_console(stderr=True).print(f"{left:,} more dead letter(s) not shown: pass --limit "
                                        f"{len(letters) + left} to see them all", markup=False, highlight=False)


async def _unknown_tier(client: Client, tier: str) -> str | None:
    """What is wrong with `tier` when the fleet's jobs stream has no such tier, else None (also when
    the stream cannot be read: letters of a tier since removed are still listed)."""
    from ratefleet.submit_report import check_tier

    try:
        return await check_tier(client, tier)
    except Exception:  # noqa: BLE001 - no streams, or not readable here: nothing to say about the tier
        return None


def render_dead(letters: list[tuple[int, dict]], console, left: int = 0) -> None:
    """Dead letters for people: a table, or below NARROW columns one block per letter; job ids whole.
    `left`: letters stored after these (the title then says `<shown> of <all>`)."""
    count = f"{len(letters)} of {len(letters) + left}" if left else str(len(letters))
    if console.width < NARROW:  # a table of 7 columns would cut ids: one block per letter, ids whole
        console.print(f"dead letters ({count})", markup=False)
        for seq, letter in letters:
            reason = letter.get("reason") or {}
            console.print(f"{seq}  {letter.get('job_id')}  tier {letter.get('tier')}  attempts {letter.get('attempts')}"
                          f"  replayable {'yes' if letter.get('job') else 'no'}\n    {reason.get('code')}: "
                          f"{reason.get('message')}", markup=False, highlight=False, soft_wrap=True)
        return
    table = Table("seq", Column("job id", no_wrap=True, min_width=12), "tier", Column("code", overflow="fold"),
                  Column("reason", overflow="fold", ratio=1), "attempts", "replayable",
                  title=f"dead letters ({count})")  # whole ids: they are copied into `dlq replay --id`
    for seq, letter in letters:
        reason = letter.get("reason") or {}
        table.add_row(str(seq), str(letter.get("job_id")), str(letter.get("tier")), str(reason.get("code")),
                      str(reason.get("message"))[:300], str(letter.get("attempts")), "yes" if letter.get("job") else "no")
    console.print(table)


async def replay_dead(url: str, prefix: str, tier: str | None, job_id: str | None,
                      purge: bool, auth: NatsAuthConfig | None = None, batch: str | None = None,
                      codes: frozenset[str] | None = None) -> list[tuple[str, str]]:
    """Resubmit letters with a job (of `batch` only, with a reason code of `codes` only, when
    given), each under `<original>-r<hex>` so its new Result can be stored.

    Returns (original job id, new job id) pairs in replay order."""
    replayed: list[tuple[str, str]] = []
    by_batch: dict[str, int] = {}  # batch -> replays sent for it
    async with await Client.connect(url, prefix=prefix, auth=auth, reconnect_forever=False) as client:
        try:
            for seq, letter in await read_dead(client, tier, batch=batch, codes=codes):
                job = letter.get("job")
                if not job or (job_id and letter.get("job_id") != job_id):
                    continue
                original = letter.get("job_id") or job.get("id") or "job"
                job = {**job, "id": f"{original[:100]}-r{new_job_id()[:8]}",
                       "metadata": {**(job.get("metadata") or {}), "replay_of": original}}
                target_tier = letter.get("tier") if letter.get("tier") not in (None, "_") else "normal"
                await publish_job(client.js, client.subjects, target_tier, job["id"], json.dumps(job).encode())
                if job.get("batch"):  # counted as sent, whatever happens to the next ones
                    by_batch[str(job["batch"])] = by_batch.get(str(job["batch"]), 0) + 1
                if purge:
                    await delete_message(client.js, client.subjects.dead_stream, seq)
                replayed.append((original, job["id"]))
        finally:
            for name, count in by_batch.items():
                try:
                    await note_replays(client.js, client.subjects, name, count)
                except Exception as exc:  # noqa: BLE001 - the replays are sent; only `results --wait` waits less
                    log.warning("could not count the replays of the batch; `results --wait` may end before "
                                "their Results", batch=name, error=type(exc).__name__)
    return replayed
