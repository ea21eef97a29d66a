"""A role stopped while NATS is away exits as stopped, not as failed: nats-py's drain raises
ConnectionReconnectingError then (an operator's trial: SIGTERM to a dispatcher during a NATS
outage ended with exit 1 and "NATS did not answer")."""

from __future__ import annotations

import pytest
from nats.errors import ConnectionReconnectingError

from ratefleet.roles import _run_body

pytestmark = pytest.mark.anyio


class AwayConnection:
    """A stand-in nats-py client whose server is away: drain raises, close works."""

    def __init__(self) -> None:
        self.closed = False

    async def drain(self) -> None:
        raise ConnectionReconnectingError

    async def close(self) -> None:
        self.closed = True


async def test_a_stop_with_nats_away_ends_quietly_and_closes_the_connection():
    nc = AwayConnection()

    async def body(nc, stop):
        return None  # stopped as asked

    await _run_body(nc, body)
    assert nc.closed


async def test_a_role_that_failed_still_fails_when_nats_is_away():
    nc = AwayConnection()

    async def body(nc, stop):
        raise RuntimeError("the role's own failure")

    with pytest.raises(BaseExceptionGroup) as failed:  # (raised out of the role's task group)
        await _run_body(nc, body)
    assert failed.value.subgroup(lambda e: isinstance(e, RuntimeError) and "own failure" in str(e)) is not None
