"""NATS lost the fleet's topology (a restart without its store, or streams deleted): what
counts as "gone", what the Rebuilder finds missing and creates anew, how often it tries, and
the gateway's own buckets and the result cache's made anew once their deletion has settled
(real nats-server)."""

from __future__ import annotations

import contextlib
import io
from collections.abc import AsyncIterator

import anyio
import nats
import pytest
from nats.js.errors import APIError, BucketNotFoundError, KeyNotFoundError, NoStreamResponseError, NotFoundError

from ratefleet import batches
from ratefleet.gateway.batch_book import BatchBook
from ratefleet.gateway.files import FileStore
from ratefleet.runtime.streams import Rebuilder, ensure_topology, missing_topology, stream_gone
from ratefleet.schemas import Subjects
from ratefleet.schemas.config import parse_config

pytestmark = pytest.mark.anyio
CONFIG = parse_config({})


@contextlib.asynccontextmanager
async def topology(url: str) -> AsyncIterator:
    """A JetStream context on `url` with the whole topology created."""
    nc = await nats.connect(url)
    try:
        js = nc.jetstream()
        await ensure_topology(js, CONFIG)
        yield js
    finally:
        await nc.close()


def rebuild_soon(tg, rebuilder: Rebuilder, done: list[bool], what: str) -> None:
    """Start `rebuilder.rebuild(what)` in `tg`; its answer is appended to `done`."""
    async def rebuild() -> None:
        done.append(await rebuilder.rebuild(what))

    tg.start_soon(rebuild)


@contextlib.asynccontextmanager
async def rebuilding_after_the_jobs_deleted(js, settle_s: float) -> AsyncIterator[tuple[Rebuilder, list[bool]]]:
    """The JOBS stream deleted and a rebuild (its one pass of the hour) under way in the block;
    yields the Rebuilder and the list its answer is appended to, once the block's task group ends."""
    rebuilder = Rebuilder(js, lambda: CONFIG, every_s=3600, settle_s=settle_s)
    await js.delete_stream("RATEFLEET_JOBS")
    done: list[bool] = []
    async with anyio.create_task_group() as tg:
        rebuild_soon(tg, rebuilder, done, "the consumer of tier vip")
        yield rebuilder, done


def test_what_counts_as_a_lost_stream():
    assert stream_gone(NoStreamResponseError())  # a publish (or KV create/update) no stream captures
    assert stream_gone(BucketNotFoundError())
    assert stream_gone(NotFoundError(code=404, err_code=10059, description="stream not found"))
    assert stream_gone(APIError(code=404, err_code=10014, description="consumer not found"))
    assert not stream_gone(KeyNotFoundError())  # a missing key is not a missing bucket
    assert not stream_gone(NotFoundError(code=404, err_code=10037, description="no message found"))
    assert not stream_gone(TimeoutError())


async def test_the_rebuilder_creates_what_is_missing_and_only_that(nats_server):
    async with topology(nats_server.url) as js:
        assert await missing_topology(js, CONFIG) == []
        rebuilder = Rebuilder(js, lambda: CONFIG, every_s=0, settle_s=0)
        assert not await rebuilder.rebuild("a 503 with everything there")  # nothing missing: nothing done
        await js.delete_stream("RATEFLEET_RESULTS")
        await js.delete_key_value("ratefleet_leader")
        await js.delete_consumer("RATEFLEET_JOBS", "tier-vip")
        assert sorted(await missing_topology(js, CONFIG)) == ["KV_ratefleet_leader", "RATEFLEET_RESULTS",
                                                               "consumer tier-vip"]
        assert await rebuilder.rebuild("the lease bucket")
        assert await missing_topology(js, CONFIG) == []
        assert rebuilder.rebuilt == 1
        info = await js.stream_info("RATEFLEET_RESULTS")  # made as ensure_topology makes it (invariant 7)
        assert info.config.max_msgs_per_subject == 1 and info.config.discard_new_per_subject


def test_the_log_names_only_what_was_lost():
    from ratefleet.runtime.streams import _what_was_lost

    assert _what_was_lost(["KV_ratefleet_leader"], CONFIG) == "Nothing else was lost with them (fleet state only)"
    both = _what_was_lost(["RATEFLEET_RESULTS", "KV_ratefleet_config"], CONFIG)
    assert both.startswith("Lost with them: Results; the pushed config (push it again")
    assert "queued jobs" not in both


async def test_the_rebuilder_tries_at_most_once_per_interval(nats_server):
    async with topology(nats_server.url) as js:
        rebuilder = Rebuilder(js, lambda: CONFIG, every_s=3600, settle_s=0)
        await js.delete_stream("RATEFLEET_DEAD")
        assert await rebuilder.rebuild("first")
        await js.delete_stream("RATEFLEET_DEAD")
        assert not await rebuilder.rebuild("asked again at once (e.g. every pull's 503)")
        assert await missing_topology(js, CONFIG) == ["RATEFLEET_DEAD"]


