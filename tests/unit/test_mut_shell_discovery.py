"""Presence of the fleet's dispatchers (dispatcher/shell/discovery.py `Peers`): beats kept per
dispatcher, listed sorted with role and probe URL, forgotten after `forget_after_s`, and a
beat that is not one ignored."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from ratefleet.dispatcher.shell import discovery
from ratefleet.dispatcher.shell.discovery import Peers
from ratefleet.schemas.internal import DispatcherBeat

pytestmark = pytest.mark.anyio


def beat(dispatcher: str, leader: bool = False, http: str | None = None) -> SimpleNamespace:
    return SimpleNamespace(data=DispatcherBeat(dispatcher=dispatcher, leader=leader, http=http).model_dump_json().encode())


@pytest.fixture
def clock(monkeypatch) -> list[float]:
    """The presence book's monotonic clock, set by the test (seconds)."""
    now = [1000.0]
    monkeypatch.setattr(discovery, "time", SimpleNamespace(monotonic=lambda: now[0]))
    return now


async def test_peers_are_listed_sorted_with_their_role_and_forgotten_when_silent(clock):
    peers = Peers(forget_after_s=5.0)
    await peers.on_beat(beat("d-b", leader=True, http="http://b:9"))
    await peers.on_beat(beat("d-a"))
    await peers.on_beat(SimpleNamespace(data=b"not a beat"))
    listing = peers.listing()
    assert [(p["id"], p["leader"], p["http"]) for p in listing] == [("d-a", False, None), ("d-b", True, "http://b:9")]
    assert all(p["last_seen_s"] == 0.0 for p in listing)
    b, _ = peers.seen["d-b"]
    peers.seen["d-b"] = (b, clock[0] - 5.5)  # silent longer than forget_after_s
    assert [p["id"] for p in peers.listing()] == ["d-a"]
    assert "d-b" not in peers.seen
    a, _ = peers.seen["d-a"]
    peers.seen["d-a"] = (a, clock[0] - 4.0)  # within it: still listed, with its age
    assert peers.listing()[0]["last_seen_s"] == 4.0
    clock[0] += 1.0  # exactly forget_after_s: still listed
    assert peers.listing()[0]["last_seen_s"] == 5.0


async def test_a_peers_age_is_shown_in_seconds_to_the_hundredth(clock):
    peers = Peers(forget_after_s=5.0)
    await peers.on_beat(beat("d-a"))
    a, _ = peers.seen["d-a"]
    peers.seen["d-a"] = (a, clock[0] - 2.3456)
    age = peers.listing()[0]["last_seen_s"]
    assert isinstance(age, float) and age == 2.35
