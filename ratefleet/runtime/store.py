"""Writing to the streams: jobs (with dedup), results (once per job, forever), dead letters."""

from __future__ import annotations

import asyncio
import base64
import json
import time
import weakref
from asyncio import CancelledError, current_task  # (tests replace this module's `asyncio` with a fake clock)
from collections.abc import Awaitable, Callable, Mapping
from typing import Any, TypeVar

import nats.errors
from nats.js import JetStreamContext
from nats.js.api import PubAck
from nats.js.errors import APIError, NoStreamResponseError, NotFoundError, ServiceUnavailableError

from ratefleet.runtime.logs import get_logger
from ratefleet.runtime.streams import stream_gone
from ratefleet.runtime.tracing import current_headers
from ratefleet.schemas import Result, Subjects
from ratefleet.schemas.errors import NatsUnavailable, QueueFull, ResultNotStored, SubmitError, UnknownTier
from ratefleet.schemas.job import FORBIDDEN_HEADERS, normalised_header_name
from ratefleet.schemas.wire import dumps_safe

REPLY_HEADER = "Ratefleet-Reply-To"
# "1" on a JOBS message that may repeat a job id stored earlier past the dedup window (a job with the
# caller's own id, a resumed batch): the leader looks up its Result and its other copies before a call
REPEAT_HEADER = "Ratefleet-Repeat"
MSG_ID = "Nats-Msg-Id"
# JSStreamStoreFailedErrF, the server's generic "message could not be stored": "maximum messages
# per subject exceeded" (the job has its Result) but also "maximum messages/bytes exceeded",
# a full disk... so a 10077 is only "already stored" once the Result is seen in the stream
STORE_FAILED = 10077
STORE_ATTEMPTS = 4

log = get_logger("ratefleet.store")


T = TypeVar("T")
READ_RETRY_S = 5.0  # seconds a Result lookup asks again while NATS does not answer (read_result)
TRANSIENT = (TimeoutError, asyncio.TimeoutError, nats.errors.ConnectionClosedError, nats.errors.NoRespondersError,
             nats.errors.ConnectionReconnectingError, nats.errors.OutboundBufferLimitError, ServiceUnavailableError,
             NoStreamResponseError)


async def retrying(operation: Callable[[], Awaitable[T]], *, for_s: float,
                   permanent: Callable[[BaseException], Awaitable[bool]] | None = None,
                   gone: Callable[[], Awaitable[Any]] | None = None) -> T:
    """Run `operation`, retrying transient NATS failures (a restart, a reconnect) for `for_s`;
    a closed connection (ConnectionClosedError) is raised at once, as it never reopens.
    With `gone`, a stream or bucket found missing (`streams.stream_gone`: NATS restarting, or
    it lost its store) is retried too, `gone()` awaited first (e.g. a Rebuilder's rebuild).

    Safe for publishes that carry a `Nats-Msg-Id`: a retry of a publish that did land is a
    duplicate the stream drops.
    """
    deadline = time.monotonic() + for_s
    delay = 0.1
    while True:
        try:
            return await operation()
        except Exception as exc:
            healing = gone is not None and stream_gone(exc)
            if isinstance(exc, nats.errors.ConnectionClosedError):
                raise  # closed (by its owner, or it gave up reconnecting): a closed connection never reopens
            if not healing and (not isinstance(exc, TRANSIENT) or (isinstance(exc, APIError) and exc.err_code is not None)):
                raise  # not NATS away, or the server refused (queue full, already stored): retrying cannot help
            if time.monotonic() + delay > deadline or (permanent is not None and await permanent(exc)):
                raise
            if gone is not None and healing:
                await gone()
            await asyncio.sleep(delay)
            delay = min(2.0, delay * 2)


# connection -> the tasks awaiting a PubAck on it (True once a reconnect interrupted the wait)
_ACK_WAITS: weakref.WeakKeyDictionary[Any, dict[asyncio.Task, bool]] = weakref.WeakKeyDictionary()


