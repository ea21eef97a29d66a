"""What the leader does: the outputs of its state machine (`leader.py`), carried out by the
shell in the order given. Each is a frozen dataclass; delays are seconds."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

from .delivery import Incoming, Refused


@dataclass(frozen=True)
class Assign:
    """Publish `payload` (an `Assignment`, JSON) to the worker's assign subject. If that
    fails, report `AssignFailed(assignment, incoming, ...)` back to the machine."""

    worker: str
    assignment: str
    payload: bytes
    incoming: Incoming
    key_id: str = ""  # the key and pool chosen (also in the payload), for the shell's dispatch span
    pool: str = ""


@dataclass(frozen=True)
class Pull:
    """Ask the tier's consumer for `batch` more messages into its pull inbox, expiring after
    `expires_s`."""

    tier: str
    batch: int
    expires_s: float


@dataclass(frozen=True)
class Nak:
    """Return a JOBS message to the queue (`ack`: its reply subject) after `delay_s`."""

    ack: str
    delay_s: float = 0.0


@dataclass(frozen=True)
class InProgress:
    """Keep a held JOBS message alive past ack_wait."""

    ack: str


@dataclass(frozen=True)
class HandBack:
    """Return a delivery that made no call: record the hand-back for stream sequence `seq`
    (ratefleet/runtime/handbacks.py), then nak it after `delay_s`."""

    seq: int
    ack: str
    delay_s: float


@dataclass(frozen=True)
class EndRefused:
    """Store the Result of a message that ends at intake, ack it, reply, dead-letter it
    (except `expired`): shell/refusals.py `finish_refused`."""

    refused: Refused


@dataclass(frozen=True)
class EndJob:
    """Store a `status` Result with error `code`/`message` for a held job the scheduler will
    not run, ack it, reply, dead-letter it: shell/refusals.py `refuse_incoming`."""

    incoming: Incoming
    code: str
    message: str
    status: str = "failed"


@dataclass(frozen=True)
class AnswerStored:
    """A redelivered job whose Result is stored: send it to `reply_to`, then ack."""

    stored: bytes
    ack: str
    reply_to: str | None


@dataclass(frozen=True)
class EndCopy:
    """A second JOBS message of a job whose first is held or being called (its id sent again
    past the dedup window): ack it without a call or a Result of its own; its `reply_to`
    gets the job's Result once the first message's call stores it."""

    incoming: Incoming


@dataclass(frozen=True)
class Announce:
    """Publish `payload` (a `LeaderAnnounce`, JSON) to the workers."""

    payload: bytes


@dataclass(frozen=True)
class SaveKey:
    """Persist a key's health record in the keys bucket (None: delete its entry)."""

    key_id: str
    record: Mapping[str, Any] | None


@dataclass(frozen=True)
class Respond:
    """Answer an operator request with `answer` (JSON). With `saves`, persist those first and
    set `answer["persisted"]` to whether all of them were."""

    reply: str
    answer: Mapping[str, Any]
    saves: tuple[SaveKey, ...] = ()


@dataclass(frozen=True)
class Linger:
    """Stepping down: keep handling events for `seconds` (late deliveries on open pull
    requests are handed back), then end."""

    seconds: float


@dataclass(frozen=True)
class Log:
    """A structured log line."""

    level: Literal["debug", "info", "warning", "error"]
    message: str
    fields: Mapping[str, Any] = field(default_factory=dict)


Command = (Assign | Pull | Nak | InProgress | HandBack | EndRefused | EndJob | AnswerStored | EndCopy | Announce
           | SaveKey | Respond | Linger | Log)
