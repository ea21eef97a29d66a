"""`<prefix>.rpc.<tier>`: request/reply for any NATS client.

The job is stored in RATEFLEET_JOBS first, with the caller's inbox in the
`Ratefleet-Reply-To` header; the worker that finishes it sends the Result there. A
payload that fails validation (the same as intake's, `validate_job`), or a tier that does not
exist, is answered with its `invalid` Result at once and nothing is stored (published without
a reply subject, its Result is stored and dead-lettered instead: `RpcResponder._refuse`). Every
dispatcher answers (queue group), leader or not, so submissions never wait for failover;
`handle` is the `rpc` endpoint of the dispatcher's NATS micro service (discovery.py).

A reply is a core-NATS message, so it must fit in the server's max_payload: a Result whose
body is larger than about 1 MiB is sent (and stored) with `response.body_ref` instead of the
body. The Python client fetches it by itself; any other client reads the object named there
from the Object Store (`nats object get <bucket> <name>`; see the README).
"""

from __future__ import annotations

import asyncio
import json
from typing import Any

from nats.aio.client import Client as NatsClient
from nats.aio.msg import Msg

from ratefleet.dispatcher.shell.intake import validate_job
from ratefleet.runtime.finish import Finisher, auth_headers
from ratefleet.runtime.logs import get_logger
from ratefleet.runtime.store import publish_job, read_result
from ratefleet.runtime.tracing import trace_headers
from ratefleet.schemas import Config, ErrorCode, ErrorInfo, JobRejected, Result, Subjects, parse_job
from ratefleet.schemas.errors import QueueFull, SubmitError
from ratefleet.schemas.job import new_job_id
from ratefleet.schemas.subjects import is_safe_reply, is_token

log = get_logger("ratefleet.rpc")

# a duplicate rpc request (its job id already running) is answered when the Result is stored:
# followed at most this long, at most this many at a time
DUPLICATE_FOLLOW_S = 600.0
MAX_DUPLICATE_FOLLOWERS = 1000  # job ids followed at a time
MAX_REPLIES_PER_JOB = 100  # requesters of one job id answered (a caller retrying every second: the last 100 s)
OWN_ID_LOOKUP_S = 2.0  # seconds an own id's Result lookup is retried before the request is refused
FALLBACK_READ_S = 5.0  # a followed job's store is read this often besides listening for its Result


def _with_id(raw: bytes) -> tuple[str, bytes]:
    """The job id from the payload, adding a fresh one to a JSON object that has none.

    Payloads that are not JSON objects get a fresh id: the id of their `invalid` Result.
    """
    try:
        data = json.loads(raw)
    except (ValueError, UnicodeDecodeError, RecursionError):
        return new_job_id(), raw
    if not isinstance(data, dict):
        return new_job_id(), raw
    job_id = data.get("id")
    if isinstance(job_id, str) and is_token(job_id):
        return job_id, raw
    if job_id is None:
        data["id"] = job_id = new_job_id()
        # compact UTF-8, as received: ensure_ascii would triple an emoji-heavy job (\ud83d\ude00)
        return job_id, json.dumps(data, ensure_ascii=False, separators=(",", ":")).encode("utf-8", "surrogatepass")
    return new_job_id(), raw


def _letter_payload(raw: bytes) -> dict:
    """The dead letter keeps the job when it is one (refused by config: replayable), else the raw bytes."""
    try:
        return {"job": parse_job(raw).model_dump(mode="json", by_alias=True)}
    except Exception:  # noqa: BLE001 - not a Job: the raw payload, redacted by the store
        return {"raw": raw}