def interrupt_ack_waits(nc: Any) -> int:
    """On a reconnect of `nc` (runtime/connect.py calls it): end every `publish_or_reconnect`
    waiting for a PubAck on it, which then raises TimeoutError (so `retrying` sends it again
    with the same id); returns how many."""
    waits = _ACK_WAITS.get(nc)
    for task, interrupted in list((waits or {}).items()):
        if not interrupted:
            waits[task] = True  # type: ignore[index]
            task.cancel()
    return len(waits or ())


async def publish_or_reconnect(js: JetStreamContext, subject: str, payload: bytes, *, headers: dict[str, str],
                               timeout: float) -> PubAck:
    """`js.publish`, given up (TimeoutError, so `retrying` sends it again with the same id)
    as soon as the connection reconnects while it waits for the ack. The ack of a publish
    sent before a reconnect never comes (it was routed through the server that went away):
    a worker storing a Result as its server stopped waited the whole `timeout` (10 s) and a
    vip request waiting for that Result timed out; a job's submit waited 5 s.

    The reconnect callback cancels the waiting task (`interrupt_ack_waits`), so a publish costs
    a dict entry, not a watcher task per ack (which cost 14 µs per publish, about 4 % of a
    worker's CPU per job). A cancellation of the task by anyone else still propagates."""
    nc = getattr(js, "_nc", None)
    task = current_task()
    try:
        waits = _ACK_WAITS.setdefault(nc, {})
    except TypeError:  # not a connection we can watch (no weak reference): a plain publish
        return await js.publish(subject, payload, headers=headers, timeout=timeout)
    waits[task] = False  # type: ignore[index]
    try:
        return await js.publish(subject, payload, headers=headers, timeout=timeout)
    except CancelledError:
        if waits.get(task) and task is not None and task.uncancel() == 0:  # ours alone
            raise TimeoutError("NATS reconnected while this publish waited for its ack") from None
        raise
    finally:
        waits.pop(task, None)  # type: ignore[arg-type]


def subject_matches(pattern: str, subject: str) -> bool:
    """Whether NATS subject `subject` falls under `pattern` (`*`: one token, `>`: the rest)."""
    want, have = pattern.split("."), subject.split(".")
    for i, token in enumerate(want):
        if token == ">":
            return len(have) > i
        if i >= len(have) or (token != "*" and token != have[i]):
            return False
    return len(want) == len(have)


def _is_full(error: APIError) -> bool:
    text = (error.description or "").lower()
    return "maximum messages" in text or "maximum bytes" in text


async def publish_job(js: JetStreamContext, subjects: Subjects, tier: str, job_id: str, payload: bytes,
                      *, reply_to: str | None = None, timeout: float = 5.0, retry_for: float = 30.0,
                      trace: Mapping[str, str] | None = None, repeat: bool = False) -> bool:
    """Store one job durably. Returns False when it was a duplicate inside the dedup window.

    Rides out a NATS restart or reconnect for `retry_for` seconds (same id, so no duplicate).
    `trace`: the job's `traceparent`/`tracestate` headers; None: the current context's
    (runtime/tracing.py). `repeat`: the id may have been stored before, longer ago than the
    dedup window (REPEAT_HEADER: the leader then calls it only if it has no Result and no
    other message of the same id is held or being called).
    """
    ack = await publish_job_ack(js, subjects, tier, job_id, payload, reply_to=reply_to, timeout=timeout,
                                retry_for=retry_for, trace=trace, repeat=repeat)
    return not ack.duplicate


