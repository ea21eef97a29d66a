"""Turning a JOBS message into a schedulable job, or into its `invalid` result.

Everything a job could do wrong is caught here, before any key is chosen: bytes that are
not JSON, schema violations, unknown upstreams, forbidden targets, expired deadlines,
redelivery past its attempts, and poison messages that keep coming back.
"""

from __future__ import annotations

from datetime import UTC, datetime

from nats.aio.msg import Msg

from ratefleet.dispatcher.core.delivery import Incoming, Refused
from ratefleet.runtime.store import MSG_ID, REPEAT_HEADER, REPLY_HEADER
from ratefleet.runtime.streams import tier_max_deliver
from ratefleet.runtime.tracing import TRACEPARENT, TRACESTATE, fresh_traceparent, trace_headers
from ratefleet.schemas import Config, ErrorCode, Job, JobRejected, parse_job
from ratefleet.schemas.job import UpstreamRoutes, job_size_limit, upstream_problem
from ratefleet.schemas.result import expired_before_call
from ratefleet.schemas.subjects import is_safe_reply, is_token


def read_message(msg: Msg, tier: str, config: Config, handbacks: int = 0, rate_limited: int = 0,
                 max_payload: int | None = None) -> Incoming | Refused:
    """`handbacks`: earlier deliveries that ended without a call; `rate_limited`: earlier
    deliveries answered 429. Neither are attempts, and 429s do not count toward the poison
    limit (the consumer's max_deliver leaves room for them, see `tier_max_deliver`).
    `max_payload`: the NATS server's (bytes), which bounds a job too (`job_size_limit`)."""
    meta = msg.metadata
    headers = msg.headers or {}
    reply_to = headers.get(REPLY_HEADER)
    header_id = headers.get(MSG_ID)
    fallback_id = header_id if header_id and is_token(header_id) else f"s{meta.sequence.stream}"
    deliveries = meta.num_delivered
    attempt = max(1, deliveries - handbacks - rate_limited)
    bad_reply = reply_to is not None and not is_safe_reply(reply_to, config.nats.prefix)
    if bad_reply:
        reply_to = None

    def refuse(status: str, code: ErrorCode, message: str, job_id: str | None = None,
               batch: str | None = None, job: Job | None = None) -> Refused:
        return Refused(status, code, message, job_id or fallback_id, batch, tier, msg.reply, reply_to, attempt,
                       msg.data, job)

    try:
        job = _parse(msg.data, config, max_payload)
    except JobRejected as exc:
        return refuse("invalid", exc.code, exc.message, exc.job_id, exc.batch)
    job_id = job.id or fallback_id
    if deliveries - rate_limited >= config.streams.max_deliver or deliveries >= tier_max_deliver(config, tier):
        return refuse("failed", ErrorCode.POISON_MESSAGE,
                      f"delivered {deliveries} times without finishing ({rate_limited} answered 429; "
                      "streams.max_deliver); moved to dead letters", job_id, job.batch, job)
    if bad_reply:
        return refuse("invalid", ErrorCode.FORBIDDEN_TARGET,
                      f"{REPLY_HEADER} must be an inbox subject, not a system, API or ratefleet subject",
                      job_id, job.batch, job)
    problem = _check_against_config(job, config)
    if problem is not None:
        return refuse("invalid", problem[0], problem[1], job_id, job.batch, job)
    max_attempts = job.max_attempts or config.tiers[tier].max_attempts
    max_rate_limited = config.tiers[tier].max_rate_limited
    if rate_limited >= max_rate_limited:
        return refuse("failed", ErrorCode.RATE_LIMITED,
                      f"answered 429 {rate_limited} times (tiers.{tier}.max_rate_limited = {max_rate_limited})",
                      job_id, job.batch, job)
    if attempt > max_attempts:
        return refuse("failed", ErrorCode.ATTEMPTS_EXHAUSTED,
                      # the count the Result's `attempts` gives (calls_before: the deliveries before this one); it
                      # said "2 attempts, more than max_attempts=1" beside `"attempts": 1` (an operations trial)
                      f"delivered again after {attempt - 1} attempts, max_attempts={max_attempts} (the last ones ended "
                      "without a stored Result: a worker stopped mid-call or could not reach NATS to store the Result, "
                      "or a leader holding the job was killed before handing it out; such a delivery counts, as the "
                      "README's attempts rule says)",
                      job_id, job.batch, job)
    if job.expired(datetime.now(UTC)):
        return refuse("expired", ErrorCode.DEADLINE_EXCEEDED, expired_before_call(attempt, rate_limited),
                      job_id, job.batch, job)
    upstream = job.upstream or config.implicit_upstream()
    trace = trace_headers(headers)  # else a fresh trace, the same for every delivery of this message
    traceparent = trace.get(TRACEPARENT) or fresh_traceparent(job_id, meta.sequence.stream, meta.timestamp.timestamp())
    return Incoming(job=job if job.id else job.model_copy(update={"id": job_id}), job_id=job_id, tier=tier,
                    upstream=upstream, ack=msg.reply, reply_to=reply_to, attempt=attempt,
                    max_attempts=max_attempts, submitted_at=meta.timestamp.timestamp(),
                    stream_seq=meta.sequence.stream, rate_limited=rate_limited, max_rate_limited=max_rate_limited,
                    traceparent=traceparent, tracestate=trace.get(TRACESTATE), repeat=headers.get(REPEAT_HEADER) == "1")


def validate_job(raw: bytes, config: Config, max_payload: int | None = None) -> Job:
    """The one validation every door applies to a payload (intake, rpc): the Job model
    (schemas/job.py, schemas/wire.py), its size (`job_size_limit` of the server's
    `max_payload`) and this fleet's config (upstream, auth header).
    Raises JobRejected with the code and reason, whatever the bytes are: a failure of the
    validation itself is the payload's fault too (it is deterministic in the bytes)."""
    job = _parse(raw, config, max_payload)
    problem = _check_against_config(job, config)
    if problem is not None:
        raise JobRejected(problem[0], problem[1], job_id=job.id, batch=job.batch)
    return job


def _parse(raw: bytes, config: Config, max_payload: int | None = None) -> Job:
    limit, source = job_size_limit(config.streams.max_job_bytes, max_payload)
    try:
        return parse_job(raw, max_bytes=limit, limit_source=source)
    except JobRejected:
        raise
    except Exception as exc:  # noqa: BLE001 - see validate_job; never let one payload stop intake
        raise JobRejected(ErrorCode.INVALID_JOB, f"job could not be read ({type(exc).__name__})") from None


def unreadable(msg: Msg, tier: str, error: BaseException) -> Refused:
    """A message intake failed on in an unforeseen way: ended as `invalid` on this delivery
    (a redelivery would fail the same way), under its Nats-Msg-Id or `s<stream sequence>`."""
    header_id = (msg.headers or {}).get(MSG_ID)
    job_id = header_id if header_id and is_token(header_id) else f"s{msg.metadata.sequence.stream}"
    return Refused("invalid", ErrorCode.INVALID_JOB, f"job could not be read ({type(error).__name__})", job_id,
                   None, tier, msg.reply, None, 1, msg.data)


_upstreams_of: tuple[Config | None, UpstreamRoutes] = (None, UpstreamRoutes({}))  # the last config's, built once per config


def _check_against_config(job: Job, config: Config) -> tuple[ErrorCode, str] | None:
    global _upstreams_of
    if _upstreams_of[0] is not config:
        _upstreams_of = (config, config.upstream_routes())
    return upstream_problem(job, _upstreams_of[1])