class RpcResponder:
    def __init__(self, config: Config, nc: NatsClient):
        self.config, self.nc = config, nc
        self.js = nc.jetstream()
        self.subjects = Subjects(config.nats.prefix)
        self.finisher = Finisher(nc, self.js, self.subjects, auth_headers(config))
        self._followers: dict[str, asyncio.Task] = {}  # job id -> the task following its Result
        self._waiting: dict[str, list[str]] = {}  # job id -> the reply subjects its Result goes to

    async def handle(self, msg: Msg) -> None:
        if msg.reply and not is_safe_reply(msg.reply, self.config.nats.prefix):
            log.warning("rpc request with a forbidden reply subject dropped; nothing stored",
                        subject=msg.subject, reply=msg.reply[:80])
            return
        tier = self.subjects.tier_of(msg.subject)
        job_id, payload = _with_id(msg.data)
        if tier not in self.config.tiers:
            result = Result(job_id=job_id, status="invalid", tier=tier, error=ErrorInfo(
                code=ErrorCode.UNKNOWN_TIER, message=f"unknown tier {tier!r}; configured: {list(self.config.tiers)}"))
            await self._refuse(msg, result, "_", raw=msg.data)
            return
        try:
            validate_job(msg.data, self.config, self.nc.max_payload)
        except JobRejected as exc:  # refused at the door: nothing stored in JOBS
            result = Result(job_id=exc.job_id or job_id, status="invalid", tier=tier, batch=exc.batch,
                            error=ErrorInfo(code=exc.code, message=exc.message))
            await self._refuse(msg, result, tier, **_letter_payload(msg.data))
            return
        if payload is msg.data and msg.reply:  # the caller's own id (a fresh one was added otherwise)
            # an id whose rpc request was refused has its Result but no JOBS message to dedup
            # against: stored now, the job would be called (paid) and its answer dropped
            try:
                stored = await read_result(self.js, self.subjects, job_id, retry_for=OWN_ID_LOOKUP_S)
            except Exception as exc:  # noqa: BLE001 - not known whether it has one: storing it could pay twice
                log.warning("rpc job id's Result could not be looked up; nothing stored", job_id=job_id,
                            error=type(exc).__name__)
                refused = Result(job_id=job_id, status="failed", tier=tier, error=ErrorInfo(
                    code=ErrorCode.SUBMIT_FAILED, message=f"job {job_id} was not stored: whether it has a Result "
                    f"already could not be read ({type(exc).__name__}); send it again with the same id"))
                await self.nc.publish(msg.reply, refused.to_json())
                return
            if stored is not None:
                log.info("rpc job id has a Result already; answered with it, nothing stored", job_id=job_id)
                await self.nc.publish(msg.reply, stored)
                return
        try:
            fresh = await publish_job(self.js, self.subjects, tier, job_id, payload, reply_to=msg.reply or None,
                                      trace=trace_headers(msg.headers),  # the request's traceparent, if valid
                                      repeat=payload is msg.data)  # an own id may be resent past the dedup window
        except Exception as exc:  # noqa: BLE001 - any refusal is answered: the caller must not wait in vain
            code = ErrorCode.QUEUE_FULL if isinstance(exc, QueueFull) else ErrorCode.SUBMIT_FAILED
            reason = str(exc) if isinstance(exc, SubmitError) else f"job {job_id} was not stored ({type(exc).__name__})"
            log.warning("rpc job not stored", job_id=job_id, tier=tier, reason=reason)
            if msg.reply:
                refused = Result(job_id=job_id, status="failed", tier=tier, error=ErrorInfo(code=code, message=reason))
                await self.nc.publish(msg.reply, refused.to_json())
            return
        if not fresh and msg.reply:
            await self._answer_duplicate(job_id, msg.reply)

    async def _refuse(self, msg: Msg, result: Result, letter_tier: str, **letter: Any) -> None:
        """Answer a request refused at the door (`result`: `invalid`). A caller waiting on a reply
        subject gets it and nothing is stored, as `Client.request` (UnknownTier, JobInvalid) and
        the gateway (400) store nothing: its id stays free for the fixed request. Before, the
        `invalid` Result was stored and dead-lettered, and a break-it trial's retry on the right
        tier, with the same id, got the old `unknown_tier` Result for `results_max_age_s` (24 h)
        while the README said "nothing stored". A publish without a reply subject has no one to
        answer: its Result is stored and dead-lettered (`letter`: the dead letter's `job`/`raw`),
        the only way its producer learns of it (`ratefleet result ID`)."""
        if msg.reply:
            await self.nc.publish(msg.reply, result.to_json())
            if self.finisher.on_stored is not None:  # counted as a job ended at the door (/metrics), as a stored one
                self.finisher.on_stored(result)
            return
        if await self.finisher.finish(result, ack=None, reply_to=None):
            await self.finisher.dead(letter_tier, result, **letter)

    async def follow(self, job_id: str, reply: str) -> None:
        """Answer `reply` with the job's Result: at once when it is stored, else once it is
        (followed in the background for at most DUPLICATE_FOLLOW_S seconds)."""
        await self._answer_duplicate(job_id, reply)

    async def _answer_duplicate(self, job_id: str, reply: str) -> None:
        """A job id seen before: answer with its stored result when there already is one, else
        (the job still queued or running: its reply goes to the first requester only) follow
        the results stream in the background and answer once it is stored (a caller that
        retries with its idempotency key after a timeout must not wait in vain)."""
        stored = await self._read(job_id)
        if stored is not None:
            await self.nc.publish(reply, stored)
            return
        waiting = self._waiting.get(job_id)
        if waiting is not None:  # one follower per job id, however often a caller retries it
            if len(waiting) < MAX_REPLIES_PER_JOB:
                waiting.append(reply)
            return
        if len(self._followers) >= MAX_DUPLICATE_FOLLOWERS:
            log.warning("duplicate rpc job still running and too many duplicates followed already; "
                        "its result goes to the first requester", job_id=job_id)
            return
        self._waiting[job_id] = [reply]
        task = asyncio.create_task(self._answer_when_stored(job_id))
        self._followers[job_id] = task
        task.add_done_callback(lambda done: self._forget(job_id, done))

    async def _read(self, job_id: str) -> bytes | None:
        """The job's stored Result, None when it has none or NATS does not answer now (a
        follower reads again, and the first requester is answered by the job's worker)."""
        try:
            return await read_result(self.js, self.subjects, job_id, retry_for=FALLBACK_READ_S)
        except Exception as exc:  # noqa: BLE001 - see docstring
            log.info("rpc follower could not read a Result; reads again", job_id=job_id, error=type(exc).__name__)
            return None

    def _forget(self, job_id: str, task: asyncio.Task) -> None:
        if self._followers.get(job_id) is task:
            del self._followers[job_id]
            self._waiting.pop(job_id, None)

    async def _answer_when_stored(self, job_id: str) -> None:
        """Send the job's stored Result to each reply subject waiting for it once there, for at
        most DUPLICATE_FOLLOW_S. The Result's own publish is listened for (a core subscription
        on its subject, only while followed), so the answer leaves as the Result is stored; the
        store is read as well at the start (stored before the subscription) and every
        FALLBACK_READ_S (a publish missed while reconnecting)."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + DUPLICATE_FOLLOW_S
        try:
            sub = await self.nc.subscribe(self.subjects.results("*", job_id))
            try:
                stored = await self._read(job_id)
                while stored is None and loop.time() < deadline:
                    try:
                        msg = await sub.next_msg(timeout=max(0.01, min(FALLBACK_READ_S, deadline - loop.time())))
                    except TimeoutError:  # (nats.errors.TimeoutError is one)
                        stored = await self._read(job_id)
                        continue
                    # the stored one: a second Result of the job (refused by the stream) is seen here too
                    stored = await self._read(job_id) or msg.data
            finally:
                await sub.unsubscribe()
            if stored is None:
                log.info("duplicate rpc job has no result yet; stopped following it", job_id=job_id,
                         followed_s=DUPLICATE_FOLLOW_S)
                return
            for reply in self._waiting.pop(job_id, []):
                await self.nc.publish(reply, stored)
        except Exception as exc:  # noqa: BLE001 - closing, or NATS gone: the caller times out as before
            log.info("duplicate rpc job not answered", job_id=job_id, error=type(exc).__name__)