async def publish_job_ack(js: JetStreamContext, subjects: Subjects, tier: str, job_id: str, payload: bytes,
                          *, reply_to: str | None = None, timeout: float = 5.0, retry_for: float = 30.0,
                          trace: Mapping[str, str] | None = None, repeat: bool = False) -> PubAck:
    """`publish_job`, returning JetStream's acknowledgement (`duplicate`, and `seq`: for a
    duplicate, the sequence of the message stored first)."""
    headers = {**(current_headers() if trace is None else trace), MSG_ID: job_id}
    if reply_to:
        headers[REPLY_HEADER] = reply_to
    if repeat:
        headers[REPEAT_HEADER] = "1"

    missing_stream = unknown = False
    known: list[str] = []  # the tiers the JOBS stream takes, for the UnknownTier message

    async def unknown_tier(exc: BaseException) -> bool:
        """No stream answered: a tier that does not exist, or no streams at all (both final),
        or JetStream still starting after a restart (retry)."""
        nonlocal missing_stream, unknown
        if not isinstance(exc, NoStreamResponseError):
            return False
        try:
            info = await js.stream_info(subjects.jobs_stream)
        except NotFoundError:
            missing_stream = True
            return True
        except Exception:  # noqa: BLE001 - the server is not ready yet: retry
            return False
        # the stream takes this tier: it had no leader for a moment (a cluster server stopping
        # or restarting moves it), so no stream answered; retry. Else the tier is unknown.
        taken = getattr(getattr(info, "config", None), "subjects", None) or []
        unknown = not any(subject_matches(pattern, subjects.jobs(tier)) for pattern in taken)
        known[:] = [pattern.removeprefix(subjects.jobs("")) for pattern in taken if pattern.startswith(subjects.jobs(""))]
        return unknown

    try:
        ack = await retrying(lambda: publish_or_reconnect(js, subjects.jobs(tier), payload, headers=headers,
                                                          timeout=timeout),
                             for_s=retry_for, permanent=unknown_tier)
    except APIError as exc:
        if _is_full(exc):
            raise QueueFull(f"the job queue is full ({exc.description}); job {job_id} was NOT stored. "
                            "Retry later, or raise streams.jobs_max_msgs / jobs_max_bytes") from None
        raise SubmitError(f"job {job_id} was not stored: {exc.description}") from None
    except NoStreamResponseError:
        if missing_stream:
            raise SubmitError(f"stream {subjects.jobs_stream} does not exist on this NATS server; start "
                              "`ratefleet up` or a dispatcher once to create the streams") from None
        if unknown:
            raise UnknownTier(f"no stream takes {subjects.jobs(tier)}: unknown tier {tier!r}; the fleet's tiers: "
                              f"{', '.join(known) or 'none'} (tiers are configured in [tiers])") from None
        # retried to the end with no answer: JetStream off or not ready, or the stream leaderless
        raise SubmitError(f"no JetStream stream answered for {subjects.jobs(tier)} for {retry_for:.0f}s (JetStream "
                          f"not enabled on this NATS server, or {subjects.jobs_stream} without a leader); job {job_id} "
                          "was NOT stored. Retry later; resubmitting with the same id is safe") from None
    except nats.errors.ConnectionClosedError:
        raise NatsUnavailable(f"the connection to NATS is closed, so job {job_id} could not be stored (if its "
                              "publish was under way as it closed, it may be stored: resubmitting it with the same "
                              "id on a new connection is safe)") from None
    except TRANSIENT as exc:
        connected = getattr(getattr(js, "_nc", None), "is_connected", False) is True
        why = (f"NATS is connected, but JetStream did not acknowledge it: overloaded, or unable to store into "
               f"{subjects.jobs_stream} (the NATS server's log then says why, e.g. 'JetStream failed to store a msg')."
               if connected and isinstance(exc, TimeoutError) else "Is the NATS server up?")
        raise SubmitError(f"NATS did not confirm job {job_id} for {retry_for:g}s ({type(exc).__name__}); it may or "
                          f"may not be stored. {why} Resubmitting with the same id is safe") from None
    return ack


