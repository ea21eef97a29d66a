"""Sending one dispatch pass's assignments to one worker: in one message (schemas/internal.py).

The leader's state machine makes an `Assign` command per job; the session (leader.py) groups
a pass's commands by worker and hands each group here. They go out as ONE message on the
worker's assign subject (a JSON array; a group of one as the bare Assignment), split only
where the array would pass the server's `max_payload`. Each job keeps its own trace context:
its `traceparent`/`tracestate` (from `dispatch_spans`) lead its entry of the array.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from contextlib import ExitStack

from ratefleet.dispatcher.core.commands import Assign
from ratefleet.dispatcher.core.events import AssignFailed
from ratefleet.dispatcher.shell.bus import LeaderBus, PayloadTooLarge
from ratefleet.dispatcher.shell.job_spans import dispatch_spans
from ratefleet.runtime.tracing import TRACEPARENT, TRACESTATE
from ratefleet.schemas.errors import NatsUnavailable
from ratefleet.schemas.internal import batch_payload


def traced(payload: bytes, headers: Mapping[str, str]) -> bytes:
    """`payload` (one assignment's JSON object, sent without trace fields: core/handout.py
    `assignment_payload`) with the job's `traceparent` and `tracestate` as its first fields."""
    traceparent = headers.get(TRACEPARENT)
    if not traceparent:
        return payload
    head = b'{"traceparent":' + json.dumps(traceparent).encode()
    tracestate = headers.get(TRACESTATE)
    if tracestate:
        head += b',"tracestate":' + json.dumps(tracestate).encode()
    return head + b"," + payload[1:]


def runs(items: Sequence[bytes], max_payload: int) -> list[tuple[int, int]]:
    """Consecutive (start, end) index runs of `items` whose `batch_payload` fits in
    `max_payload` bytes; an item too large even alone is a run of its own."""
    out: list[tuple[int, int]] = []
    start, size = 0, 1  # an array of n items: 2 brackets + the items + n - 1 commas
    for index, item in enumerate(items):
        if index > start and size + len(item) + 1 > max_payload:
            out.append((start, index))
            start, size = index, 1
        size += len(item) + 1
    if items:
        out.append((start, len(items)))
    return out


async def send_assignments(bus: LeaderBus, subject: str,
                           commands: Sequence[Assign]) -> tuple[list[AssignFailed], Exception | None]:
    """Publish `commands` (all for the worker of `subject`). Returns the `AssignFailed`
    events for the assignments not sent (too large alone: that job ends; NATS away: every
    one not yet sent) and the NATS error that stopped the sending (None if none), which
    ends the session. Each job's `dispatched` span spans the publish and records that error.

    Nothing is sent while the connection is down (`bus.connected`): nats-py would buffer the
    assignments and send them all the moment it reconnects, so their calls would start together,
    spending at once what the key's bucket had spread over the outage (an operator's trial: 6
    calls on a key with burst 2 within 11 ms of a nats-server restart, 2-4 x 429 in 3 of 4 runs).
    They count as not sent, and the session ends as for any NATS failure."""
    failed: list[AssignFailed] = []
    if not bus.connected:
        return [_lost(c) for c in commands], NatsUnavailable("the NATS connection is down: assignments not sent")
    try:
        with ExitStack() as spans:
            items = [traced(c.payload, spans.enter_context(dispatch_spans(c))) for c in commands]
            for start, end in runs(items, bus.max_payload):
                try:
                    failed += await _publish(bus, subject, items[start:end], commands[start:end])
                except Exception:
                    failed += [_lost(c) for c in commands[start:]]
                    raise
    except Exception as exc:  # noqa: BLE001 - NATS away: returned for the session to end
        return failed, exc
    return failed, None


async def _publish(bus: LeaderBus, subject: str, items: Sequence[bytes],
                   commands: Sequence[Assign]) -> list[AssignFailed]:
    payload = batch_payload(items)
    try:
        await bus.publish(subject, payload)
    except PayloadTooLarge:
        if len(items) == 1:
            return [AssignFailed(commands[0].assignment, commands[0].incoming, True, len(payload))]
        failed: list[AssignFailed] = []  # the server's limit is below what we were told: one by one
        for item, command in zip(items, commands, strict=True):
            failed += await _publish(bus, subject, [item], [command])
        return failed
    return []


def _lost(command: Assign) -> AssignFailed:
    return AssignFailed(command.assignment, command.incoming, False)
