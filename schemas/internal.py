"""The dispatcher/worker protocol on `<prefix>.internal.>` (not part of the public contract).

dispatcher -> worker   Assignment     on internal.assign.<worker>   run this job on this key
worker -> dispatcher   OutcomeReport  on internal.outcome           what happened, per call
worker -> dispatcher   Heartbeat      on internal.heartbeat         alive, slots, calls in flight
dispatcher -> all      DispatcherBeat on internal.dispatcher        alive, leader or standby, probe URL
dispatcher -> workers  LeaderAnnounce on internal.leader            the leader and its fencing epoch

Every leadership has an epoch that only grows: (creation time of the lease bucket in ms,
KV revision at which the lease was taken). Workers drop an assignment whose epoch is below
the highest they have seen, so a leader that was paused (VM pause, SIGSTOP) and wakes up
with assignments still in its send buffer cannot make a second call for a job its
successor already dispatched.

Batches: a message on internal.assign.<worker> or internal.outcome holds either ONE object
(an Assignment, an OutcomeReport) or a JSON array of them (`batch_payload`): the leader
sends every assignment a worker gets in one dispatch pass in one message, and a worker sends
the reports that end within one event-loop iteration together. Readers take both forms
(`read_assignments`, `read_reports`); a batch of one is sent as the bare object. Leader and
workers must run the same version (an older reader drops an array as malformed).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any, Literal, TypeVar

from pydantic import BaseModel, Field, PrivateAttr, TypeAdapter, ValidationError

from ratefleet.schemas.job import Job, job_from_text
from ratefleet.schemas.outcome import OutcomeKind, RateLimitInfo

Epoch = tuple[int, int]


UNLISTED_LOST_S = 2.0  # the leader returns an assignment older than this that two heartbeats in a row do not list


class Assignment(BaseModel):
    """Run job `job_id` on key `key_id`. The job travels as `job_json`, its JSON text exactly
    as the dispatcher validated it (the worker validates it once, straight from the text:
    `job_model`), or, from an older dispatcher, as the object `job`. `traceparent`/`tracestate`:
    the job's W3C trace context for the worker's span (an older dispatcher sent them as NATS
    headers of a one-assignment message)."""

    id: str
    job: dict[str, Any] = Field(default_factory=dict)
    job_json: str | None = None
    job_id: str
    tier: str
    upstream: str
    key_id: str
    pool: str
    ack: str  # reply subject of the JOBS message: any connection may ack/nak it
    reply_to: str | None = None
    attempt: int
    max_attempts: int
    submitted_at: float  # epoch seconds, the JOBS message timestamp
    queued_ms: float
    epoch: Epoch = (0, 0)  # the leadership that issued it (see the module docstring)
    seq: int = 0  # stream sequence of the JOBS message (for ratefleet/runtime/handbacks.py)
    # a 401/403 or a model's 404 ("denied") on this key ends the job as a request error: it was refused on
    # another key already, or no other key could take it; else it is tried on another key
    denial_final: bool = True
    rate_limited: int = 0  # earlier deliveries answered 429 (not attempts)
    max_rate_limited: int = 50  # the job ends `rate_limited` at this many
    variant: str | None = None  # A/B routing: "control" or "split" when the tier has a split
    traceparent: str | None = None
    tracestate: str | None = None
    # seconds since the leader last processed this worker's heartbeat, when it handed this out: it gives
    # a worker up after worker_timeout_s of silence, so a held assignment may be given away although it
    # arrives less than worker_timeout_s late (its worker's heartbeats stopped before it was sent)
    silent_s: float = 0.0
    _job: Job | None = PrivateAttr(default=None)

    def job_model(self) -> Job:
        """The job, validated once (then remembered). Raises pydantic's ValidationError
        (a subclass of ValueError) for a job that breaks a rule of schemas/job.py."""
        if self._job is None:
            self._job = job_from_text(self.job_json) if self.job_json is not None else Job.model_validate(self.job)
        return self._job

    def job_data(self) -> dict[str, Any]:
        """The job as a JSON object (for dead letters and checks made before validation):
        the validated job's fields when it was validated, else its raw JSON ({} when that is
        not a JSON object)."""
        if self._job is not None:
            return self._job.model_dump(mode="json", by_alias=True, exclude_none=True)
        if self.job_json is None:
            return self.job
        try:
            data = json.loads(self.job_json)
        except (ValueError, RecursionError):
            return {}
        return data if isinstance(data, dict) else {}


class LeaderAnnounce(BaseModel):
    leader: str
    epoch: Epoch
    config_revision: int | None = None  # the fleet config revision the leader runs (None: its local file)


class OutcomeReport(BaseModel):
    """What one assignment came to, sent by the worker after the job is finished or sent
    back (`terminal`: whether it ended). `kind`, `ratelimit`: see schemas/outcome.py;
    `latency_ms`: the call's duration in milliseconds; `actual_cost`: in the pool's cost unit."""

    assignment: str
    worker: str
    key_id: str
    job_id: str
    kind: OutcomeKind  # the JSON values of OutcomeKind; "none": no call was made (expired, invalid, secret missing)
    status: int | None = None
    retry_after_s: float | None = None
    ratelimit: RateLimitInfo | None = None  # a JSON object with RateLimitInfo's fields
    actual_cost: float | None = None
    latency_ms: float | None = None
    terminal: bool = True
    code: str | None = None  # the provider's error code/type from the answer, e.g. "invalid_api_key"
    # a 429's scope: "key" (no room), "request" (this request alone), None (no evidence)
    scope: Literal["key", "request"] | None = None


class InFlight(BaseModel):
    assignment: str
    key_id: str
    job_id: str


class Heartbeat(BaseModel):
    worker: str
    slots: int
    in_flight: list[InFlight] = Field(default_factory=list)
    draining: bool = False
    pid: int | None = None
    host: str | None = None
    started_at: float | None = None
    calls: int = 0
    # key id -> why this worker cannot call with it ("LOCAL_KEY_1 not set"); never the value
    unusable_keys: dict[str, str] = Field(default_factory=dict)
    config_revision: int | None = None  # the fleet config revision the worker runs (None: its local file)
    http: str | None = None  # URL of the worker's /metrics and probes (`--http`), None without


class DispatcherBeat(BaseModel):
    """A dispatcher's presence, every heartbeat_s: `status` lists the dispatchers heard
    lately with their probe URL (`http`, None without `--http`)."""

    dispatcher: str
    leader: bool = False
    http: str | None = None


_ASSIGNMENTS = TypeAdapter(list[Assignment])
_REPORTS = TypeAdapter(list[OutcomeReport])


def batch_payload(items: Sequence[bytes]) -> bytes:
    """One message for `items` (each the JSON of one object): the bare object when there is
    one, else a JSON array of them."""
    return items[0] if len(items) == 1 else b"[" + b",".join(items) + b"]"


def read_assignments(data: bytes) -> list[Assignment]:
    """The assignments in one message (one object or an array, see the module docstring).
    A malformed entry of an array is skipped; raises ValueError when none can be read (an
    empty array is no error: it gives [])."""
    return _read(data, Assignment, _ASSIGNMENTS)


def read_reports(data: bytes) -> list[OutcomeReport]:
    """The outcome reports in one message (one object or an array); a malformed entry of an
    array is skipped; raises ValueError when none can be read (an empty array is no error:
    it gives [])."""
    return _read(data, OutcomeReport, _REPORTS)


_Model = TypeVar("_Model", Assignment, OutcomeReport)


def _read(data: bytes, model: type[_Model], many: TypeAdapter[list[_Model]]) -> list[_Model]:
    if data.lstrip()[:1] != b"[":
        return [model.model_validate_json(data)]
    try:
        return many.validate_json(data)
    except ValidationError:  # one bad entry: keep the others
        entries = json.loads(data)
    good: list[_Model] = []
    for entry in entries:
        try:
            good.append(model.model_validate(entry))
        except ValidationError:
            continue
    if not good:
        raise ValueError("no readable entry in the batch")
    return good