async def store_result(js: JetStreamContext, subjects: Subjects, result: Result, *, timeout: float = 10.0,
                       payload: bytes | None = None, attempts: int = STORE_ATTEMPTS, pause_s: float = 0.5,
                       gone: Callable[[], Awaitable[Any]] | None = None) -> bool:
    """Store the terminal Result (`payload`: its JSON when the caller has it already).

    True when newly stored, False when the job already had one (dedup, or error 10077 with
    a Result for the job confirmed in the stream). A dedup hit on a Result of the same job id
    under another batch (an id reused across batches: the JOBS dedup entry that would have
    stopped the call was lost in a NATS restart) stores this one too, under msg id
    `<job id>@<batch>`, so the batch that waits for it gets it. A 10077 without one is a refusal: the
    store is tried `attempts` times in all, `pause_s * n` seconds apart, then
    ResultNotStored is raised so the caller leaves the job un-acked (it is delivered again).
    `gone()`: awaited each time no stream takes the publish (NATS restarting, or it lost the
    stream), e.g. to create the stream anew (`retrying`).
    """
    subject = subjects.results(result.batch, result.job_id)

    payload = payload if payload is not None else result.to_json()
    refusal = ""

    sends = 0  # publishes of this Result: more than one when a send's ack was lost (a reconnect, a timeout)

    async def send(msg_id: str) -> Any:
        nonlocal sends
        sends += 1
        return await publish_or_reconnect(js, subject, payload, headers={MSG_ID: msg_id}, timeout=timeout)

    def publish(msg_id: str) -> Awaitable[Any]:
        return retrying(lambda: send(msg_id), for_s=120.0, gone=gone)

    for attempt in range(1, attempts + 1):
        try:
            ack = await publish(result.job_id)
            if ack.duplicate:
                existing = await read_result(js, subjects, result.job_id, result.batch)
                if sends > 1 and existing == payload:
                    return True  # this very Result sent again: the earlier send landed, its ack lost in a reconnect
                if existing is None:
                    # the id's Result inside the dedup window is another batch's: this job reuses
                    # the id, and was called (a NATS restart forgot the JOBS message's dedup entry)
                    log.warning("job id already has a Result in another batch; stored under this batch too",
                                job_id=result.job_id, batch=result.batch)
                    ack = await publish(f"{result.job_id}@{result.batch or ''}")
            return not ack.duplicate
        except APIError as exc:
            if exc.err_code != STORE_FAILED:
                raise
            if await read_result(js, subjects, result.job_id, result.batch) is not None:
                return False  # the one-result-per-subject limit: the job has its Result
            refusal = exc.description or "message could not be stored"
            log.warning("results stream refused a result and holds none for the job; storing again",
                        job_id=result.job_id, refusal=refusal, attempt=attempt, of=attempts)
        if attempt < attempts:
            await asyncio.sleep(pause_s * attempt)
    log.error("result NOT stored; the job stays un-acked and is delivered again", job_id=result.job_id,
              refusal=refusal, stream=subjects.results_stream)
    raise ResultNotStored(f"{subjects.results_stream} refused the Result of job {result.job_id} {attempts} times "
                          f"({refusal}) and holds none for it; check the stream's limits and the server's disk")


async def read_result(js: JetStreamContext, subjects: Subjects, job_id: str, batch: str | None = "*", *,
                      retry_for: float = READ_RETRY_S) -> bytes | None:
    """The stored Result JSON of one job (any batch by default), or None when it has none:
    JetStream answered 404 (no message on the job's subject, or no RESULTS stream).

    A server that does not answer (restarting, a reconnect, a timeout: `TRANSIENT`) is asked
    again for `retry_for` seconds, then that error is raised. "No answer" is not "no Result":
    taken as one, a worker whose store was a dedup hit stored a second Result under
    `<job id>@<batch>`, a leader called a redelivered job whose Result was stored (paid twice),
    and `Client.request` sent again a job id that had its answer. Other errors are raised as
    they come."""
    async def get() -> Any:
        return await js.get_last_msg(subjects.results_stream, subjects.results(batch, job_id))

    try:
        msg = await retrying(get, for_s=retry_for)
    except NotFoundError:
        return None
    return msg.data


