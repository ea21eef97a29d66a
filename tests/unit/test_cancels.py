"""Cancel markers (ratefleet/runtime/cancels.py) against a real nats-server: a dispatcher's
CancelledBatches learns the markers there before it started and those put later, and forgets
a deleted one; no bucket yet is no error."""

from __future__ import annotations

import anyio
import nats
import pytest

from ratefleet.batches import BatchRecord, load_record, save_record
from ratefleet.runtime.cancels import CancelledBatches, cancel_key, is_cancelled, mark_cancelled, open_batches_bucket
from ratefleet.schemas import Subjects

pytestmark = pytest.mark.anyio


async def until(predicate, seconds: float = 5.0) -> None:
    with anyio.fail_after(seconds):
        while not predicate():
            await anyio.sleep(0.02)


async def test_markers_before_and_after_the_start_and_a_deleted_one(nats_server):
    nc = await nats.connect(nats_server.url)
    try:
        js, subjects = nc.jetstream(), Subjects()
        follower = CancelledBatches(js, subjects, retry_s=0.05)
        async with anyio.create_task_group() as tg:
            tg.start_soon(follower.run)  # no bucket yet: it keeps trying
            await anyio.sleep(0.2)
            assert "b1" not in follower and not await is_cancelled(js, subjects, "b1")
            await save_record(js, subjects, BatchRecord(batch="b1", tier="normal"))  # the bucket exists now
            await mark_cancelled(js, subjects, "b1", by="test")
            await until(lambda: "b1" in follower)
            assert await is_cancelled(js, subjects, "b1") and not await is_cancelled(js, subjects, "b2")
            assert (await load_record(js, subjects, "b1")).batch == "b1"  # the record is untouched
            kv = await open_batches_bucket(js, subjects, create=False)
            await kv.delete(cancel_key("b1"))
            await until(lambda: "b1" not in follower)
            await mark_cancelled(js, subjects, "b2", by="test")
            late = CancelledBatches(js, subjects)  # a dispatcher started after the cancel
            tg.start_soon(late.run)
            await until(lambda: "b2" in late and "b2" in follower)
            assert None not in late and "b1" not in late
            tg.cancel_scope.cancel()
    finally:
        await nc.close()


async def test_a_bucket_made_anew_is_followed_again(nats_server):
    """NATS lost its store (the bucket deleted and made anew): nats-py's watcher then waits in
    silence, so the watch is renewed when quiet, and a cancel after the loss is seen."""
    nc = await nats.connect(nats_server.url)
    try:
        js, subjects = nc.jetstream(), Subjects()
        await mark_cancelled(js, subjects, "before", by="test")
        follower = CancelledBatches(js, subjects, retry_s=0.05, renew_s=0.3)
        async with anyio.create_task_group() as tg:
            tg.start_soon(follower.run)
            await until(lambda: "before" in follower)
            await js.delete_key_value("ratefleet_batches")
            await anyio.sleep(0.2)
            await mark_cancelled(js, subjects, "after", by="test")  # makes the bucket anew
            await until(lambda: "after" in follower)
            tg.cancel_scope.cancel()
    finally:
        await nc.close()
