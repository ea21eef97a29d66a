"""ConfigFollower over a real nats-server: each valid revision is applied once and in order,
a document that fails validation is skipped (the running revision stays), and a revision
whose apply fails (e.g. NATS away) is offered again instead of being lost."""

from __future__ import annotations

import time

import anyio
import nats
import pytest

from ratefleet.runtime.config_kv import ConfigFollower, open_config_bucket, push_config
from ratefleet.schemas import Subjects
from ratefleet.schemas.config_store import CURRENT_KEY, storable

pytestmark = [pytest.mark.timeout(120)]


def document(rps: float):
    data = {"upstreams": {"u": {"base_url": "http://127.0.0.1:9"}},
            "pools": {"p": {"keys": [{"id": "k1", "secret": "env:K1", "rps": rps}]}}}
    return storable(data, source="test.toml", pushed_at=time.time())


async def wait_for(predicate, timeout: float = 20.0) -> None:
    with anyio.fail_after(timeout):
        while not predicate():
            await anyio.sleep(0.05)


@pytest.mark.anyio
async def test_follower_applies_in_order_skips_invalid_and_retries_a_failed_apply(nats_server):
    nc = await nats.connect(nats_server.url)
    js, subjects = nc.jetstream(), Subjects()
    applied: list[tuple[int, float]] = []
    failures = {"left": 1}

    async def apply(revision, config):
        if revision == 4 and failures["left"]:
            failures["left"] -= 1
            raise ConnectionError("NATS away")
        applied.append((revision, config.keys()["k1"].rps))

    follower = ConfigFollower(js, subjects, apply, poll_s=0.2, role="test")
    try:
        async with anyio.create_task_group() as tg:
            tg.start_soon(follower.run)
            assert (await push_config(js, subjects, document(5)))[0] == 1
            await wait_for(lambda: follower.revision == 1)
            kv = await open_config_bucket(js, subjects)
            bad = document(6).model_copy(update={"config": {"pools": {"p": {"keys": [{"id": "k1", "rps": -1}]}}}})
            assert await kv.put(CURRENT_KEY, bad.model_dump_json().encode()) == 2
            assert (await push_config(js, subjects, document(7)))[0] == 3
            await wait_for(lambda: follower.revision == 3)
            assert (await push_config(js, subjects, document(8)))[0] == 4
            await wait_for(lambda: follower.revision == 4)  # its first apply failed: offered again
            tg.cancel_scope.cancel()
    finally:
        await nc.close()
    assert applied == [(1, 5.0), (3, 7.0), (4, 8.0)]


async def _follow(nats_server, script, poll=None):
    """Run a follower (poll_s 0.2; `poll` wraps its poll) beside `script(js, subjects,
    follower, applied)`; returns the (revision, k1's rps) it applied, in order."""
    nc = await nats.connect(nats_server.url)
    js, subjects = nc.jetstream(), Subjects()
    applied: list[tuple[int, float]] = []

    async def apply(revision, config):
        applied.append((revision, config.keys()["k1"].rps))

    follower = ConfigFollower(js, subjects, apply, poll_s=0.2, role="test")
    if poll is not None:
        follower._poll = poll(follower._poll)
    try:
        async with anyio.create_task_group() as tg:
            tg.start_soon(follower.run)
            await script(js, subjects, follower, applied)
            tg.cancel_scope.cancel()
    finally:
        await nc.close()
    return applied


@pytest.mark.anyio
async def test_follower_follows_a_config_bucket_made_anew(nats_server):
    """NATS lost its store and the fleet made the bucket again (runtime/streams.py Rebuilder):
    its revisions start over at 1, and a push there is applied, not taken for an old revision."""
    async def script(js, subjects, follower, applied):
        for rps in (5, 6, 7):
            await push_config(js, subjects, document(rps))
        await wait_for(lambda: follower.revision == 3)
        await js.delete_key_value(subjects.config_bucket)
        await anyio.sleep(1.1)  # (stream creation times are compared; a new one differs)
        assert (await push_config(js, subjects, document(9)))[0] == 1  # into the bucket made anew
        await wait_for(lambda: applied[-1] == (1, 9.0))
        assert (await push_config(js, subjects, document(10)))[0] == 2
        await wait_for(lambda: applied[-1] == (2, 10.0))

    applied = await _follow(nats_server, script)
    assert (3, 7.0) in applied and applied[-2:] == [(1, 9.0), (2, 10.0)]


@pytest.mark.anyio
async def test_the_same_revision_number_in_a_bucket_made_anew_is_applied(nats_server):
    """One push, the bucket lost, the config pushed again as the error log says: revision 1
    again, with other content (a reviewer's repro: it was dropped as already seen)."""
    async def script(js, subjects, follower, applied):
        await push_config(js, subjects, document(5))
        await wait_for(lambda: follower.revision == 1)
        await js.delete_key_value(subjects.config_bucket)
        await anyio.sleep(1.1)
        assert (await push_config(js, subjects, document(9)))[0] == 1
        await wait_for(lambda: applied[-1] == (1, 9.0))

    assert (await _follow(nats_server, script))[-1] == (1, 9.0)


@pytest.mark.anyio
async def test_a_bucket_made_anew_while_the_watch_restarted_is_followed(nats_server):
    """The watch restarts (a poll failed while NATS was away) after the bucket was made anew
    empty: the new bucket is noticed then, not only when a lower revision comes (a reviewer's
    repro: revision 1 was never applied)."""
    fail = {"n": 0}

    def failing(real_poll):
        async def poll(kv):
            if fail["n"]:
                fail["n"] -= 1
                raise TimeoutError("NATS away")
            await real_poll(kv)
        return poll

    async def script(js, subjects, follower, applied):
        for rps in (5, 6, 7):
            await push_config(js, subjects, document(rps))
        await wait_for(lambda: follower.revision == 3)
        await js.delete_key_value(subjects.config_bucket)
        await anyio.sleep(1.1)
        await open_config_bucket(js, subjects)  # made anew, empty (as the Rebuilder does)
        fail["n"] = 1
        await anyio.sleep(2.5)  # the follower watches the new, empty bucket again
        assert (await push_config(js, subjects, document(9)))[0] == 1
        await wait_for(lambda: applied[-1] == (1, 9.0))

    assert (await _follow(nats_server, script, poll=failing))[-1] == (1, 9.0)