@contextlib.asynccontextmanager
async def gateway_stores(url: str) -> AsyncIterator:
    """(js, FileStore, BatchBook) of the gateway on `url`, files and batches kept an hour."""
    nc = await nats.connect(url)
    try:
        js = nc.jetstream()
        subjects = Subjects("ratefleet")
        yield js, FileStore(js, subjects, ttl_s=3600), BatchBook(js, subjects, ttl_s=3600)
    finally:
        await nc.close()


async def test_the_gateways_buckets_are_made_anew_on_the_next_write(nats_server):
    async with gateway_stores(nats_server.url) as (js, files, book):
        first = await files.put("alice", "a.jsonl", "batch", b"{}\n", 3)
        await book.create({"id": "batch_1", "created_at": 1})
        await js.delete_object_store(files.bucket)
        await js.delete_key_value(book.bucket)
        second = await files.put("alice", "b.jsonl", "batch", io.BytesIO(b"{}\n{}\n"), 6)  # a file object: read again
        await book.create({"id": "batch_2", "created_at": 2})
        assert await files.info("alice", first["id"]) is None  # gone with the old bucket
        handle = io.BytesIO()
        assert (await files.read_into("alice", second["id"], handle))["filename"] == "b.jsonl"
        assert handle.getvalue() == b"{}\n{}\n"
        assert await book.get("batch_2") == {"id": "batch_2", "created_at": 2}


async def test_a_paid_answer_is_stored_again_once_its_stream_is_made_anew():
    """The bodies' Object Store (or RATEFLEET_RESULTS) gone under a finished call: the store
    (runtime/store.py `retrying`, which the Result's store and the bodies' upload use) has the
    topology made anew and stores once more, instead of dropping the paid answer as
    `result_not_stored` or calling the upstream again; other failures are not retried."""
    from ratefleet.runtime.store import retrying

    class Store:
        def __init__(self, errors):
            self.errors, self.calls = list(errors), 0

        async def __call__(self):
            self.calls += 1
            if self.errors:
                raise self.errors.pop(0)
            return True

    asked: list[str] = []

    async def rebuild():
        asked.append("rebuild")
        return True

    store = Store([NotFoundError(code=404, err_code=10059, description="stream not found")])
    assert await retrying(store, for_s=5.0, gone=rebuild) is True
    assert store.calls == 2 and len(asked) == 1
    store = Store([APIError(code=503, err_code=10077, description="maximum messages per subject")])
    with pytest.raises(APIError):
        await retrying(store, for_s=5.0, gone=rebuild)
    assert store.calls == 1 and len(asked) == 1


async def test_a_wait_hears_when_its_queued_jobs_are_lost(nats_server, monkeypatch):
    """batches.queue_lost: quiet while the JOBS stream stands; speaks when it was made anew or is
    missing on two checks in a row; a None mark (stream unreadable at the start) stays quiet."""
    monkeypatch.setattr(batches, "QUEUE_CHECK_S", 0.05)
    nc = await nats.connect(nats_server.url)
    try:
        js = nc.jetstream()
        subjects = Subjects()
        await ensure_topology(js, CONFIG)
        mark = await batches.queue_mark(js, subjects)
        assert mark is not None
        for since in (mark, None):
            with anyio.move_on_after(0.5) as quiet:
                await batches.queue_lost(js, subjects, since)
            assert quiet.cancelled_caught, since
        await js.delete_stream(subjects.jobs_stream)
        assert await batches.queue_mark(js, subjects) is None
        with anyio.fail_after(5):
            assert "no longer exists" in await batches.queue_lost(js, subjects, mark)
        await ensure_topology(js, CONFIG)
        with anyio.fail_after(5):
            assert "created anew" in await batches.queue_lost(js, subjects, mark)
        with anyio.move_on_after(0.5) as quiet:
            await batches.queue_lost(js, subjects, await batches.queue_mark(js, subjects))
        assert quiet.cancelled_caught
    finally:
        await nc.close()


async def test_the_rebuilder_waits_for_deletions_under_way_and_creates_them_in_one_pass(nats_server):
    """An operator deleting the jobs, then the Results: the first 503 comes between the two.
    The Rebuilder waits `settle_s` and looks again before it creates anything, so it never
    creates a stream whose deletion the server is still carrying out (nats-server can leave such
    a stream unable to take publishes), and one pass creates both."""
    async with topology(nats_server.url) as js:
        async with rebuilding_after_the_jobs_deleted(js, settle_s=2.0) as (rebuilder, done):
            await anyio.sleep(0.15)
            assert not done  # still waiting: nothing created yet
            assert "RATEFLEET_JOBS" in await missing_topology(js, CONFIG)
            await js.delete_stream("RATEFLEET_RESULTS")
        assert done == [True]
        assert await missing_topology(js, CONFIG) == []  # both, in one pass (the next is an hour away)
        assert rebuilder.rebuilt == 1
        await js.delete_stream("RATEFLEET_DEAD")
        again = Rebuilder(js, lambda: CONFIG, every_s=3600, settle_s=2.0)
        async with anyio.create_task_group() as tg:
            rebuild_soon(tg, again, done, "the dead letters")
            await anyio.sleep(0.15)
            await ensure_topology(js, CONFIG)  # another process made it again before the second look
        assert done == [True, False] and again.rebuilt == 0  # nothing left to create


