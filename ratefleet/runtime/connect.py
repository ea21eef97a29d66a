"""Connecting to NATS: one place that sets reconnect policy and translates errors."""

from __future__ import annotations

import re

import nats
from nats.aio.client import Client as NatsClient

from ratefleet.runtime.logs import get_logger
from ratefleet.schemas.errors import NatsUnavailable

log = get_logger("ratefleet.nats")
_USERINFO = re.compile(r"(//)([^/@,\s]+)@")


def redact_url(url: str) -> str:
    """`url` with its credentials masked, for messages and logs: `nats://user:***@host:4222`,
    `nats://***@host:4222` (a token). Every URL of a comma-separated list is masked."""
    def mask(m: re.Match) -> str:
        user, _, password = m.group(2).partition(":")
        return f"{m.group(1)}{user}:***@" if password else f"{m.group(1)}***@"
    return _USERINFO.sub(mask, url)


async def connect(url: str, *, name: str, connect_timeout: float = 5.0, forever: bool = True) -> NatsClient:
    """Connect to `url`. Long-running roles reconnect forever; clients give up after ~30 s down."""

    if not forever:
        from ratefleet.runtime.embedded import port_answers

        if not any(port_answers(u.strip(), timeout=connect_timeout) for u in url.split(",")):
            raise NatsUnavailable(f"nothing answers at {redact_url(url)}; start NATS with `ratefleet up`, "
                                  "or pass --nats URL")
    holder: list[NatsClient] = []

    async def on_disconnect() -> None:
        if holder and (holder[0].is_closed or holder[0].is_draining):
            return  # our own close
        log.warning("nats disconnected; reconnecting", url=redact_url(url))

    async def on_reconnect() -> None:
        log.info("nats reconnected", url=redact_url(url))

    async def on_error(exc: Exception) -> None:
        # also where exceptions escaping a subscription callback end up
        log.warning("nats error", error=type(exc).__name__, detail=str(exc)[:300])

    try:
        nc = await nats.connect(
            url, name=name, connect_timeout=connect_timeout, allow_reconnect=True,
            max_reconnect_attempts=-1 if forever else 60, reconnect_time_wait=0.5,
            disconnected_cb=on_disconnect, reconnected_cb=on_reconnect, error_cb=on_error,
            pending_size=64 * 1024 * 1024,
        )
    except Exception as exc:  # nats raises several unrelated types for "nobody there"
        raise NatsUnavailable(f"cannot reach NATS at {redact_url(url)} ({type(exc).__name__}: {exc}); "
                              "start one with `ratefleet up`, or pass --nats URL") from None
    holder.append(nc)
    return nc
