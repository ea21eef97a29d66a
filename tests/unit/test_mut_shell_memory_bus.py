"""The in-memory LeaderBus (dispatcher/shell/memory_bus.py) the leader shell's fast tests run
on: its lookups and key records behave like the real bus's, or those tests prove nothing."""

from __future__ import annotations

import pytest

from ratefleet.dispatcher.shell.bus import PayloadTooLarge
from ratefleet.dispatcher.shell.memory_bus import MemoryBus
from ratefleet.runtime.handbacks import DeliveryCounts

pytestmark = pytest.mark.anyio


async def test_delivery_counts_are_those_recorded_for_that_message():
    bus = MemoryBus(counts={5: DeliveryCounts(handbacks=2, rate_limited=1)})
    assert await bus.delivery_counts(5) == DeliveryCounts(handbacks=2, rate_limited=1)
    assert await bus.delivery_counts(6) == DeliveryCounts()


async def test_a_key_record_saved_as_none_is_deleted_and_only_that_one():
    bus = MemoryBus(keys={"k1": {"by": "operator"}, "k2": {"by": "provider"}})
    assert await bus.save_key("k1", None)
    assert bus.keys == {"k2": {"by": "provider"}}
    assert await bus.save_key("k3", None)  # none to delete: fine
    assert await bus.load_keys() == {"k2": {"by": "provider"}}


async def test_publish_takes_exactly_max_payload_and_delivers_reply_and_headers():
    bus = MemoryBus(max_payload=4)
    got: list = []

    async def handler(msg):
        got.append(msg)

    await bus.subscribe("s", handler)
    await bus.publish("s", b"1234", headers={"traceparent": "tp"})
    await bus.publish("s", b"ab", reply="r.1")
    assert bus.published == [("s", b"1234", ""), ("s", b"ab", "r.1")]
    assert [(m.data, m.reply, m.headers) for m in got] == [(b"1234", "", {"traceparent": "tp"}), (b"ab", "r.1", None)]
    with pytest.raises(PayloadTooLarge):
        await bus.publish("s", b"12345")
    assert len(bus.published) == 2
