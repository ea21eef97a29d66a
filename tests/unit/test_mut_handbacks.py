"""Hand-back accounting (ratefleet/runtime/handbacks.py) over an in-memory KV bucket:
each kind of delivery bumps only its own number, the record comes before the nak, a
failing or hanging bucket costs at most TIMEOUT_S and is opened again on the next call,
and a malformed entry reads as zeros (the safe side: deliveries count as attempts).
Deterministic, no server.
"""

from __future__ import annotations

from types import SimpleNamespace

import anyio
import pytest
from nats.js.errors import KeyNotFoundError

import ratefleet.runtime.handbacks as handbacks_module
from ratefleet.runtime.handbacks import DeliveryCounts, Handbacks

pytestmark = pytest.mark.anyio
BUCKET = "ratefleet_handbacks"
ACK = "$JS.ACK.RATEFLEET_JOBS.d.1.7.7.0.1"


class MemoryKV:
    def __init__(self, log: list, entries: dict[str, bytes] | None = None, hang: bool = False):
        self.log, self.entries, self.hang = log, dict(entries or {}), hang

    async def get(self, key):
        if self.hang:
            await anyio.sleep_forever()
        if key not in self.entries:
            raise KeyNotFoundError
        return SimpleNamespace(value=self.entries[key])

    async def put(self, key, value):
        self.log.append(("put", key, value))
        self.entries[key] = value


class FakeJetStream:
    """`key_value` fails `failures` times (the bucket is away), then serves `kv`."""

    def __init__(self, kv: MemoryKV, failures: int = 0):
        self.kv, self.failures, self.opened = kv, failures, []

    async def key_value(self, bucket):
        self.opened.append(bucket)
        if self.failures:
            self.failures -= 1
            raise ConnectionError("bucket away")
        return self.kv


class FakeFinisher:
    def __init__(self, log: list):
        self.log = log

    async def nak(self, ack, delay_s=0.0):
        self.log.append(("nak", ack, delay_s))


def setup(entries: dict[str, bytes] | None = None, failures: int = 0, hang: bool = False):
    log: list = []
    kv = MemoryKV(log, entries, hang)
    js = FakeJetStream(kv, failures)
    return Handbacks(js, BUCKET), kv, js, log


async def test_each_kind_of_delivery_bumps_only_its_own_number():
    handbacks, kv, js, _ = setup({"s7": b"2 5"})
    await handbacks.add(7)
    assert kv.entries["s7"] == b"3 5"
    await handbacks.add(7, rate_limited=True)
    assert kv.entries["s7"] == b"3 6"
    assert await handbacks.counts(7) == DeliveryCounts(handbacks=3, rate_limited=6)
    assert await handbacks.count(7) == 3
    assert js.opened == [BUCKET]


async def test_a_first_handback_and_a_first_429_start_from_zero():
    handbacks, kv, _, _ = setup()
    await handbacks.add(1)
    await handbacks.add(2, rate_limited=True)
    assert kv.entries == {"s1": b"1", "s2": b"0 1"}
    assert await handbacks.counts(3) == DeliveryCounts()


async def test_no_stream_sequence_records_nothing():
    handbacks, kv, js, _ = setup()
    await handbacks.add(0)
    await handbacks.add(-3, rate_limited=True)
    assert kv.entries == {} and js.opened == []


async def test_hand_back_records_before_the_nak():
    handbacks, _, _, log = setup()
    finisher = FakeFinisher(log)
    await handbacks.hand_back(9, finisher, ACK, 1.5)
    await handbacks.rate_limited(9, finisher, ACK, 30.0)
    assert log == [("put", "s9", b"1"), ("nak", ACK, 1.5), ("put", "s9", b"1 1"), ("nak", ACK, 30.0)]


async def test_a_bucket_that_fails_is_opened_again_on_the_next_call():
    handbacks, kv, js, _ = setup({"s4": b"2"}, failures=1)
    assert await handbacks.counts(4) == DeliveryCounts()  # unknown: the safe side
    assert await handbacks.counts(4) == DeliveryCounts(handbacks=2)
    assert js.opened == [BUCKET, BUCKET]

    handbacks, kv, js, _ = setup({"s4": b"2"}, failures=1)
    await handbacks.add(4)  # lost: it counts as an attempt
    await handbacks.add(4)
    assert kv.entries["s4"] == b"3"


async def test_a_hanging_bucket_costs_at_most_the_timeout(monkeypatch):
    monkeypatch.setattr(handbacks_module, "TIMEOUT_S", 0.05)
    handbacks, kv, _, _ = setup({"s5": b"1"}, hang=True)
    with anyio.fail_after(5):
        assert await handbacks.counts(5) == DeliveryCounts()
        await handbacks.add(5)
    assert kv.entries == {"s5": b"1"}


@pytest.mark.parametrize("value, counts", [
    (b"", DeliveryCounts()), (None, DeliveryCounts()), (b"4", DeliveryCounts(4, 0)),
    (b"4 9", DeliveryCounts(4, 9)), (b"-2 -1", DeliveryCounts(0, 0)),
])
def test_parse_reads_both_forms(value, counts):
    assert DeliveryCounts.parse(value) == counts
    assert DeliveryCounts.parse(counts.encode()) == counts


async def test_a_malformed_entry_reads_as_zeros():
    handbacks, _, _, _ = setup({"s1": b"1 2 3", "s2": b"x"})
    assert await handbacks.counts(1) == DeliveryCounts()
    assert await handbacks.counts(2) == DeliveryCounts()
    with pytest.raises(ValueError):
        DeliveryCounts.parse(b"1 2 3")
