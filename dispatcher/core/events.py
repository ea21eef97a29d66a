"""What happens to the leader: the inputs of its state machine (`leader.py`).

The shell turns NATS messages, lease renewals and timers into these values and hands them
to `LeaderMachine.handle(event, now)` one at a time, from one task. Each is a frozen
dataclass; times are monotonic seconds unless named `wall` (epoch seconds).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from ratefleet.schemas.internal import Heartbeat

from .delivery import Incoming, Refused
from .types import Outcome, SchedulerSpec


@dataclass(frozen=True)
class SessionStarted:
    """The session is subscribed. `key_records`: disabled keys persisted by earlier leaders
    (key id -> record as `Scheduler.key_record` wrote it, plus `saved_at`, epoch seconds);
    `wall`: epoch seconds now."""

    key_records: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)
    wall: float = 0.0


@dataclass(frozen=True)
class LeaseRenewed:
    """The lease was renewed: ours until `until` (monotonic seconds; the renewal's start
    plus 0.8 of its TTL, `LeaderLease.held`)."""

    until: float


@dataclass(frozen=True)
class LeaseLost:
    """The lease is not ours any more (a renewal found it taken or expired)."""


@dataclass(frozen=True)
class JobDelivered:
    """One delivery of a JOBS message on `tier`'s pull inbox.

    `delivered`: the server's delivery count (`num_delivered`); `verdict`: what intake made of
    it (with the hand-back and 429 counts of earlier deliveries; None: not read, because the
    leader steps down and it is not the last delivery); `stored`: the job's Result
    when one is stored already (looked up for redeliveries only); `wall`: epoch seconds at
    delivery (for the job's queue time); `cached`: `stored` is an answer-cache hit stored as
    the job's Result just now, not the Result of an earlier delivery; `unknown`: the
    redelivery's Result lookup got no answer (NATS away or slow), so whether the job has a
    Result already is not known; `looked_up_at`: when (monotonic seconds) that lookup was
    sent, None when there was none (a call of the job that ended after it may have stored a
    Result the lookup did not see)."""

    tier: str
    seq: int
    delivered: int
    ack: str
    verdict: Incoming | Refused | None
    stored: bytes | None = None
    wall: float = 0.0
    cached: bool = False
    unknown: bool = False
    looked_up_at: float | None = None


@dataclass(frozen=True)
class PullStatus:
    """A status message on a pull inbox (408 expired, 409 ended by the server, 404 no
    messages); `unfilled`: how many messages of that request will not come (0: all)."""

    tier: str
    status: str
    unfilled: int = 0
    description: str | None = None


@dataclass(frozen=True)
class HeartbeatReceived:
    """A worker's heartbeat (schemas/internal.py)."""

    beat: Heartbeat


@dataclass(frozen=True)
class OutcomeReported:
    """A worker's report of one assignment; `outcome.kind == OutcomeKind.NONE`: no call was made."""

    assignment: str
    key_id: str
    outcome: Outcome


@dataclass(frozen=True)
class KeyCommand:
    """An operator request on `<prefix>.admin.keys` (keycontrol.py); `request` is the parsed
    JSON, or None when it could not be parsed (`error` names why); `reply`: the inbox."""

    request: Any
    reply: str
    error: str | None = None


@dataclass(frozen=True)
class AssignFailed:
    """An Assign command could not be published. `too_large`: the server refused the payload
    (the job's fault, it alone ends); else NATS is away (the session ends)."""

    assignment: str
    incoming: Incoming
    too_large: bool
    size: int = 0


@dataclass(frozen=True)
class ConfigChanged:
    """A new fleet config revision (`revision`: its KV revision in the config bucket).
    `spec`: the scheduler's new spec; `windows`/`max_deliver`: per tier, as in LeaderSettings.
    The shell has already made a pull inbox for every tier it names."""

    revision: int
    spec: SchedulerSpec
    windows: Mapping[str, int]
    max_deliver: Mapping[str, int]


@dataclass(frozen=True)
class Tick:
    """Time passed (the shell's timer, at `LeaderMachine.wake_at()` or sooner)."""


@dataclass(frozen=True)
class StepDown:
    """Leadership ends (lease lost, shutdown): stop pulling, hand back what is held."""


@dataclass(frozen=True)
class BatchCancelled:
    """`ratefleet cancel --batch B` (ratefleet/runtime/cancels.py): the held jobs of `batch`
    not yet handed out end here, uncalled."""

    batch: str


Event = (SessionStarted | LeaseRenewed | LeaseLost | JobDelivered | PullStatus | HeartbeatReceived | OutcomeReported
         | KeyCommand | AssignFailed | ConfigChanged | Tick | StepDown | BatchCancelled)
