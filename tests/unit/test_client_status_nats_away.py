"""`Client.status` while the NATS connection is down (reconnecting): the request never leaves,
times out, and the error blamed the dispatchers ('is `ratefleet dispatcher` running?'), which is
what `status --watch` showed an operator during a nats-server restart."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from ratefleet.client import Client
from ratefleet.schemas.errors import DispatcherUnavailable, NatsUnavailable

pytestmark = pytest.mark.anyio


class NC:
    is_closed = is_draining = False

    def __init__(self, connected: bool) -> None:
        self.is_connected = connected

    def jetstream(self):
        return SimpleNamespace()

    async def request(self, subject, payload, timeout):
        raise TimeoutError("nats: timeout")


async def test_status_says_nats_is_away_when_the_connection_is_down():
    with pytest.raises(NatsUnavailable, match="connection to NATS is lost"):
        await Client(NC(connected=False)).status(timeout=0.1)  # type: ignore[arg-type]
    with pytest.raises(DispatcherUnavailable, match="no dispatcher answered") as caught:
        await Client(NC(connected=True)).status(timeout=0.1)  # type: ignore[arg-type]
    # connected, no answer in time: NATS itself may be frozen, not only the dispatchers away (a trial's finding)
    assert "within 0.1s (TimeoutError)" in str(caught.value) and "NATS server may not be responding" in str(caught.value)
