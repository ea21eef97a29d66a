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
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, Field

from ratefleet.schemas.outcome import OutcomeKind, RateLimitInfo

Epoch = tuple[int, int]


class Assignment(BaseModel):
    id: str
    job: dict[str, Any]
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
    # a 401/403 ("denied") on this key ends the job as a request error: it was refused on
    # another key already, or no other key could take it; else it is tried on another key
    denial_final: bool = True
    rate_limited: int = 0  # earlier deliveries answered 429 (not attempts)
    max_rate_limited: int = 50  # the job ends `rate_limited` at this many
    variant: str | None = None  # A/B routing: "control" or "split" when the tier has a split


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
