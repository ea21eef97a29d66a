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
import time

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
from nats.js.errors import BadRequestError, BucketNotFoundError, NotFoundError
from nats.js.kv import KeyValue
from nats.js.object_store import ObjectStore

from ratefleet.runtime.config_kv import HISTORY as CONFIG_HISTORY
from ratefleet.runtime.logs import get_logger
from ratefleet.schemas import Config, Subjects

log = get_logger("ratefleet.streams")


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
    Raises the last TimeoutError when a step still times out after that."""
    subjects, replicas = Subjects(config.nats.prefix), config.streams.replicas
    steps = [lambda stream=stream: _ensure_stream(js, stream) for stream in stream_configs(config)]
    steps += [lambda b=bucket, t=ttl, h=history: open_kv(js, b, ttl=t, history=h, replicas=replicas)
              for bucket, ttl, history in kv_buckets(config)]
    steps.append(lambda: open_object_store(js, subjects.bodies_bucket, ttl=config.streams.results_max_age_s,
                                           replicas=replicas))
    steps += [lambda tier=tier: _ensure_consumer(js, subjects.jobs_stream, consumer_config(config, tier))
              for tier in config.tiers]
    deadline = time.monotonic() + patience_s
    for step in steps:
        while True:
            try:
                await step()
                break
            except TimeoutError:  # nats.errors.TimeoutError is one too
                if time.monotonic() >= deadline:
                    raise
                log.info("JetStream API timed out; retrying (a cluster electing a stream leader)")
                await asyncio.sleep(0.5)


async def _ensure_consumer(js: JetStreamContext, stream: str, wanted: ConsumerConfig) -> None:
    try:
        await js.add_consumer(stream, config=wanted)
    except BadRequestError:
        # another process created it at the same moment; the same request now finds it
        # (the server updates an existing durable's editable settings, e.g. ack_wait)
        await js.add_consumer(stream, config=wanted)


async def open_kv(js: JetStreamContext, bucket: str, ttl: float | None, *, history: int = 1,
                  replicas: int = 1) -> KeyValue:
    """A KV bucket (`history` values per key), created at `replicas` when missing; an
    existing one with fewer replicas is scaled up (a JetStream cluster moves its data)."""
    try:
        kv = await js.key_value(bucket)
    except (BucketNotFoundError, NotFoundError):
        try:
            return await js.create_key_value(bucket=bucket, ttl=ttl, history=history, replicas=replicas)
        except BadRequestError:  # created concurrently by another process
            return await js.key_value(bucket)
    if replicas > 1:
        await _scale_up(js, f"KV_{bucket}", replicas)
    return kv


async def _scale_up(js: JetStreamContext, stream: str, replicas: int) -> None:
    info = await js.stream_info(stream)
    if (info.config.num_replicas or 1) < replicas:
        info.config.num_replicas = replicas
        await js.update_stream(info.config)


async def open_object_store(js: JetStreamContext, bucket: str, *, ttl: float, replicas: int) -> ObjectStore:
    """An Object Store bucket (file storage, objects kept `ttl` seconds), created at
    `replicas` when missing; an existing one with fewer replicas is scaled up."""
    try:
        store = await js.object_store(bucket)
    except (BucketNotFoundError, NotFoundError):
        try:
            return await js.create_object_store(bucket, config=ObjectStoreConfig(
                ttl=ttl, storage=StorageType.FILE, replicas=replicas))
        except BadRequestError:  # created concurrently by another process
            return await js.object_store(bucket)
    if replicas > 1:
        await _scale_up(js, f"OBJ_{bucket}", replicas)
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
