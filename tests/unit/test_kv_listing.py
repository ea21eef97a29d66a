"""Listing a KV bucket while its entries are written (runtime/streams.py `kv_keys`), against a
real nats-server: nats-py's `KeyValue.keys()` walks a watcher that can end early, so the
gateway's `batches.list` (and `files.list` beside it) dropped a batch being updated, and a new
leader could start with an operator-disabled key enabled when its record was being written."""

from __future__ import annotations

import time

import anyio
import nats
import pytest

from ratefleet.dispatcher.shell.keycontrol import KeyStore
from ratefleet.gateway.batch_book import BatchBook, new_batch
from ratefleet.runtime.streams import kv_keys
from ratefleet.schemas import Subjects

pytestmark = pytest.mark.anyio
LISTINGS = 100  # nats-py's keys() missed 24 of 200 such listings here


async def test_the_batch_list_keeps_batches_while_one_is_updated(nats_server):
    nc = await nats.connect(nats_server.url)
    try:
        book = BatchBook(nc.jetstream(), Subjects("ratefleet"), ttl_s=3600)
        made = [new_batch(caller="app", tier="normal", upstream=None, input_file_id=f"file-{i}",
                          endpoint="/v1/chat/completions", completion_window="24h", metadata=None,
                          now=time.time() + i) for i in range(3)]
        for record in made:
            await book.create(record)
        counts = []
        async with anyio.create_task_group() as tg:
            async def progress() -> None:  # a runner counting the middle batch's answers
                n = 0
                while True:
                    n += 1
                    await book.update(made[1]["id"], lambda r, n=n: {**r, "request_counts": {**r["request_counts"],
                                                                                             "completed": n}})

            tg.start_soon(progress)
            for _ in range(LISTINGS):
                counts.append([r["id"] for r in await book.all()])
            tg.cancel_scope.cancel()
        assert all(ids == [r["id"] for r in reversed(made)] for ids in counts), \
            f"{sum(ids != [r['id'] for r in reversed(made)] for ids in counts)} of {LISTINGS} listings differ"
    finally:
        await nc.close()


async def test_key_records_load_whole_while_one_is_written(nats_server):
    nc = await nats.connect(nats_server.url)
    try:
        keys = KeyStore(nc.jetstream(), "ratefleet_keys")
        for key_id in ("k1", "k2", "k3"):
            assert await keys.save(key_id, {"by": "operator", "reason": "rotating"})
        loaded = []
        async with anyio.create_task_group() as tg:
            async def writer() -> None:
                while True:
                    await keys.save("k2", {"by": "operator", "reason": "rotating"})

            tg.start_soon(writer)
            for _ in range(LISTINGS):
                loaded.append(sorted(await keys.load()))
            tg.cancel_scope.cancel()
        assert loaded == [["k1", "k2", "k3"]] * LISTINGS
        await keys.save("k2", None)  # deleted: listed by its marker, skipped when read
        assert sorted(await keys.load()) == ["k1", "k3"]
        assert sorted(await kv_keys(nc.jetstream(), "ratefleet_keys")) == ["k1", "k2", "k3"]
    finally:
        await nc.close()


async def test_an_empty_bucket_lists_no_keys_and_a_missing_one_is_not_found(nats_server):
    from nats.js.errors import NotFoundError

    nc = await nats.connect(nats_server.url)
    try:
        js = nc.jetstream()
        await js.create_key_value(bucket="empty")
        assert await kv_keys(js, "empty") == []
        with pytest.raises(NotFoundError):
            await kv_keys(js, "absent")
        assert await BatchBook(js, Subjects("ratefleet"), ttl_s=3600).all() == []
    finally:
        await nc.close()
