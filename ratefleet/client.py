"""The Python client: submit jobs, await one reply, follow a batch's results.

    async with await Client.connect("nats://127.0.0.1:4222") as client:
        await client.submit(job, tier="normal")                 # durable once it returns
        result = await client.request(job, tier="vip", timeout=30)
        async for result in client.results(batch="nightly-0412"): ...

A Result whose body was too large to travel inside it (`response.body_ref`) comes back from
every method here with the body fetched from the fleet's Object Store and filled in.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator
from typing import Any

from nats.aio.client import Client as NatsClient
from nats.errors import NoRespondersError
from nats.js.api import DeliverPolicy
from nats.js.errors import NotFoundError

from ratefleet.client_request import WHY_SHARED_S, WHY_TIMEOUT_S, Requesting
from ratefleet.client_submit import JobLike, Stored, Submitting, as_job
from ratefleet.runtime.bodies import BodyStore
from ratefleet.runtime.connect import close_away, connect, denial_expected, refused
from ratefleet.runtime.edge import translated
from ratefleet.runtime.pubpipe import PublishPipe
from ratefleet.runtime.replies import ReplyInbox
from ratefleet.runtime.store import READ_RETRY_S, read_result, retrying
from ratefleet.schemas import Job, Result, Subjects
from ratefleet.schemas.config import DEFAULT_NATS_URL
from ratefleet.schemas.config_nats import NatsAuthConfig
from ratefleet.schemas.errors import DispatcherUnavailable, NatsUnavailable
from ratefleet.schemas.subjects import is_token

__all__ = ["CLOSE_GRACE_S", "WHY_SHARED_S", "WHY_TIMEOUT_S", "Client", "JobLike", "Stored", "as_job"]
CLOSE_GRACE_S = 5.0  # how long `close()` lets the single publishes under way get their acknowledgements


class Client(Submitting, Requesting):
    """A producer's connection to the fleet: submit jobs (client_submit.py), request one Result
    (client_request.py), read results, ask for the status. Every failure ratefleet knows about is raised as a RatefleetError
    subclass (schemas/errors.py); nats-py and httpx exceptions never reach the caller
    (they are translated at runtime/edge.py)."""

    def __init__(self, nc: NatsClient, prefix: str = "ratefleet"):
        self.nc = nc
        self.js = nc.jetstream()
        self.subjects = Subjects(prefix)
        self.bodies = BodyStore(self.js, self.subjects.bodies_bucket)
        # one reply subscription for every `request`; the 503 "no responders" of its follow-up publish to the
        # rpc endpoint (no dispatcher) is no Result: it was taken for one (ValidationError, a break-it trial)
        self.replies = ReplyInbox(nc, status_replies=False)
        self._closed_here = False  # `close()` was called (else a closed connection gave up reconnecting)
        self._pipes: set[PublishPipe] = set()  # those of the `submit_stream`s under way, abandoned on close
        self._publishing = 0  # single publishes and reads (submit, request, stored_result) under way: `close()` lets them finish
        self._published = asyncio.Event()  # set whenever none is under way
        self._published.set()
        self._why: tuple[float, asyncio.Future[Any]] | None = None  # (asked at, the shared status answer)
        self._closing: asyncio.Future[None] | None = None  # the one closing every `close()` awaits

    @classmethod
    async def connect(cls, url: str = DEFAULT_NATS_URL, *, prefix: str = "ratefleet",
                      name: str = "ratefleet-client", auth: NatsAuthConfig | None = None,
                      connect_timeout: float = 5.0, reconnect_forever: bool = True) -> Client:
        """Connect to the fleet's NATS at `url` (credentials may ride in it: `nats://user:password@host`;
        several servers: comma-separated).

        `auth`: credentials and TLS, e.g. `load_config(...).nats`, or
        `NatsAuthConfig(user="producer", password="env:NATS_PASSWORD", inbox_prefix="_INBOX.producer",
        tls_ca="ca.pem")` (secrets as `env:NAME`, `file:PATH` or the value itself). Raises
        NatsUnavailable (nothing answers: at once, or after `connect_timeout` seconds per server
        when something answers TCP but no NATS handshake comes; or the server refused the
        credentials: at once) and ConfigError (`url` is no NATS URL, or a secret reference cannot
        be read); neither message holds a credential.

        `reconnect_forever` (default True, what a long-lived service wants): a connection lost
        later is re-established for as long as NATS is away; meanwhile `submit` fails after its
        30 s of retries and `request` after its `timeout`, and both work again once NATS is back.
        False (the CLI's commands): give up after about 30 s of reconnecting; the Client is closed
        then and every call raises NatsUnavailable at once, saying so."""
        nc = await connect(url, name=name, forever=reconnect_forever, fail_fast=True, auth=auth,
                           connect_timeout=connect_timeout)
        return cls(nc, prefix)

    async def __aenter__(self) -> Client:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    @translated("closing the connection")
    async def close(self) -> None:
        """Close the connection. A `submit` under way (and a `request` storing its job) gets its
        acknowledgement first, for up to CLOSE_GRACE_S seconds while connected, so it returns as
        usual. Other calls under way end at once: a `request` waiting for its Result and a
        `submit_many` / `submit_stream` waiting for acknowledgements raise NatsUnavailable saying
        the Client was closed (their jobs stored so far still run); every later call raises it
        too. Never raises for NATS being away (then nothing is flushed or waited for). Closes
        called together (`async with` ending while another task closes too) share one closing."""
        if self._closing is None:
            self._closing = asyncio.ensure_future(self._close())
        await asyncio.shield(self._closing)  # a cancelled caller leaves the closing to finish

    async def _close(self) -> None:
        self._closed_here = True
        self.replies.abandon()
        for pipe in list(self._pipes):
            pipe.abandon()
        if self.nc.is_closed or self.nc.is_draining:
            return
        if self.nc.is_connected:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._published.wait(), CLOSE_GRACE_S)
        if self.nc.is_connected:
            try:
                await self.nc.drain()
                return
            except Exception:  # noqa: BLE001 - NATS went away while draining: close without it
                pass
        await close_away(self.nc)  # reconnecting: nothing can be flushed, and the reconnects must stop

    def _open(self) -> None:
        """NatsUnavailable at once when this Client's connection is closed or closing: nothing
        sent through it could arrive (before, a submit retried a closed connection for 30 s and
        then asked whether the NATS server was up)."""
        if not (self.nc.is_closed or self.nc.is_draining or self._closed_here):
            return
        if self._closed_here:
            raise NatsUnavailable("this Client is closed (Client.close() was called, or its `async with` block "
                                  "ended); connect a new one with Client.connect")
        # the ratefleet commands connect so (reconnect_forever=False): their users run a command, not Python
        raise NatsUnavailable("this Client is closed (NATS was unreachable for about 30 s and its connection gave up: "
                              "reconnect_forever=False, as the ratefleet commands connect); check that nats-server "
                              "runs, then run the command again (in Python: connect a new Client with "
                              "Client.connect, or keep reconnect_forever=True)")

    @translated("reading a queued job")
    async def queued_job(self, seq: int, *, retry_for: float = READ_RETRY_S) -> Job | None:
        """The job stored at JOBS stream sequence `seq`, or None when it is gone (acked or
        deleted: JetStream answered 404) or the message there is not a job. A server that does
        not answer is asked again for `retry_for` seconds, then its error is raised (as
        `read_result` does): a batch stop that took "no answer" for "gone" stopped waiting for
        a job still being called, or left one queued."""
        async def get() -> Any:
            return await self.js.get_msg(self.subjects.jobs_stream, seq)

        try:
            msg = await retrying(get, for_s=retry_for)
        except NotFoundError:
            return None
        try:
            return Job.model_validate_json(msg.data)
        except ValueError:  # (ValidationError is one) not a job: nothing queued there
            return None

    @translated("reading a stored result")
    async def stored_result(self, job_id: str, batch: str | None = None, *,
                            retry_for: float = READ_RETRY_S) -> Result | None:
        """The stored Result of one job (its body fetched when it has a `body_ref`), or None
        when it has none yet. A NATS that does not answer is asked again for `retry_for`
        seconds, then NatsUnavailable is raised (no answer is not "no Result"). Raises
        BodyUnavailable when the referenced body is gone, NatsUnavailable at once when this
        Client is closed. ValueError for a `job_id` that is no job id or a `batch` that is no batch
        name (1-128 of A-Z a-z 0-9 _ -), before anything is read: a wildcard such as `*` answered
        with the last Result of any job (a service passing a caller's id on: another caller's answer)."""
        if not is_token(job_id):
            raise ValueError(f"job_id must be a job id (1-128 of A-Z a-z 0-9 _ -), not {job_id!r}")
        if batch is not None and not is_token(batch):
            raise ValueError(f"batch must be a batch name (1-128 of A-Z a-z 0-9 _ -) or None (any batch), "
                             f"not {batch!r}")
        async with self._under_way():
            data = await read_result(self.js, self.subjects, job_id, "*" if batch is None else batch, retry_for=retry_for)
        return None if data is None else await self.bodies.resolve(Result.from_json(data))

    @translated("reading results")
    async def results(self, batch: str | None = None, *, follow: bool = False,
                      idle_timeout: float = 1.0) -> AsyncIterator[Result]:
        """Results of a batch (`None`: jobs without a batch). Without `follow`: the Results stored so
        far, ending at the last of them (or after `idle_timeout` seconds when none is stored yet);
        jobs still running are not waited for. With `follow`: every Result as it is stored, until
        the caller stops (e.g. after as many as it submitted).

        Referenced bodies are fetched and filled in (BodyUnavailable when one is gone). ValueError
        for a `batch` that is no batch name (1-128 of A-Z a-z 0-9 _ -; `_` is None's), before anything
        is read: a wildcard such as `*` read every batch's Results."""
        if batch is not None and not is_token(batch):
            raise ValueError(f"batch must be a batch name (1-128 of A-Z a-z 0-9 _ -) or None (jobs without a "
                             f"batch), not {batch!r}")
        self._open()
        # the stream named: no $JS.API.STREAM.NAMES lookup (a producer's account permissions need not allow it)
        sub = await self.js.subscribe(self.subjects.batch_results(batch), stream=self.subjects.results_stream,
                                      ordered_consumer=True, deliver_policy=DeliverPolicy.ALL)
        try:
            while True:
                try:
                    msg = await sub.next_msg(timeout=idle_timeout)
                except TimeoutError:
                    if follow:
                        self._open()  # closed meanwhile: say so, not "the connection was lost"
                        continue
                    return
                except Exception:
                    self._open()
                    raise
                yield await self.bodies.resolve(Result.from_json(msg.data))
                if not follow and msg.metadata.num_pending == 0:
                    return
        finally:
            try:
                await sub.unsubscribe()
            except Exception:  # noqa: BLE001 - the connection is already closing: nothing to undo
                pass

    async def no_dispatcher(self, timeout: float = 1.0) -> bool:
        """True only when NATS says no dispatcher listens on the status subject (no responders,
        at once); an answer, a slow one (`timeout` seconds), or an account not allowed to ask
        (nats-server answers with an -ERR only) all give False: nothing is known then. That
        refusal is expected (the producer of examples/nats-accounts.conf may not ask), so it
        is no warning."""
        try:
            with denial_expected(self.subjects.admin_status):
                await self.nc.request(self.subjects.admin_status, b"", timeout=timeout)
        except NoRespondersError:
            return True
        except Exception:  # noqa: BLE001 - see docstring
            return False
        return False

    @translated("asking a dispatcher for the fleet's status")
    async def status(self, timeout: float = 3.0) -> dict:
        """The fleet's status (tiers, keys, workers) from the leader dispatcher. Raises
        DispatcherUnavailable when none answers within `timeout` seconds, NatsUnavailable
        when NATS itself is gone."""
        self._open()
        try:
            reply = await self.nc.request(self.subjects.admin_status, b"", timeout=timeout)
        except (NoRespondersError, TimeoutError) as exc:  # (nats' TimeoutError is a TimeoutError)
            if not self.nc.is_connected:  # the request never left: NATS itself is away, not the dispatchers
                raise NatsUnavailable(f"the connection to NATS is lost (reconnecting), so no status could be asked "
                                      f"for; check that nats-server runs ({type(exc).__name__})") from None
            if refused(self.subjects.admin_status):  # the CLI names the refusal first; no dispatcher is to blame
                raise DispatcherUnavailable(f"this user may not ask {self.subjects.admin_status}") from None
            if isinstance(exc, NoRespondersError):
                raise DispatcherUnavailable(f"no dispatcher answered {self.subjects.admin_status} (NoRespondersError: "
                                            "none subscribes); is `ratefleet up` or `ratefleet dispatcher` running?"
                                            ) from None
            # no answer in time: the dispatchers may be busy or starting, or the NATS server itself may not
            # respond (a break-it trial froze it and was told only that no dispatcher answered)
            raise DispatcherUnavailable(f"no dispatcher answered {self.subjects.admin_status} within {timeout:g}s "
                                        f"({type(exc).__name__}): a dispatcher may be busy or starting, or the NATS "
                                        "server may not be responding; check that nats-server and `ratefleet up` (or "
                                        "`ratefleet dispatcher`) run, then ask again") from None
        return json.loads(reply.data)
