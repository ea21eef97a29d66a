"""Batches cancelled with `ratefleet cancel --batch B`: what is left of them is never called.

A cancel is a marker in the batch-record bucket (`ratefleet_batches`, suffixed like the
streams; see ratefleet/batches.py), key `cancelled.<batch>` (batch names are tokens without
dots, so markers never meet records), value JSON `{"batch", "at" (unix seconds), "by"}`.
Every dispatcher follows the markers (`CancelledBatches.run`, a KV watch); the leader ends the
batch's jobs it holds in its window (core/leader.py `BatchCancelled`) and its intake each one
it reads later (dispatcher/shell/puller.py): `failed` / `cancelled`, with its one Result,
acked, no dead letter, no call. Jobs already handed to a worker finish as usual. The marker lives as long as the
bucket keeps records (the Results' max age).
"""

from __future__ import annotations

import contextlib
import json
import time
from collections.abc import Callable

import anyio
import nats.errors
from nats.js import JetStreamContext
from nats.js.errors import BucketNotFoundError, NotFoundError

from ratefleet.runtime.logs import get_logger
from ratefleet.schemas import Subjects

log = get_logger("ratefleet.cancels")

PREFIX = "cancelled."


def batches_bucket(subjects: Subjects) -> str:
    """The KV bucket of batch records and cancel markers for this prefix (`ratefleet_batches`,
    suffixed like the streams)."""
    return "ratefleet_batches" + subjects.stream_suffix.lower()


def cancel_key(batch: str) -> str:
    """The marker's key of batch `batch`."""
    return PREFIX + batch


async def open_batches_bucket(js: JetStreamContext, subjects: Subjects, create: bool):
    """The bucket (None when it does not exist and `create` is False). Made as long-lived as
    the Results, on as many servers (a record or marker is useless once they are gone)."""
    try:
        return await js.key_value(batches_bucket(subjects))
    except (BucketNotFoundError, NotFoundError):
        if not create:
            return None
    try:
        info = await js.stream_info(subjects.results_stream)
        ttl, replicas = info.config.max_age, info.config.num_replicas or 1
    except NotFoundError:
        ttl, replicas = 86400.0, 1
    return await js.create_key_value(bucket=batches_bucket(subjects), ttl=ttl, history=1, replicas=replicas)


async def mark_cancelled(js: JetStreamContext, subjects: Subjects, batch: str, by: str) -> None:
    """Store the cancel marker of `batch` (`by`: who, for the record). Raises what nats-py
    raises when NATS refuses it."""
    kv = await open_batches_bucket(js, subjects, create=True)
    await kv.put(cancel_key(batch), json.dumps({"batch": batch, "at": time.time(), "by": by}).encode())


async def is_cancelled(js: JetStreamContext, subjects: Subjects, batch: str) -> bool:
    """Whether `batch` carries a cancel marker now."""
    kv = await open_batches_bucket(js, subjects, create=False)
    if kv is None:
        return False
    try:
        entry = await kv.get(cancel_key(batch))
    except (nats.js.errors.KeyNotFoundError, NotFoundError):
        return False
    return bool(entry.value)


class CancelledBatches:
    """The cancelled batch names one dispatcher knows, kept current by `run` (a watch on the
    markers). `batch in cancels` is what intake asks, per job (a set lookup)."""

    def __init__(self, js: JetStreamContext, subjects: Subjects, *, retry_s: float = 2.0, renew_s: float = 30.0,
                 on_cancel: Callable[[str], None] = lambda batch: None) -> None:
        """`on_cancel(batch)`: told of each batch newly cancelled (the leader ends the jobs of it
        it holds). `renew_s`: a watch quiet this long is started afresh (seconds)."""
        self.js, self.subjects, self.retry_s, self.on_cancel = js, subjects, retry_s, on_cancel
        self.renew_s = renew_s
        self.names: set[str] = set()

    def __contains__(self, batch: object) -> bool:
        return batch in self.names

    async def run(self) -> None:
        """Follow the markers until cancelled. No bucket yet (nothing was ever submitted with
        `ratefleet submit`), NATS away, or the bucket lost: tried again every `retry_s`; a
        quiet watch is renewed every `renew_s`, so one that lost its bucket with the server's
        store (nats-py's watcher then waits in silence) is replaced."""
        while True:
            try:
                await self._watch()
            except Exception as exc:  # noqa: BLE001 - see docstring
                log.debug("cancel markers not followed", error=type(exc).__name__)
            await anyio.sleep(self.retry_s)

    async def _watch(self) -> None:
        kv = await open_batches_bucket(self.js, self.subjects, create=False)
        if kv is None:
            return
        watcher = await kv.watch(PREFIX + "*")
        seen: set[str] | None = set()  # the markers of the initial values (None once they are in)
        try:
            while True:
                try:
                    entry = await watcher.updates(timeout=self.renew_s)
                except (nats.errors.TimeoutError, TimeoutError):
                    return  # watched afresh (a watch whose bucket went with the server's store stays silent)
                if entry is None:  # the initial values are in: markers deleted meanwhile are gone
                    if seen is not None:
                        self.names &= seen
                    seen = None
                    continue
                batch = entry.key[len(PREFIX):]
                if entry.value and entry.operation in (None, "PUT"):
                    if seen is not None:
                        seen.add(batch)
                    if batch not in self.names:
                        log.info("batch cancelled: its queued jobs end without a call", batch=batch)
                        self.names.add(batch)
                        self.on_cancel(batch)
                else:
                    self.names.discard(batch)
        finally:
            with contextlib.suppress(Exception):
                await watcher.stop()
