"""The leader lease's bookkeeping (dispatcher/shell/lease.py) over a fake KV: how long the
lease is surely ours (0.8 of the TTL after a renewal began), taking it, losing it at a renewal,
and the epoch (bucket creation time, revision). tests/e2e run the lease over nats-server."""

from __future__ import annotations

import time
from datetime import UTC, datetime
from types import SimpleNamespace

import nats.errors
import pytest
from nats.js.errors import KeyNotFoundError, KeyWrongLastSequenceError

from ratefleet.dispatcher.shell.lease import LEASE_KEY, LeaderLease

pytestmark = pytest.mark.anyio


class Kv:
    def __init__(self, taken: bool = False) -> None:
        self.taken, self.revision, self.calls = taken, 6, []

    async def create(self, key, value):
        self.calls.append(("create", key, value))
        if self.taken:
            raise KeyWrongLastSequenceError()
        return self.revision

    async def update(self, key, value, last):
        self.calls.append(("update", key, value, last))
        if last != self.revision:
            raise KeyWrongLastSequenceError()
        self.revision += 1
        return self.revision


class Js:
    async def stream_info(self, name):
        assert name == "KV_leader"
        return SimpleNamespace(created=datetime.fromtimestamp(1_700_000_000.5, UTC))


def lease(kv: Kv) -> LeaderLease:
    held = LeaderLease(Js(), "leader", "d-1", ttl_s=10.0)
    held.kv = kv
    return held


async def test_taking_the_lease_sets_the_epoch_and_how_long_it_is_surely_ours():
    held = lease(Kv())
    assert not held.held and held.held_until == float("-inf")
    before = time.monotonic()
    assert await held.try_acquire()
    assert held.kv.calls == [("create", LEASE_KEY, b"d-1")]
    assert held.held and held.revision == 6 and held.epoch == (1_700_000_000_500, 6)
    assert before + 8.0 <= held.held_until <= time.monotonic() + 8.0


async def test_a_taken_lease_is_not_ours():
    held = lease(Kv(taken=True))
    assert not await held.try_acquire()
    assert not held.held and held.epoch == (0, 0)


async def test_a_renewal_extends_from_when_it_began_and_a_lost_one_ends_the_lease():
    held = lease(Kv())
    await held.try_acquire()
    held.renewed_at -= 9.0  # past 0.8 of the TTL: no longer surely ours
    assert not held.held
    started = time.monotonic()
    assert await held.renew()
    assert held.revision == 7 and held.held and started <= held.renewed_at <= time.monotonic()
    held.kv.revision = 99  # another dispatcher wrote it
    assert not await held.renew()
    assert held.revision is None and not held.held and held.held_until == float("-inf")


async def test_a_renewal_writes_this_dispatchers_name_under_the_lease_key():
    held = lease(Kv())
    await held.try_acquire()
    assert await held.renew()
    assert held.kv.calls[-1] == ("update", LEASE_KEY, b"d-1", 6)


class JsAway:
    async def stream_info(self, name):
        raise ConnectionError("away")


async def test_without_the_buckets_creation_time_the_epoch_still_orders_by_revision():
    held = LeaderLease(JsAway(), "leader", "d-1", ttl_s=10.0)
    held.kv = Kv()
    assert await held.try_acquire()
    assert held.epoch == (0, 6)  # an int, so workers can still compare it with other leaders' epochs


class SeenKv:
    """The `<bucket>_seen` KV: `answer` is what its get does (an entry, or an exception raised)."""

    def __init__(self, answer) -> None:
        self.answer = answer

    async def get(self, key):
        assert key == LEASE_KEY
        if isinstance(self.answer, BaseException):
            raise self.answer
        return self.answer


async def test_when_a_leader_last_held_the_lease_is_read_and_an_unreadable_time_counts_as_just_now():
    """No answer is not "never": a new leader that took it so started with full buckets right
    after the old one had spent them (a burst over the keys' limits at a failover)."""
    held = lease(Kv())
    held.seen_kv = SeenKv(SimpleNamespace(value=b"1700000000.5"))
    assert await held.last_leader_seen() == 1700000000.5
    held.seen_kv = SeenKv(KeyNotFoundError())
    assert await held.last_leader_seen() is None  # never held: full buckets
    held.seen_kv = SeenKv(nats.errors.TimeoutError())
    before = time.time()
    assert before <= await held.last_leader_seen() <= time.time()  # not known: empty buckets
