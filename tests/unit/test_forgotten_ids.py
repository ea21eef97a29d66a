"""dispatcher/shell/forgotten.py: which first deliveries may repeat a done job whose id a
restarted NATS server forgot. Fakes for the connection, the stream info and the KV bucket."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from ratefleet.dispatcher.shell.forgotten import ForgottenIds

pytestmark = [pytest.mark.anyio, pytest.mark.timeout(30)]
T0 = 1_000_000.0
WINDOW = 600.0


class FakeKV:
    def __init__(self) -> None:
        self.values: dict[str, bytes] = {}

    async def get(self, key: str):
        if key not in self.values:
            raise KeyError(key)
        return SimpleNamespace(value=self.values[key])

    async def create(self, key: str, value: bytes) -> None:
        if key in self.values:
            raise ValueError("exists")
        self.values[key] = value


def forgotten(server_id: str, results: int, kv: FakeKV, now: float = T0) -> ForgottenIds:
    nc = SimpleNamespace(_server_info={"server_id": server_id})

    class JS:
        async def stream_info(self, name):
            return SimpleNamespace(state=SimpleNamespace(messages=results))

    async def open_seen():
        return kv

    return ForgottenIds(nc, JS(), "RESULTS", open_seen, WINDOW, clock=lambda: now)


async def test_a_server_met_with_results_stored_opens_the_dedup_window():
    guard = forgotten("S1", results=10, kv=FakeKV())
    assert await guard.may_repeat(T0 + 1)
    assert await guard.may_repeat(T0 + WINDOW - 1)
    assert not await guard.may_repeat(T0 + WINDOW + 1)  # past the window JetStream would not dedup either


async def test_a_fresh_store_without_results_costs_no_lookups():
    assert not await forgotten("S1", results=0, kv=FakeKV()).may_repeat(T0 + 1)


async def test_a_later_dispatcher_takes_the_first_ones_deadline_not_a_window_of_its_own():
    kv = FakeKV()
    await forgotten("S1", results=10, kv=kv).may_repeat(T0)
    later = forgotten("S1", results=10, kv=kv, now=T0 + 500)  # a failover 500 s later
    assert await later.may_repeat(T0 + 550)
    assert not await later.may_repeat(T0 + WINDOW + 1)


async def test_a_new_incarnation_of_the_server_opens_a_new_window():
    kv = FakeKV()
    guard = forgotten("S1", results=10, kv=kv)
    assert not await guard.may_repeat(T0 + WINDOW + 100)
    guard.nc._server_info = {"server_id": "S2"}  # restarted (a new server_id), met 700 s later
    guard.clock = lambda: T0 + 700
    assert await guard.may_repeat(T0 + 700 + 5)


async def test_when_nats_cannot_say_every_first_delivery_of_the_window_is_looked_up():
    async def broken():
        raise ConnectionError("away")

    guard = ForgottenIds(SimpleNamespace(_server_info={"server_id": "S1"}), None, "RESULTS", broken, WINDOW,
                         clock=lambda: T0)
    assert await guard.may_repeat(T0 + 1)


async def test_deliveries_read_while_a_new_incarnation_is_being_met_wait_for_its_window():
    # the tiers' pull inboxes (and the lookup tasks) ask at once after a NATS restart: the one
    # asking while the first still met the new server got the old, closed window and its job,
    # a done one resent with its id, was called again (paid twice)
    import asyncio

    kv = FakeKV()
    guard = forgotten("S1", results=10, kv=kv)
    kv.values["server-S1"] = b"0"  # met long ago: its window closed
    assert await guard.may_repeat(T0 + 1) is False
    slow = asyncio.Event()
    opened = guard.open_seen

    async def open_seen():
        await slow.wait()  # the KV answers after a round trip
        return await opened()

    guard.open_seen = open_seen
    guard.nc._server_info = {"server_id": "S2"}  # restarted: a new incarnation
    first = asyncio.ensure_future(guard.may_repeat(T0 + 1))
    second = asyncio.ensure_future(guard.may_repeat(T0 + 2))  # another tier's first delivery
    await asyncio.sleep(0)
    slow.set()
    assert await first and await second
