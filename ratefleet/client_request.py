"""The Client's request side: `request` and its wait for the Result (a mixin of Client).

One job is stored with a reply subject and its Result awaited on the Client's reply inbox,
reading the stored Result too where the reply may be lost; after a timeout, one status request
(shared by the requests timing out together) says why the fleet could not run it.
"""

from __future__ import annotations

import asyncio
import json
import math
from datetime import UTC, datetime
from typing import Any

from nats.aio.client import Client as NatsClient
from nats.errors import NoRespondersError

from ratefleet.client_submit import JobLike, _being_cancelled, _has_own_id, checked_job
from ratefleet.runtime.bodies import BodyStore
from ratefleet.runtime.connect import denial_expected
from ratefleet.runtime.edge import translated
from ratefleet.runtime.replies import ReplyInbox
from ratefleet.runtime.store import READ_RETRY_S
from ratefleet.schemas import Job, Result, Subjects
from ratefleet.schemas.errors import NatsError, NatsUnavailable, RequestTimeout

WHY_TIMEOUT_S = 0.5  # the status request that says why a `request` timed out
WHY_SHARED_S = 1.0  # a status answer saying why requests time out serves those timing out within this


class Requesting:
    """Client's `request`; Client provides the connection, `_open`, `_publish` and `stored_result`."""

    nc: NatsClient
    subjects: Subjects
    replies: ReplyInbox
    bodies: BodyStore
    _closed_here: bool
    _why: tuple[float, asyncio.Future[Any]] | None

    def _open(self) -> None:
        raise NotImplementedError  # Client's

    async def _publish(self, tier: str, model: Job, reply_to: str | None = None, *, payload: bytes,
                       repeat: bool = False) -> bool:
        raise NotImplementedError  # Submitting's

    async def stored_result(self, job_id: str, batch: str | None = None, *,
                            retry_for: float = READ_RETRY_S) -> Result | None:
        raise NotImplementedError  # Client's

    @translated("requesting a job's result")
    async def request(self, job: JobLike, tier: str, *, timeout: float = 30.0) -> Result:
        """Submit one job and wait for its Result (over the reply inbox), its body fetched
        when the reply carries a `body_ref`. `timeout`: seconds, above 0 (ValueError else, before
        anything is sent), for the whole call, storing the job included (a NATS outage too), plus
        at most 2 x WHY_TIMEOUT_S after it to say why. A job with its own `id` that already has a
        stored Result gets that Result and nothing is sent. Raises RequestTimeout (`job_id`,
        `reason`), BodyUnavailable, SubmitError (QueueFull, UnknownTier, JobInvalid: nothing
        stored), NatsUnavailable (this Client is closed). Cancelled (its task, a timeout or cancel
        scope around it), it stops waiting and leaves nothing behind; its job, once stored, runs
        (and is paid) as after a RequestTimeout: give the job a `deadline` to bound that."""
        if not math.isfinite(timeout) or timeout <= 0:  # before the job is stored: it would run (and be paid) unseen
            raise ValueError(f"timeout must be a number of seconds above 0, not {timeout!r}")
        self._open()
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        model, payload = checked_job(job)
        own_id = _has_own_id(job)  # may repeat an id stored before: its Result is read first, the publish marked
        try:
            async with asyncio.timeout_at(deadline):  # storing it rides out a NATS restart, within `timeout`
                if own_id:
                    # a repeat of an id with a Result: JetStream's dedup forgets the id after duplicate_window_s,
                    # and an id refused over rpc has a Result but no JOBS message; published, it would be paid again
                    # (not known, NATS not answering: NatsUnavailable, nothing sent; sent, it could be paid twice)
                    stored = await self.stored_result(model.id, retry_for=min(READ_RETRY_S, timeout / 2))
                    if stored is not None:
                        return stored
                inbox, reply = await self.replies.expect()
                if reply.cancelled():  # this Client closed meanwhile: nothing is sent
                    self._open()
                try:
                    # an own id may be a retry past the dedup window while the first copy is queued or running
                    fresh = await self._publish(tier, model, reply_to=inbox, payload=payload, repeat=own_id)
                except BaseException:
                    self.replies.discard(inbox)
                    raise
        except TimeoutError:
            away = not self.nc.is_connected  # else the time was too short for NATS's acknowledgement
            why = "the connection to NATS is away, reconnecting" if away else "its acknowledgement had not come"
            # connected: a timeout too short for the acknowledgement, or a JetStream that stores nothing (nats-server
            # logs why: a stream whose files went with a deletion under way took no job for good, runtime/streams.py)
            hint = "" if away else ("; if every request ends so while NATS is up, the NATS server's log says why "
                                    "JetStream stores nothing (e.g. 'JetStream failed to store a msg')")
            raise RequestTimeout(f"no result for job {model.id} within {timeout}s: NATS did not confirm storing it "
                                 f"({why}); it may {'still be stored once NATS is back' if away else 'be stored'}, "
                                 "and then runs (and is paid): collect it later with `ratefleet result "
                                 f"{model.id}` (or Client.stored_result), or request it again with the same id{hint}",
                                 job_id=model.id, reason="nats_unavailable" if away else None,
                                 why=f"NATS did not confirm storing it ({why}); it may "
                                     f"{'still be stored once NATS is back' if away else 'be stored'}, and then runs "
                                     "(and is paid)") from None
        try:
            if not fresh and not reply.cancelled():  # (cancelled: this Client closed meanwhile, nothing more is sent)
                # (its stored Result was looked for just before: a duplicate has an own id)
                await self._follow_over_rpc(tier, inbox, payload)  # answered once it is stored, also if meanwhile
            try:
                msg = await self._reply_or_stored(reply, model.id, deadline - loop.time(), duplicate=not fresh,
                                                  repeat=own_id)
            except asyncio.CancelledError:
                if not (reply.cancelled() and self._closed_here) or _being_cancelled():
                    raise
                raise NatsUnavailable(f"this Client was closed while the request for job {model.id} waited for its "
                                      "Result; the job is stored and runs (and is paid) all the same: collect its "
                                      f"Result later with `ratefleet result {model.id}` (or Client.stored_result "
                                      "on a new Client)") from None
            if msg is None:
                reason, why = await self.why_unrun(model.deadline, model.upstream)
                raise RequestTimeout(f"no result for job {model.id} within {timeout}s; {why}: collect it later with "
                                     f"`ratefleet result {model.id}` (or Client.stored_result)",
                                     job_id=model.id, reason=reason, why=why) from None
            if isinstance(msg, Result):
                return msg
            return await self.bodies.resolve(Result.from_json(msg.data))
        finally:
            self.replies.discard(inbox)

    async def _reply_or_stored(self, reply: asyncio.Future, job_id: str, timeout: float,
                               *, duplicate: bool, repeat: bool = False) -> Any:
        """The reply message, or the job's stored Result, whichever is seen first; None after
        `timeout` seconds with neither. The reply is core NATS (at most once): it is lost when
        this connection was away as it was sent (a NATS restart: 21 of 60 requests in flight
        waited their whole timeout in a trial), and a duplicate job id (a job already running)
        is answered to its first requester only. So the stored Result is read too, at the end
        of each slice of the wait (0.25 s for a duplicate, else 1 s, doubling to 5 s), but only
        for a duplicate, a `repeat` (a job with its own id: stored again past the dedup window
        while its first message was held or being called, it is answered by the leader's
        follower of that call, which can be gone: a dispatcher restart, MAX_DUPLICATE_FOLLOWERS,
        DUPLICATE_FOLLOW_S), or once this connection has reconnected since the request began
        (nats-py's `stats["reconnects"]`): an ordinary long call costs no reads."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        pause = 0.25 if duplicate else 1.0
        reconnects = self._reconnects()
        while True:
            remaining = deadline - loop.time()
            if remaining > 0:
                # asyncio.wait leaves the reply's future as it is when the slice ends (wait_for would
                # cancel it, hence a shield before) and wakes this task two loop iterations after
                # the reply, where wait_for over a shield took four
                await asyncio.wait((reply,), timeout=min(pause, remaining))
                if reply.done():
                    return reply.result()  # (CancelledError when this Client closed meanwhile)
            out_of_time = deadline - loop.time() <= 0
            if self.nc.is_connected and (duplicate or repeat or out_of_time or self._reconnects() != reconnects):
                try:  # (a read waits for a reconnect: at most what is left of the wait, WHY_TIMEOUT_S at its end)
                    left = max(WHY_TIMEOUT_S, deadline - loop.time())
                    stored = await asyncio.wait_for(self.stored_result(job_id, retry_for=min(pause, left)), left)
                except (TimeoutError, NatsError):  # no answer: the wait goes on (NatsUnavailable is a NatsError)
                    stored = None
                if stored is not None:
                    return stored
            if out_of_time:
                return None
            pause = min(2 * pause, 5.0)

    async def _follow_over_rpc(self, tier: str, inbox: str, payload: bytes) -> None:
        """A job id already queued or running answers its first requester only. Sent to the
        dispatchers' rpc endpoint as well, the job is a duplicate there too (nothing is stored
        twice) and the endpoint answers `inbox` as soon as the job's Result is stored, where the
        store's own reads below come at doubling pauses. Best effort: no dispatcher, or a user not
        allowed to publish there, leaves those reads."""
        try:
            with denial_expected(self.subjects.rpc(tier)):
                await self.nc.publish(self.subjects.rpc(tier), payload, reply=inbox)  # (the job as it was stored)
        except Exception:  # noqa: BLE001 - see docstring
            pass

    async def why_unrun(self, deadline: datetime | None = None,
                        upstream: str | None = None) -> tuple[str | None, str]:
        """After a request timed out (never on the way to a Result): whether the fleet can run
        the job at all, from one status request of at most WHY_TIMEOUT_S, shared by every request
        of this Client timing out within WHY_SHARED_S of it. (reason, text). Before, each asked:
        1,000 requests timing out together sent 1,000 status requests to the leader, which
        answers about 200 a second (a trial fleet), just when the fleet was already slow.
        `deadline`: the job's; once passed, a job still queued is never called (it ends
        `expired`), and the text says so rather than that it runs later (a gateway trial: its
        504 said "stored and runs (and is paid) once one starts" of jobs that ended expired).
        `upstream`: the job's, when it names one: only that upstream's keys are judged (a
        break-it trial: the only key of the job's upstream was disabled, the other upstream's
        keys were ready, and the reason said nothing)."""
        loop = asyncio.get_running_loop()
        if self._why is None or loop.time() - self._why[0] > WHY_SHARED_S:
            self._why = (loop.time(), asyncio.ensure_future(self._ask_why()))  # awaited below, by all who share it
        answer = await asyncio.shield(self._why[1])
        reason, cause, when = answer if isinstance(answer, tuple) else _judge(answer, upstream)
        return reason, job_fate(cause, when, deadline is not None and datetime.now(UTC) >= deadline)

    async def _ask_why(self) -> tuple[str | None, str, str | None] | dict:
        """`why_unrun`'s one status request (never raises): the status answer (a dict, judged
        per request by `_judge`), or (reason, cause, when the job runs: None when it may be
        running now) when there is none to judge."""
        if not self.nc.is_connected:
            return "nats_unavailable", ("the connection to NATS is away (reconnecting), so its Result cannot come "
                                        "yet"), None
        try:
            with denial_expected(self.subjects.admin_status):
                reply = await self.nc.request(self.subjects.admin_status, b"", timeout=WHY_TIMEOUT_S)
            status = json.loads(reply.data)
        except NoRespondersError:
            return "no_dispatcher", (f"no dispatcher is running (nothing answers {self.subjects.admin_status})"), (
                "once one starts (`ratefleet up`, or `ratefleet dispatcher` and workers)")
        except Exception:  # noqa: BLE001 - slow, refused or not JSON: nothing more is known
            return None, "", None
        if not isinstance(status, dict):
            return "no_leader", "no dispatcher leads (a standby takes over within about lease_ttl_s)", "once one does"
        return status

    def _reconnects(self) -> int:
        """How often this client's connection has reconnected (nats-py's count)."""
        return self.nc.stats["reconnects"]


def _judge(status: dict, upstream: str | None) -> tuple[str | None, str, str | None]:
    """(reason, cause, when the job runs) from a status answer, for a job of `upstream` (None:
    it names none, so every key is judged; a key answer without `upstream` counts for any)."""
    if status.get("leader") is None:
        return "no_leader", "no dispatcher leads (a standby takes over within about lease_ttl_s)", "once one does"
    if status.get("starting"):  # (its answer holds no workers or keys yet: no reason to claim either)
        return "no_leader", (f"the leader {status.get('leader')} is taking over (loading the key states)"), (
            "once it leads")
    if not status.get("workers"):
        return "no_worker", "the leader has no worker", "once one starts (`ratefleet worker`)"
    keys = status.get("keys")
    if isinstance(keys, dict) and upstream is not None:
        keys = {key_id: key for key_id, key in keys.items()
                if not isinstance(key, dict) or key.get("upstream") in (None, upstream)}
    whose = f" of upstream {upstream!r}" if upstream is not None else ""
    if isinstance(keys, dict) and keys and all(isinstance(key, dict) and key.get("disabled") for key in keys.values()):
        why = "; ".join(f"{key_id}: {key.get('disabled_reason') or key.get('disabled_by') or 'disabled'}"
                        for key_id, key in sorted(keys.items()))
        return "no_key_ready", f"every key{whose} is disabled ({why})", (
            "once a key's probe succeeds or an operator enables one (`ratefleet keys enable KEY` once its secret "
            "or account is fixed)")
    if isinstance(keys, dict) and keys and not any(_key_ready(key) for key in keys.values()):
        return "no_key_ready", (f"every key{whose} is cooling down after 429s (or answered 429 at its last call), has "
                                "an open breaker or is disabled (`ratefleet status` says which and for how long)"), (
            "once a key can take it")
    return None, "", None


def job_fate(cause: str, when: str | None, expired: bool) -> str:
    """`why_unrun`'s text, and the gateway's 504 (gateway/errors.py): the cause, then what becomes
    of the job. `when`: when it runs (None: it may be in its call now); `expired`: the job's
    deadline has passed, so a job still queued is never called (the leader ends it `expired`,
    schemas/job.py `Job.expired`)."""
    if expired:
        fate = ("its deadline has passed, so it is not called any more: it ends `expired`, unpaid" if when else
                "its deadline has passed: if it is in its call it may still finish (and be paid); if it is still "
                "queued it is not called any more and ends `expired`")
    elif when:
        fate = f"the job is stored and runs (and is paid) {when}"
    else:
        fate = ("the job is stored and runs (and is paid) whether or not it is answered" if cause
                else "it is stored and still runs")
    return f"{cause}{'; ' if when is None else ': '}{fate}" if cause else fate


def _key_ready(key: Any) -> bool:
    """Whether a key of the status answer could take a call now: enabled, breaker not open, not
    cooling down, and its last counted answer not a 429 (`throttled`). A key whose Retry-After
    has just run out sits between two cooldowns with `cooldown_s` 0; asked at that instant, a
    fleet whose every key keeps answering 429 looked as if a key were ready."""
    return (isinstance(key, dict) and not key.get("disabled") and key.get("breaker") != "open"
            and not (key.get("cooldown_s") or 0) > 0 and not key.get("throttled"))
