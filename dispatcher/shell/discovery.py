"""How the fleet's dispatchers are found: a NATS micro service, and presence beats.

NATS micro (https://github.com/nats-io/nats-architecture-and-design/blob/main/adr/ADR-32.md,
nats-py `nats.micro`): every dispatcher serves its request/reply subjects as endpoints of
the service `ratefleet`, so it answers `$SRV.PING`, `$SRV.INFO` and `$SRV.STATS` (also
`$SRV.<VERB>.ratefleet` and `$SRV.<VERB>.ratefleet.<id>`) and `nats micro ls` lists it:

    endpoint  subject              queue group        what
    rpc       <prefix>.rpc.*       ratefleet-rpc      a Job in, its Result as the reply (rpc.py)
    status    <prefix>.admin.status ratefleet-status  the fleet's status JSON

The service metadata carries the dispatcher id, the subject prefix and the probe URL
(`http`, empty without `--http`). STATS counts requests, errors and processing time per
endpoint.

Presence: each dispatcher publishes a `DispatcherBeat` every `heartbeat_s` and keeps the
beats of the others, so any dispatcher answering `status` lists them all with their role
and probe URL.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable
from importlib.metadata import PackageNotFoundError, version
from typing import Any

from nats import micro
from nats.aio.client import Client as NatsClient
from nats.aio.msg import Msg
from nats.micro.request import Request
from nats.micro.service import Service

from ratefleet.schemas import Subjects
from ratefleet.schemas.internal import DispatcherBeat

SERVICE_NAME = "ratefleet"
MsgHandler = Callable[[Msg], Awaitable[None]]


def _version() -> str:
    try:
        return version("ratefleet")
    except PackageNotFoundError:
        return "0.0.0"


def _on_msg(handler: MsgHandler) -> Callable[[Request], Awaitable[None]]:
    # nats.micro hands a Request; the rpc handler needs the message itself: its reply
    # subject travels with the job and the worker that finishes it answers there later
    async def endpoint(request: Request) -> None:
        await handler(request._msg)

    return endpoint


async def start_service(nc: NatsClient, subjects: Subjects, dispatcher_id: str, http: str | None,
                        rpc: MsgHandler, status: MsgHandler) -> Service:
    """The dispatcher's micro service with its `rpc` and `status` endpoints (queue groups
    shared by every dispatcher, as before). Stop it with `await service.stop()`."""
    service = await micro.add_service(
        nc, name=SERVICE_NAME, version=_version(),
        description="ratefleet dispatcher: jobs over request/reply and the fleet's status",
        metadata={"dispatcher": dispatcher_id, "prefix": subjects.prefix, "http": http or ""})
    await service.add_endpoint(name="rpc", subject=subjects.rpc("*"), queue_group="ratefleet-rpc", handler=_on_msg(rpc))
    await service.add_endpoint(name="status", subject=subjects.admin_status, queue_group="ratefleet-status",
                               handler=_on_msg(status))
    return service


class Peers:
    """The dispatchers heard lately (this one included, once its first beat is back)."""

    def __init__(self, forget_after_s: float) -> None:
        self.forget_after_s = forget_after_s
        self.seen: dict[str, tuple[DispatcherBeat, float]] = {}

    async def on_beat(self, msg: Msg) -> None:
        try:
            beat = DispatcherBeat.model_validate_json(msg.data)
        except ValueError:
            return
        self.seen[beat.dispatcher] = (beat, time.monotonic())

    def listing(self) -> list[dict[str, Any]]:
        """[{"id", "leader", "http", "last_seen_s"}] of the dispatchers heard within `forget_after_s`."""
        now = time.monotonic()
        for dispatcher_id, (_, at) in list(self.seen.items()):
            if now - at > self.forget_after_s:
                del self.seen[dispatcher_id]
        return [{"id": beat.dispatcher, "leader": beat.leader, "http": beat.http, "last_seen_s": round(now - at, 2)}
                for beat, at in sorted(self.seen.values(), key=lambda entry: entry[0].dispatcher)]
