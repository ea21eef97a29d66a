"""Stream and consumer topology, created idempotently by every role at start.

RATEFLEET_JOBS     work-queue, file storage, discard-new at its limits, dedup by job id;
                   one durable pull consumer per tier (`tier-<name>`).
RATEFLEET_RESULTS  limits retention, one message per subject for good (invariant 7).
RATEFLEET_DEAD     dead letters, kept `dead_max_age_s`.
KV ratefleet_handbacks  deliveries that made no call or were answered 429 (ratefleet/runtime/handbacks.py).
KV ratefleet_leader, ratefleet_leader_seen, ratefleet_keys, ratefleet_config  the lease, the
                   last leader's time, key health, the pushed fleet config (`kv_buckets`).
Object Store ratefleet_bodies  response bodies too large for a Result (ratefleet/runtime/bodies.py),
                   kept `results_max_age_s` like the Results that name them.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Callable

import anyio
from nats.js import JetStreamContext
from nats.js.api import (
    AckPolicy,
    ConsumerConfig,
    DeliverPolicy,
    DiscardPolicy,
    ObjectStoreConfig,
    RetentionPolicy,
    StorageType,
    StreamConfig,
)
from nats.js.errors import APIError, BadRequestError, BucketNotFoundError, NoStreamResponseError, NotFoundError
from nats.js.kv import KeyValue
from nats.js.object_store import ObjectStore

from ratefleet.runtime.config_kv import HISTORY as CONFIG_HISTORY
from ratefleet.runtime.logs import get_logger
from ratefleet.schemas import Config, Subjects

log = get_logger("ratefleet.streams")
REBUILD_EVERY_S = 5.0  # seconds between two attempts to create a lost topology anew
# seconds the Rebuilder waits between finding a stream missing and creating it: a deletion still
# under way on the server (see Rebuilder) ends, and the rest of an operator's deletions are seen
REBUILD_SETTLE_S = 1.0
STREAM_NOT_FOUND, CONSUMER_NOT_FOUND = 10059, 10014  # JetStream API err_codes (nats-server errors.json)
STORE_NOT_CREATED = 10049  # "error creating store for stream": e.g. its name's old files still being removed
STORE_PATIENCE_S = 5.0  # seconds ensure_topology retries a 10049 at most
SETTLE_PASSES = 3  # looks after the first a rebuild makes while new deletions keep appearing


def tier_consumer(tier: str) -> str:
    return f"tier-{tier}"


def stream_configs(config: Config) -> list[StreamConfig]:
    subjects = Subjects(config.nats.prefix)
    s = config.streams
    return [
        StreamConfig(
            # only configured tiers: a publish to any other tier fails at once ("unknown tier")
            name=subjects.jobs_stream, subjects=[subjects.jobs(t) for t in config.tiers],
            retention=RetentionPolicy.WORK_QUEUE,
            storage=StorageType.FILE, discard=DiscardPolicy.NEW, max_msgs=s.jobs_max_msgs,
            max_bytes=s.jobs_max_bytes, duplicate_window=s.duplicate_window_s, num_replicas=s.replicas,
            max_msg_size=s.max_job_bytes + 4096,
        ),
        StreamConfig(
            name=subjects.results_stream, subjects=[subjects.results("*", "*")], retention=RetentionPolicy.LIMITS,
            storage=StorageType.FILE, max_age=s.results_max_age_s, max_msgs_per_subject=1,
            discard=DiscardPolicy.NEW, discard_new_per_subject=True,
            duplicate_window=min(s.duplicate_window_s, s.results_max_age_s),
            num_replicas=s.replicas,
        ),
        StreamConfig(
            name=subjects.dead_stream, subjects=[subjects.dead("*")], retention=RetentionPolicy.LIMITS,
            storage=StorageType.FILE, max_age=s.dead_max_age_s, num_replicas=s.replicas,
        ),
    ]


def tier_max_deliver(config: Config, tier: str) -> int:
    """The server's delivery limit of a tier's consumer: `streams.max_deliver` deliveries
    that are not 429s, plus the tier's `max_rate_limited` 429s (which are waits, not
    failures, and must not make a job a poison message)."""
    return config.streams.max_deliver + config.tiers[tier].max_rate_limited


def consumer_config(config: Config, tier: str) -> ConsumerConfig:
    subjects = Subjects(config.nats.prefix)
    return ConsumerConfig(
        durable_name=tier_consumer(tier), filter_subject=subjects.jobs(tier), ack_policy=AckPolicy.EXPLICIT,
        deliver_policy=DeliverPolicy.ALL, ack_wait=config.streams.ack_wait_s, max_deliver=tier_max_deliver(config, tier),
        max_ack_pending=-1, max_waiting=512,
    )


def kv_buckets(config: Config) -> list[tuple[str, float | None, int]]:
    """The KV buckets every role needs, as (bucket, ttl in seconds or None, history), each
    created at `streams.replicas` by `ensure_topology`. The result cache's bucket is created
    on first use (ResultCache, at the same replicas)."""
    subjects, s = Subjects(config.nats.prefix), config.streams
    return [
        (subjects.handbacks_bucket, s.results_max_age_s, 1),
        (subjects.leader_bucket, config.dispatcher.lease_ttl_s, 1),
        (subjects.leader_bucket + "_seen", None, 1),
        (subjects.keys_bucket, None, 1),
        (subjects.config_bucket, None, CONFIG_HISTORY),
    ]


async def ensure_topology(js: JetStreamContext, config: Config, *, patience_s: float = 30.0) -> None:
    """Create or update the three streams, the KV buckets and the per-tier consumers, all at
    `streams.replicas` (a bucket made before at fewer replicas, e.g. the config bucket that
    `startup_config` reads first, is scaled up). Safe to run concurrently. Each step is
    retried on a JetStream API timeout for up to `patience_s` seconds: on a cluster, a
    stream another process has just created answers nothing until its replicas have elected
    a leader (the info request times out), as does a stream whose leader's server just died.
    A step refused with err_code 10049 ("error creating store for stream": nats-server had not
    yet removed the files of a stream of the same name just deleted, or its disk is full or
    unwritable) is retried the same way for up to STORE_PATIENCE_S, with one warning.
    Raises the last TimeoutError (or that APIError) when a step still fails after that."""
    subjects, replicas = Subjects(config.nats.prefix), config.streams.replicas
    steps = [lambda stream=stream: _ensure_stream(js, stream) for stream in stream_configs(config)]
    steps += [lambda b=bucket, t=ttl, h=history: open_kv(js, b, ttl=t, history=h, replicas=replicas)
              for bucket, ttl, history in kv_buckets(config)]
    steps.append(lambda: open_object_store(js, subjects.bodies_bucket, ttl=config.streams.results_max_age_s,
                                           replicas=replicas))
    steps += [lambda tier=tier: _ensure_consumer(js, subjects.jobs_stream, consumer_config(config, tier))
              for tier in config.tiers]
    deadline = time.monotonic() + patience_s
    # 10049 is also what a full or unwritable disk answers: retried for less, and said once
    store_patience = min(patience_s, STORE_PATIENCE_S)
    store_deadline, store_said = time.monotonic() + store_patience, False
    for step in steps:
        while True:
            try:
                await step()
                break
            except (TimeoutError, APIError) as exc:  # nats.errors.TimeoutError is a TimeoutError too
                timed_out = isinstance(exc, TimeoutError)
                if not timed_out and exc.err_code != STORE_NOT_CREATED:
                    raise
                if time.monotonic() >= (deadline if timed_out else store_deadline):
                    raise
                if timed_out:
                    log.info("JetStream API timed out; retrying (a cluster electing a stream leader)")
                elif not store_said:
                    store_said = True
                    log.warning("JetStream could not create a stream's store; retrying for up to "
                                f"{store_patience:g}s. A deletion of the same name under way passes; "
                                "a full or unwritable disk does not, and the NATS server's log says which",
                                detail=exc.description)
                await asyncio.sleep(0.5)


async def _ensure_consumer(js: JetStreamContext, stream: str, wanted: ConsumerConfig) -> None:
    try:
        await js.add_consumer(stream, config=wanted)
    except BadRequestError:
        # another process created it at the same moment; the same request now finds it
        # (the server updates an existing durable's editable settings, e.g. ack_wait)
        await js.add_consumer(stream, config=wanted)


async def open_kv(js: JetStreamContext, bucket: str, ttl: float | None, *, history: int = 1,
                  replicas: int = 1, own_age: bool = False) -> KeyValue:
    """A KV bucket (`history` values per key, each kept `ttl` seconds; None: no limit), created at
    `replicas` when missing; an existing one is scaled up to `replicas`, and with `own_age` (the
    caller owns the bucket's age) brought to `ttl` (`align_bucket`)."""
    try:
        kv = await js.key_value(bucket)
    except (BucketNotFoundError, NotFoundError):
        try:
            return await js.create_key_value(bucket=bucket, ttl=ttl, history=history, replicas=replicas)
        except BadRequestError:  # created concurrently by another process
            return await js.key_value(bucket)
    await align_bucket(js, f"KV_{bucket}", replicas, ttl if own_age else KEEP_AGE)
    return kv


async def kv_keys(js: JetStreamContext, bucket: str) -> list[str]:
    """Every key of KV `bucket` that holds a message (its last value, or a delete marker:
    reading such a key finds it deleted), [] for an empty bucket; NotFoundError when the
    bucket does not exist.

    One STREAM.INFO request with a subjects filter (`$KV.<bucket>.>`), which the server
    answers from one consistent state (up to its 100,000 subjects per answer). nats-py's
    `KeyValue.keys()` walks a watcher instead and ends at the first message it sees with
    nothing pending: a key written meanwhile (with history 1 its old message is gone) is
    missed, and the whole list can come back empty (NoKeysError): 24 of 200 listings of a
    3-key bucket while one key was rewritten in a loop, against 0 of 200 this way
    (nats-io/nats.py#842 reports the empty case)."""
    info = await js.stream_info(f"KV_{bucket}", subjects_filter=f"$KV.{bucket}.>")
    head = len(f"$KV.{bucket}.")
    return [subject[head:] for subject in (info.state.subjects or {})]


async def delete_message(js: JetStreamContext, stream: str, seq: int) -> None:
    """Remove message `seq` from `stream`, without erasing it on disk first.

    The JetStream API's STREAM.MSG.DELETE takes `no_erase`; without it the server overwrites the
    message in its file store before removing it (a secure erase). nats-py's `delete_msg` never
    sends it: measured here (2,000 deletes from a file-store work queue, one at a time) 5.4 ms
    per delete against 0.28 ms with `no_erase`, so a cancelled batch's queued jobs took minutes
    to remove. Raises nats-py's APIError as `delete_msg` does (BadRequestError, err_code 10043
    "sequence N not found": no message at `seq`; ServiceUnavailableError; a TimeoutError)."""
    await js._api_request(f"{js._prefix}.STREAM.MSG.DELETE.{stream}",
                          json.dumps({"seq": seq, "no_erase": True}).encode())


KEEP_AGE = -1.0  # `align_bucket`: leave the max age as it is


async def align_bucket(js: JetStreamContext, stream: str, replicas: int, ttl: float | None) -> None:
    """Bring the existing bucket behind `stream` to at least `replicas` copies (a JetStream
    cluster moves its data) and, unless `ttl` is `KEEP_AGE`, to messages kept `ttl` seconds (None or
    0: no limit; nats-py's `ttl` is the stream's `max_age`). Only the owner of a bucket's age
    passes one: a gateway configured for 7-day files wrote into a 1-day bucket, so its files went
    6 days before the `expires_at` it gave out (a reviewer's finding); but the fleet's own buckets
    keep the age they were made with, since every role opens them with its own file's settings
    and the lease bucket's age is the lease (a worker shortening it let a second leader in). A
    deduplication window longer than the new age is shortened to it, as nats-py does when it
    creates a bucket (the server refuses one longer than the max age)."""
    if replicas <= 1 and ttl == KEEP_AGE:
        return
    info = await js.stream_info(stream)
    config, changed = info.config, []
    if (config.num_replicas or 1) < replicas:
        config.num_replicas, changed = replicas, [*changed, f"replicas {replicas}"]
    wanted = float(ttl or 0)
    if ttl != KEEP_AGE and abs(float(config.max_age or 0) - wanted) > 0.001:
        config.max_age, changed = wanted, [*changed, f"max age {wanted:g} s (was {float(config.max_age or 0):g})"]
        if wanted and config.duplicate_window and config.duplicate_window > wanted:
            config.duplicate_window = wanted
    if changed:
        await js.update_stream(config)
        log.info("bucket brought to its configured settings", stream=stream, changed=", ".join(changed))


async def open_object_store(js: JetStreamContext, bucket: str, *, ttl: float, replicas: int,
                            own_age: bool = False) -> ObjectStore:
    """An Object Store bucket (file storage, objects kept `ttl` seconds), created at
    `replicas` when missing; an existing one is scaled up, and with `own_age` brought to `ttl`
    (`align_bucket`)."""
    try:
        store = await js.object_store(bucket)
    except (BucketNotFoundError, NotFoundError):
        try:
            return await js.create_object_store(bucket, config=ObjectStoreConfig(
                ttl=ttl, storage=StorageType.FILE, replicas=replicas))
        except BadRequestError:  # created concurrently by another process
            return await js.object_store(bucket)
    await align_bucket(js, f"OBJ_{bucket}", replicas, ttl if own_age else KEEP_AGE)
    return store


async def _ensure_stream(js: JetStreamContext, stream: StreamConfig) -> None:
    try:
        await js.stream_info(stream.name)
    except NotFoundError:
        try:
            await js.add_stream(stream)
            return
        except BadRequestError:
            pass  # created concurrently by another process
    await js.update_stream(stream)


class Remake:
    """When a bucket a process opens on first use (the gateway's files and batches buckets, the
    result cache) may be made anew after NATS lost it: `settle_s` seconds after it was first
    found gone (`lost`), so that a deletion still under way on the server ends first. A bucket is
    a stream (`KV_<bucket>`, `OBJ_<bucket>`), exposed to the race measured in the Rebuilder's
    docstring: made again the moment it reads as missing, it can come out unable to store.

    `wait_s()`: seconds still to wait before making it (0.0: now, or it was never lost);
    `made()` once it is open again. Losses seen again while waiting keep the first time."""

    def __init__(self, settle_s: float = REBUILD_SETTLE_S) -> None:
        self.settle_s = settle_s
        self._lost_at: float | None = None  # time.monotonic() it was first found gone

    def lost(self) -> None:
        if self._lost_at is None:
            self._lost_at = time.monotonic()

    def wait_s(self) -> float:
        if self._lost_at is None:
            return 0.0
        return max(0.0, self._lost_at + self.settle_s - time.monotonic())

    def made(self) -> None:
        self._lost_at = None


def stream_gone(exc: BaseException) -> bool:
    """Whether `exc` says a stream, bucket or consumer of the fleet is missing on the server:
    a JetStream publish no stream captures (NoStreamResponseError, the server's 503 "no
    responders": also a KV create or update in a deleted bucket), a bucket lookup that finds
    none (BucketNotFoundError), or the API's "stream not found" / "consumer not found"
    (err_code 10059 / 10014). Not a missing key or message (KeyNotFoundError and the like)."""
    if isinstance(exc, (NoStreamResponseError, BucketNotFoundError)):
        return True
    return getattr(exc, "err_code", None) in (STREAM_NOT_FOUND, CONSUMER_NOT_FOUND)


class Rebuilder:
    """Creates the fleet's streams, buckets and consumers anew (`ensure_topology`) once NATS
    has lost them (`missing_topology`): a server restarted without its store (memory storage, a new volume) or an
    operator deleted them. Without it the running roles would fail every job until each was
    restarted. What the lost streams held (queued jobs, Results, dead letters) is gone with
    them, which is logged as an error. `config` gives the config to create (the fleet's live
    one); an attempt is made at most once every `every_s` seconds however often it is asked.

    What is found missing is created only after `settle_s` seconds and a second look. nats-server
    (2.15.1) answers "stream not found" while it is still removing a deleted stream's files, and a
    stream of the same name created in that window either fails (err_code 10049, retried by
    `ensure_topology`) or is created and loses its files to the old stream's removal: its log says
    "Critical write error: error opening msg block file", and no publish to it is acknowledged
    until it is deleted again. Here, a stream created from another connection the moment the old
    one read as not found came out so about once in 200 to 1,500 tries (once the deletion's reply
    was awaited: none in 300), and in a fleet the first 503 comes within milliseconds of an
    operator's `nats stream rm`: the Rebuilder made such a JOBS stream in 2 of 20 runs of the
    e2e deletion test beside other load, and no job was stored for the 45 s the test waited. The
    wait also lets an operator's next deletion (the Results after the jobs) be seen, so one pass
    creates both."""

    def __init__(self, js: JetStreamContext, config: Callable[[], Config], every_s: float = REBUILD_EVERY_S,
                 settle_s: float = REBUILD_SETTLE_S) -> None:
        self.js, self.config, self.every_s, self.settle_s = js, config, every_s, settle_s
        self._next = float("-inf")
        self.rebuilt = 0  # times the topology was created anew

    async def rebuild(self, what: str) -> bool:
        """Create what is missing of the topology anew, asked because `what` (e.g. "the lease
        bucket") looked missing. True when something was missing and is created now; False when
        an attempt was made less than `every_s` ago, nothing is missing (a 503 of a cluster
        electing a stream leader looks the same), or NATS could not be asked (logged; the next
        ask tries again). Something missing is created once it has been missing for `settle_s`
        seconds: a look finding new names missing waits again (up to SETTLE_PASSES waits, then
        all is created). Never raises but for cancellation."""
        if not self.due():
            return False
        self._next = time.monotonic() + self.every_s
        config = self.config()
        try:
            missing = await missing_topology(self.js, config)
            seen: set[str] = set()
            for _ in range(SETTLE_PASSES):  # each deletion under way ends first (see the class)
                if not missing or self.settle_s <= 0 or seen.issuperset(missing):
                    break  # (all of it missing for settle_s already)
                seen = set(missing)
                await anyio.sleep(self.settle_s)
                missing = await missing_topology(self.js, config)
            if not missing:
                log.debug("topology looked missing but is all there", asked_for=what)
                return False
            log.error("the fleet's streams or buckets are gone from NATS (a server restarted without its store, or "
                      f"they were deleted); creating them anew. {_what_was_lost(missing, config)}", missing=missing)
            await ensure_topology(self.js, config, patience_s=self.every_s)
        except anyio.get_cancelled_exc_class():
            self._next = float("-inf")  # cut short (a leadership ending): the next ask tries at once
            raise
        except Exception as exc:  # noqa: BLE001 - NATS still away or refusing: the next ask tries again
            log.warning("could not create the streams and buckets yet; trying again", error=type(exc).__name__,
                        detail=str(exc)[:200])
            return False
        self.rebuilt += 1
        log.info("streams and buckets created anew", missing=missing)
        return True

    def due(self) -> bool:
        """Whether `rebuild` would make an attempt now (the last one is `every_s` old)."""
        return time.monotonic() >= self._next


def _what_was_lost(missing: list[str], config: Config) -> str:
    """What went with the `missing` streams, and what to do about it (for the rebuild's log)."""
    subjects = Subjects(config.nats.prefix)
    lost = [what for name, what in (
        (subjects.jobs_stream, "queued jobs (submit them again: `ratefleet submit` skips lines whose Result is stored)"),
        (subjects.results_stream, "Results"), (subjects.dead_stream, "dead letters"),
        (f"KV_{subjects.config_bucket}", "the pushed config (push it again: `ratefleet config push FILE`)"),
        (f"OBJ_{subjects.bodies_bucket}", "large response bodies"),
    ) if name in missing]
    return "Lost with them: " + "; ".join(lost) if lost else "Nothing else was lost with them (fleet state only)"


async def missing_topology(js: JetStreamContext, config: Config) -> list[str]:
    """The streams (KV and Object Store buckets as their streams, `KV_<bucket>`, `OBJ_<bucket>`)
    and tier consumers (`consumer tier-<t>`) of `ensure_topology` that the server does not
    have; one info request each. Raises what nats-py raises when NATS cannot answer."""
    subjects = Subjects(config.nats.prefix)
    names = [stream.name for stream in stream_configs(config)]
    names += [f"KV_{bucket}" for bucket, _, _ in kv_buckets(config)] + [f"OBJ_{subjects.bodies_bucket}"]
    missing = []
    for name in names:
        try:
            await js.stream_info(name)
        except NotFoundError:
            missing.append(name)
    if subjects.jobs_stream not in missing:
        for tier in config.tiers:
            try:
                await js.consumer_info(subjects.jobs_stream, tier_consumer(tier))
            except NotFoundError:
                missing.append(f"consumer {tier_consumer(tier)}")
    return missing
