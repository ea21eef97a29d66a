"""Requests timing out together ask the fleet why once, not once each: the leader answers about
200 status requests a second (measured on a trial fleet: 1,000 at once took 5 s and 446 went
unanswered), and 1,000 user requests timing out at the same moment (the fleet already slow)
sent it 1,000. Now one status answer serves every request of the Client timing out within
WHY_SHARED_S of it; a later timeout asks again."""

from __future__ import annotations

import asyncio
import json
from types import SimpleNamespace

import pytest

from ratefleet.client import Client

pytestmark = pytest.mark.anyio


class StatusNats:
    is_connected = True
    is_closed = is_draining = False

    def __init__(self) -> None:
        self.asked = 0

    def jetstream(self):
        return SimpleNamespace()

    async def request(self, subject, payload, timeout):
        self.asked += 1
        await asyncio.sleep(0.05)  # the leader's answer takes a moment
        return SimpleNamespace(data=json.dumps({"leader": "d1", "workers": {}}).encode())


async def test_concurrent_timeouts_share_one_status_request():
    nc = StatusNats()
    client = Client(nc)  # type: ignore[arg-type]
    answers = await asyncio.gather(*(client._why_unrun() for _ in range(1000)))
    assert nc.asked == 1  # before: 1,000
    assert {reason for reason, _ in answers} == {"no_worker"}


async def test_a_timeout_later_than_the_shared_window_asks_again(monkeypatch):
    import ratefleet.client_request as client_module

    nc = StatusNats()
    client = Client(nc)  # type: ignore[arg-type]
    await client._why_unrun()
    assert client_module.WHY_SHARED_S > 0
    monkeypatch.setattr(client_module, "WHY_SHARED_S", 0.0)  # the window over: as if WHY_SHARED_S passed
    await client._why_unrun()
    assert nc.asked == 2