async def test_a_store_not_created_yet_is_retried(nats_server, monkeypatch):
    """err_code 10049 ("error creating store for stream": the files of a stream of the same
    name still being removed) is retried within `patience_s`, like an API timeout."""
    from ratefleet.runtime import streams

    nc = await nats.connect(nats_server.url)
    try:
        js = nc.jetstream()
        real, refusals = streams._ensure_stream, []

        async def refused_twice(js_, stream):
            if stream.name == "RATEFLEET_JOBS" and len(refusals) < 2:
                refusals.append(stream.name)
                raise APIError(code=500, err_code=10049, description="error creating store for stream")
            await real(js_, stream)

        monkeypatch.setattr(streams, "_ensure_stream", refused_twice)
        await ensure_topology(js, CONFIG, patience_s=10)
        assert refusals == ["RATEFLEET_JOBS"] * 2
        assert await missing_topology(js, CONFIG) == []
        refusals.clear()
        with pytest.raises(APIError):  # not within patience: raised
            await ensure_topology(js, CONFIG, patience_s=0)
        other = APIError(code=500, err_code=10074, description="insufficient resources")

        calls = []

        async def refused_otherwise(js_, stream):
            calls.append(stream.name)
            raise other

        monkeypatch.setattr(streams, "_ensure_stream", refused_otherwise)
        with pytest.raises(APIError) as caught:  # another refusal: at once, not retried
            await ensure_topology(js, CONFIG, patience_s=10)
        assert caught.value is other and calls == ["RATEFLEET_JOBS"]
    finally:
        await nc.close()


async def test_a_deletion_first_seen_on_the_second_look_waits_too(nats_server):
    """The Results deleted just before the wait for the jobs ends: they are not made at once
    (their deletion may still be under way), but once missing for `settle_s` themselves."""
    async with topology(nats_server.url) as js:
        async with rebuilding_after_the_jobs_deleted(js, settle_s=1.5) as (rebuilder, done):
            await anyio.sleep(1.2)  # after the first look, before the second
            await js.delete_stream("RATEFLEET_RESULTS")
            await anyio.sleep(0.7)  # the second look has seen it missing: it waits again
            assert not done and "RATEFLEET_RESULTS" in await missing_topology(js, CONFIG)
        assert done == [True] and await missing_topology(js, CONFIG) == [] and rebuilder.rebuilt == 1


def test_the_roles_rebuilders_wait_a_second_by_default():
    import inspect

    from ratefleet.runtime.streams import REBUILD_SETTLE_S

    assert REBUILD_SETTLE_S >= 1.0  # the dispatcher's and the worker's Rebuilders take the default
    assert inspect.signature(Rebuilder).parameters["settle_s"].default == REBUILD_SETTLE_S


async def _missing(js, stream: str) -> bool:
    try:
        await js.stream_info(stream)
    except NotFoundError:
        return True
    return False


async def test_the_gateways_buckets_found_gone_are_made_only_once_their_deletion_has_settled(nats_server):
    """A bucket is a stream: made again the moment a write finds it gone, nats-server may still be
    removing the old one's files (see Rebuilder). The write that finds it gone waits
    REBUILD_SETTLE_S before making it, then stores."""
    from ratefleet.runtime.streams import REBUILD_SETTLE_S

    async with gateway_stores(nats_server.url) as (js, files, book):
        await files.put("alice", "a.jsonl", "batch", b"{}\n", 3)
        await book.create({"id": "batch_1", "created_at": 1})
        for stream, write in ((f"OBJ_{files.bucket}", lambda: files.put("alice", "b.jsonl", "batch", b"{}\n", 3)),
                              (f"KV_{book.bucket}", lambda: book.create({"id": "batch_2", "created_at": 2}))):
            await js.delete_stream(stream)
            done: list[object] = []
            async with anyio.create_task_group() as tg:
                async def write_soon(write=write, done=done) -> None:
                    done.append(await write())

                tg.start_soon(write_soon)
                await anyio.sleep(REBUILD_SETTLE_S * 0.6)
                assert not done and await _missing(js, stream), stream  # not made yet
            assert done and not await _missing(js, stream)  # then made, and the write stored
        assert [f["filename"] for f in await files.list("alice")] == ["b.jsonl"]  # the new bucket holds it
        assert await book.get("batch_2") == {"id": "batch_2", "created_at": 2}