def redact_payload(raw: bytes, mask_headers: frozenset[str] = frozenset()) -> dict[str, Any]:
    """The raw payload for a dead letter, with auth-like header values masked: the names in
    FORBIDDEN_HEADERS and `mask_headers` (lower case: the upstreams' own auth headers)."""
    try:
        data = json.loads(raw)
    except (ValueError, UnicodeDecodeError, RecursionError):
        try:
            return {"raw": raw.decode("utf-8")}
        except UnicodeDecodeError:
            return {"raw_b64": base64.b64encode(raw).decode()}
    return {"payload": redact_job(data, mask_headers)}


def redact_job(data: Any, mask_headers: frozenset[str] = frozenset()) -> Any:
    """`data` (a job as JSON) with the values of auth-like request headers masked; `data`
    itself is left as it is (the job, its request and headers are copied when masked)."""
    request = data.get("request") if isinstance(data, dict) else None
    headers = request.get("headers") if isinstance(request, dict) else None
    if not isinstance(headers, dict):
        return data
    masked = {name: "***" if _auth_like(str(name), mask_headers) else value for name, value in headers.items()}
    if masked == headers:
        return data
    return {**data, "request": {**request, "headers": masked}}


def _auth_like(name: str, mask_headers: frozenset[str]) -> bool:
    normalised = normalised_header_name(name)
    return normalised in FORBIDDEN_HEADERS or normalised in mask_headers


LETTER_HEADROOM = 4096  # bytes kept free under max_payload for the message's headers and framing
LETTER_JOB_HEAD = 2048  # characters of an oversized job a dead letter still shows


async def dead_letter(js: JetStreamContext, subjects: Subjects, tier: str, *, code: str, message: str,
                      raw: bytes | None = None, job: dict | None = None, job_id: str | None = None,
                      attempts: int = 0, last_error: dict | None = None,
                      mask_headers: frozenset[str] = frozenset(), max_payload: int | None = None) -> None:
    """Record a dead letter with the reason, the payload (raw, redacted) or job, and attempts.

    Auth-like header values are masked (`redact_job`). A letter that would pass the server's
    `max_payload` (bytes) drops the last answer's body, then keeps only the head of the job
    (`job_omitted` says how large it was), so it is always stored."""
    letter: dict[str, Any] = {
        "job_id": job_id, "tier": tier, "reason": {"code": code, "message": message},
        "attempts": attempts, "last_error": last_error, "at": time.time(),
    }
    if job is not None:
        letter["job"] = redact_job(job, mask_headers)
    elif raw is not None:
        letter.update(redact_payload(raw, mask_headers))
    data = dumps_safe(letter)
    if max_payload is not None and len(data) > max_payload - LETTER_HEADROOM:
        data = dumps_safe(_shrunk(letter, max_payload - LETTER_HEADROOM))
    safe_tier = tier if tier and all(c.isalnum() or c in "_-" for c in tier) else "_"
    # dumps_safe: the payload may hold what JSON cannot (lone surrogates, NaN): never fail on it
    await js.publish(subjects.dead(safe_tier), data, timeout=10.0)


def _shrunk(letter: dict[str, Any], limit: int) -> dict[str, Any]:
    """`letter` made to fit `limit` bytes: first without the last answer's body, then with the
    job cut to its first LETTER_JOB_HEAD characters of JSON."""
    last = letter.get("last_error")
    if isinstance(last, dict) and any(last.get(f) is not None for f in ("json", "body", "body_b64")):
        letter = {**letter, "last_error": {**last, "json": None, "body": None, "body_b64": None,
                                           "body_omitted": "left out so that the dead letter fits in one message"}}
        if len(dumps_safe(letter)) <= limit:
            return letter
    shown = next((f for f in ("job", "payload", "raw", "raw_b64") if f in letter), None)
    if shown is None:
        return letter
    text = dumps_safe(letter[shown]).decode("utf-8", "replace")
    letter = {k: v for k, v in letter.items() if k != shown}
    letter["job_omitted"] = {"field": shown, "bytes": len(text.encode("utf-8", "replace")),
                             "why": "larger than the NATS server takes in one dead letter", "head": text[:LETTER_JOB_HEAD]}
    return letter