async def test_the_result_cache_misses_without_waiting_until_its_lost_bucket_may_be_made(nats_server):
    """The result cache never waits in a caller's path: once a write finds its bucket gone,
    lookups miss and writes are skipped (no error counted) until REBUILD_SETTLE_S has passed,
    and only then is the bucket made anew."""
    from ratefleet.runtime.cache import ResultCache
    from ratefleet.runtime.streams import REBUILD_SETTLE_S
    from ratefleet.schemas import Result
    from ratefleet.schemas.result import ResponseInfo

    answer = Result(job_id="j1", status="succeeded", response=ResponseInfo(status=200, json={"answer": 1}))
    nc = await nats.connect(nats_server.url)
    try:
        js = nc.jetstream()
        cache = ResultCache(js, Subjects(), max_ttl_s=3600, max_entry_bytes=4096)
        assert await cache.store("k1", answer, ttl_s=60)
        await js.delete_stream("KV_ratefleet_cache")
        assert not await cache.store("k2", answer, ttl_s=60)  # finds it gone (one error)
        with anyio.fail_after(0.5):  # no wait
            assert not await cache.store("k3", answer, ttl_s=60)
            assert await cache.lookup("k1") is None
        assert await _missing(js, "KV_ratefleet_cache")
        assert cache.stats.errors == 1
        await anyio.sleep(REBUILD_SETTLE_S + 0.1)
        assert await cache.store("k4", answer, ttl_s=60)  # made anew now
        assert (await cache.lookup("k4")) is not None and not await _missing(js, "KV_ratefleet_cache")
    finally:
        await nc.close()


async def test_an_existing_bucket_is_brought_to_the_age_its_opener_is_configured_with(nats_server):
    """A reviewer's finding: a gateway configured for 7-day files wrote into a bucket first made
    for 1 day (its files went 6 days before the `expires_at` it gave out), and a cache bucket
    kept the max age of whichever config made it first."""
    from ratefleet.runtime.streams import open_kv, open_object_store

    nc = await nats.connect(nats_server.url)
    try:
        js = nc.jetstream()
        await open_kv(js, "agecheck", ttl=60)
        await open_kv(js, "agecheck", ttl=3600, own_age=True)
        config = (await js.stream_info("KV_agecheck")).config
        assert config.max_age == 3600
        await open_kv(js, "agecheck", ttl=10, own_age=True)  # shorter than the 60 s dedup window it was made with
        config = (await js.stream_info("KV_agecheck")).config
        assert (config.max_age, config.duplicate_window) == (10, 10)
        await open_kv(js, "agecheck", ttl=None, own_age=True)  # no limit
        assert not (await js.stream_info("KV_agecheck")).config.max_age
        await open_object_store(js, "filecheck", ttl=86400, replicas=1)
        store = await open_object_store(js, "filecheck", ttl=7 * 86400, replicas=1, own_age=True)
        assert (await js.stream_info("OBJ_filecheck")).config.max_age == 7 * 86400
        await store.put("a", b"kept")  # the bucket works after the change
        assert (await store.get("a")).data == b"kept"
    finally:
        await nc.close()


async def test_the_fleets_own_buckets_keep_their_age_whoever_opens_them(nats_server):
    """A reviewer's finding against the first version of the above: a worker starting with the
    default lease_ttl_s (3 s) shortened the lease bucket a dispatcher made with 30 s, and a
    second dispatcher took the lease the first still held. Only a bucket's owner sets its age
    (the gateway its files and batches); ensure_topology and other openers leave it."""
    from ratefleet.runtime.streams import open_kv

    long_lease = parse_config({"dispatcher": {"lease_ttl_s": 30}})
    nc = await nats.connect(nats_server.url)
    try:
        js = nc.jetstream()
        await ensure_topology(js, long_lease)
        bucket = f"KV_{Subjects().leader_bucket}"
        assert (await js.stream_info(bucket)).config.max_age == 30
        await ensure_topology(js, CONFIG)  # a worker with the default config starting
        await open_kv(js, Subjects().leader_bucket, ttl=3.0)  # and the lease opened as a dispatcher does
        assert (await js.stream_info(bucket)).config.max_age == 30
        subjects = Subjects("ratefleet")
        await BatchBook(js, subjects, ttl_s=86400).create({"id": "batch_1", "created_at": 1})
        await BatchBook(js, subjects, ttl_s=7 * 86400).create({"id": "batch_2", "created_at": 2})
        assert (await js.stream_info(f"KV_{BatchBook(js, subjects, ttl_s=1).bucket}")).config.max_age == 7 * 86400
    finally:
        await nc.close()
