"""The gateway's ASGI app: any path (`/v1/...`, any method) becomes a job on the caller's tier.

One request: identify the caller by its ratefleet key (401) -> read the body (413, 400,
415) -> the caller's own limits (429 + Retry-After) -> the Job -> request/reply through the
fleet (`Client.request`: stored durably first; 503 + Retry-After when the queue is full, 504
after the caller's timeout) -> the upstream's answer, passed through; `"stream": true` answers are
relayed chunk by chunk as server-sent events (streaming.py). `GET /healthz` answers
200 without a key.

A caller with `cache_ttl_s` is looked up in the fleet's answer cache before anything is
submitted (ratefleet/runtime/cache.py): a hit is stored as the job's one Result (`cached:
true`) and answered at once, with no job queued and no key token spent; answers of such
callers carry `x-ratefleet-cache: hit | miss | bypass` (bypass: `Cache-Control: no-cache`).
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Callable
from datetime import UTC, datetime

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from ratefleet.client import Client
from ratefleet.gateway.callers import Caller, CallerTable, single_field
from ratefleet.gateway.errors import (
    GatewayRefusal,
    bad_request,
    nats_down,
    nats_trouble,
    over_limit,
    queue_full,
    timed_out,
    unauthorized,
)
from ratefleet.gateway.limits import Admission, CallerLimits, Refusal
from ratefleet.gateway.metrics import GatewayMetrics
from ratefleet.gateway.streaming import ChunkStream, StreamStopped, start_stream
from ratefleet.gateway.translate import UPSTREAM_HEADER, answer_of, build_job, parse_body, passed_headers, used_tokens
from ratefleet.runtime.cache import HIT_HEADER, ResultCache, cache_key, cached_result, wants_write
from ratefleet.runtime.logs import get_logger
from ratefleet.runtime.store import store_result
from ratefleet.runtime.tracing import remote_parent
from ratefleet.schemas import Job, Result
from ratefleet.schemas.cost import estimate_tokens
from ratefleet.schemas.errors import (
    JobInvalid,
    JobTooLarge,
    NatsUnavailable,
    QueueFull,
    RatefleetError,
    RequestTimeout,
    SubmitError,
)
from ratefleet.workers.relay import wants_stream
from ratefleet.workers.usage import stream_cost

log = get_logger("ratefleet.gateway")
ALL_METHODS = ["GET", "POST", "PUT", "PATCH", "DELETE"]
USAGE_PATH = "usage.total_tokens"  # what corrects a caller's tokens_per_minute charge (OpenAI's usage)
STREAM_TAIL_BYTES = 65536  # the end of a stream read for its usage (the usage chunk is its last event)


class Gateway:
    """The request handler, built from the fleet's client, the callers and their limits."""

    def __init__(self, client: Client, callers: CallerTable, *, max_body_bytes: int,
                 body_limit_source: str = "streams.max_job_bytes",
                 clock: Callable[[], float] = time.monotonic, cache: ResultCache | None = None,
                 default_upstream: str | None = None, upstreams: tuple[str, ...] = (),
                 metrics: GatewayMetrics | None = None) -> None:
        """`max_body_bytes`: the largest request body (bytes; larger: 413 naming `body_limit_source`),
        the fleet's largest job (`job_size_limit`). `cache`: the fleet's answer cache (None: no
        lookups here); `default_upstream`: the
        config's only upstream (a job without `upstream` runs there: part of the cache key);
        `upstreams`: the config's upstream names (with several and none chosen, a request is
        refused here, naming the header that chooses one). `metrics`: where each answer is counted
        (gateway/metrics.py; None: nowhere)."""
        self.client = client
        self.metrics = metrics
        self.callers = callers
        self.limits = CallerLimits()
        self.max_body_bytes, self.body_limit_source = max_body_bytes, body_limit_source
        self.clock = clock
        self.cache = cache
        self.default_upstream = default_upstream
        self.upstreams = upstreams
        self.stop_at: float | None = None  # set when the gateway stops: its open streams end by then (monotonic)

    async def handle(self, request: Request) -> Response:
        started = time.perf_counter()
        caller: Caller | None = None
        job: Job | None = None
        cache_state: str | None = None
        try:
            caller = self.callers.identify(single_field(request.headers.getlist("authorization")))
            if caller is None:
                raise unauthorized()
            if self.client is not None and not self.client.nc.is_connected:
                raise nats_down()  # at once: the publish would wait out its 30 s ack timeout, then fail
            job, admission = await self._admit(request, caller)
            with remote_parent(request.headers):  # the HTTP caller's traceparent becomes the job's
                answer, cache_state = await self._through_cache(job, caller)
            if isinstance(answer, ChunkStream):
                log.info("gateway stream", caller=caller.name, path=request.url.path, job_id=job.id,
                         first_byte_ms=round((time.perf_counter() - started) * 1000, 1))
                if self.metrics is not None:
                    self.metrics.answered(caller.name, 200, time.perf_counter() - started)
                return StreamingResponse(self._settled(answer, admission), media_type="text/event-stream",
                                         headers={**passed_headers(answer.headers), "x-ratefleet-job-id": job.id or "",
                                                  "cache-control": "no-cache"})
            self.limits.settle(admission, self.clock(), 0.0 if cache_state == "hit" else used_tokens(answer))
            status, headers, body = answer_of(answer)
        except GatewayRefusal as refusal:
            status, body = refusal.status, refusal.body()
            headers = {**refusal.headers(), "content-type": "application/json"}
            if refusal.job_id is not None:  # (not for a job never stored: no Result will ever be under it)
                headers["x-ratefleet-job-id"] = refusal.job_id
        except Exception:  # answered 500 by the app's handler (`_internal_error`): counted as such
            if self.metrics is not None:
                self.metrics.answered(caller.name if caller else None, 500, time.perf_counter() - started)
            raise
        log.info("gateway request", caller=caller.name if caller else None, method=request.method,
                 path=request.url.path, status=status, job_id=job.id if job else None, cache=cache_state,
                 ms=round((time.perf_counter() - started) * 1000, 1))
        if self.metrics is not None:
            self.metrics.answered(caller.name if caller else None, status, time.perf_counter() - started)
        if cache_state is not None:
            headers[HIT_HEADER] = cache_state
        media = headers.pop("content-type", None)
        return Response(body, status_code=status, headers=headers, media_type=media)

    async def _settled(self, stream: ChunkStream, admission: Admission) -> AsyncIterator[bytes]:
        """`stream`'s chunks, then the caller's token charge corrected by the usage its last
        events report (OpenAI's usage chunk, asked with `stream_options.include_usage`), read
        from the last STREAM_TAIL_BYTES relayed; none found: the estimate stays. Before, a
        stream's estimate always stayed: a caller asking max_tokens 4,000 for 50-token answers
        was held to 1/80 of its tokens_per_minute."""
        tail = bytearray()
        try:
            async for part in stream.chunks():
                tail += part
                del tail[:-STREAM_TAIL_BYTES]
                yield part
        finally:
            self.limits.settle(admission, self.clock(), stream_cost(bytes(tail), USAGE_PATH))

    async def _admit(self, request: Request, caller: Caller) -> tuple[Job, Admission]:
        raw = await read_body(request, self.max_body_bytes, self.body_limit_source)
        json_body, text_body = parse_body(raw, request.headers.get("content-type"))
        job = build_job(caller, method=request.method, path=request.url.path,
                        query=request.query_params.multi_items(), headers=dict(request.headers),
                        json_body=json_body, text_body=text_body, now=datetime.now(UTC))
        if job.upstream is None and len(self.upstreams) > 1:  # (one upstream is the config's default)
            raise GatewayRefusal(400, f"This fleet has several upstreams ({', '.join(self.upstreams)}) and caller "
                                 f"{caller.name!r} has none of its own: name one with the {UPSTREAM_HEADER} header, "
                                 f"or give the caller `upstreams` in the config.", type="invalid_request_error",
                                 code="upstream_required")
        verdict = self.limits.admit(caller, self.clock(), estimate_tokens(json_body, text_body))
        if isinstance(verdict, Refusal):
            raise over_limit(verdict.limit, verdict.retry_after_s)
        return job, verdict

    async def _through_cache(self, job: Job, caller: Caller) -> tuple[Result | ChunkStream, str | None]:
        """The answer and what the cache did ("hit", "miss", "bypass"; None: not asked).
        Looked up here, before the job is submitted; after a miss the job goes with
        `cache_refresh` set, so the dispatcher's intake does not look it up a second time."""
        upstream = job.upstream or self.default_upstream
        if self.cache is None or upstream is None or not wants_write(job):
            return await self._run(job, caller), None
        if job.cache_refresh:
            return await self._run(job, caller), "bypass"
        entry = await self.cache.lookup(cache_key(upstream, job))
        if entry is None:
            return await self._run(job.model_copy(update={"cache_refresh": True}), caller), "miss"
        result = cached_result(job, job.id or "", caller.tier, entry)
        try:
            await store_result(self.client.js, self.client.subjects, result)  # the job's one Result
        except Exception as exc:  # noqa: BLE001 - not stored: not answered either (like a failed submit)
            raise GatewayRefusal(503, f"The cached answer could not be stored as job {job.id}'s Result "
                                 f"({type(exc).__name__}).", type="server_error", code="submit_failed",
                                 retry_after_s=1.0) from None
        return result, "hit"

    async def _run(self, job: Job, caller: Caller) -> Result | ChunkStream:
        """The job's Result over request/reply, or for `"stream": true` its streamed answer once
        the first chunk is in (or its Result, when that comes first)."""
        try:
            if wants_stream(job):
                return await start_stream(self.client, job, caller.tier, caller.timeout_s, lambda: self.stop_at)
            return await self.client.request(job, caller.tier, timeout=caller.timeout_s)
        except QueueFull:
            raise queue_full() from None
        except JobTooLarge as exc:  # the job the body became: as a body over the limit
            raise GatewayRefusal(413, f"{exc}: the request body with what the gateway adds to make it a job "
                                 "(its id, caller, deadline) is over the limit.", type="invalid_request_error",
                                 code="request_too_large") from None
        except JobInvalid as exc:
            raise bad_request(str(exc), code="invalid_job") from None
        except RequestTimeout as exc:
            raise timed_out(job.id, caller.timeout_s, exc.reason, exc.why) from None
        except StreamStopped:  # the job is stored (submit_for_reply had its PubAck) and runs: not to be sent again
            refusal = GatewayRefusal(503, f"The gateway is stopping (a restart or a shutdown) before the answer to job "
                                     f"{job.id} began; the job is stored and runs (and is paid): its Result is stored "
                                     f"under that id (`ratefleet result {job.id}` on the fleet). Sending the request "
                                     "again makes a new job.", type="server_error", code="gateway_stopping",
                                     sdk_retry=False)
            refusal.job_id = job.id
            raise refusal from None
        except TimeoutError:  # a stream's first chunk (the job is stored: submit_for_reply had its PubAck)
            reason, why = await self.client.why_unrun(job.deadline, job.upstream or self.default_upstream)
            raise timed_out(job.id, caller.timeout_s, reason, why) from None
        except NatsUnavailable as exc:  # NATS away or not answering, the job stored or not: not a bad answer (502)
            raise nats_trouble(job.id or "", exc) from None
        except SubmitError as exc:
            raise GatewayRefusal(503, f"The job could not be stored: {exc}", type="server_error",
                                 code="submit_failed", retry_after_s=1.0) from None
        except RatefleetError as exc:  # e.g. BodyUnavailable: a large answer's stored body is gone
            refusal = GatewayRefusal(502, f"Job {job.id}: {exc}", type="server_error", code="gateway_error")
            refusal.job_id = job.id
            raise refusal from None


async def read_body(request: Request, limit: int, setting: str = "streams.max_job_bytes") -> bytes:
    """The request body, read as it comes and refused (GatewayRefusal 413) as soon as it
    passes `limit` bytes, whether declared by Content-Length or sent chunked without one:
    never more than `limit` plus one chunk in memory."""
    declared = request.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > limit:
        raise _too_large(int(declared), limit, setting)
    parts, size = [], 0
    async for part in request.stream():
        size += len(part)
        if size > limit:
            raise _too_large(size, limit, setting, at_least=True)
        parts.append(part)
    return b"".join(parts)


def _too_large(size: int, limit: int, setting: str, *, at_least: bool = False) -> GatewayRefusal:
    more = "more than " if at_least else ""
    return GatewayRefusal(413, f"The request body is {more}{size} bytes; the limit is {limit} ({setting}).",
                          type="invalid_request_error", code="request_too_large")


async def _http_error(request: Request, exc: Exception) -> Response:
    """Starlette's own refusals (405 for a method no route takes, 400 for a broken multipart
    upload, 404 for an absolute-form target) as OpenAI-style error bodies, so SDKs parse them."""
    status = exc.status_code if isinstance(exc, HTTPException) else 500
    detail = exc.detail if isinstance(exc, HTTPException) else "Internal error"
    refusal = GatewayRefusal(status, f"{detail} ({request.method} {request.url.path})",
                             type="invalid_request_error" if status < 500 else "server_error", code=None)
    headers = {**(getattr(exc, "headers", None) or {}), **refusal.headers()}
    return Response(refusal.body(), status_code=status, headers=headers, media_type="application/json")


async def _internal_error(request: Request, exc: Exception) -> Response:
    """Anything unforeseen as an OpenAI-style 500 (type and where; the details, never a key, go
    to the gateway's log, where Starlette re-raises it), not Starlette's plain-text page that an
    SDK cannot parse."""
    refusal = GatewayRefusal(500, f"The ratefleet gateway failed on this request ({type(exc).__name__} on "
                             f"{request.method} {request.url.path}); its log has the details. Retrying may help.",
                             type="server_error", code="internal_error")
    return Response(refusal.body(), status_code=500, media_type="application/json")


async def _hung_up(request: Request, exc: Exception) -> Response:
    """A client that closed its connection before its request body was whole (starlette's
    ClientDisconnect): one info line, not the "Exception in ASGI application" traceback of a
    gateway failure. Nothing was stored or sent on; the response goes nowhere (499 is nginx's
    "client closed request", for the access log)."""
    log.info("a client hung up before its request body was whole; nothing was done with it",
             method=request.method, path=request.url.path)
    return Response(status_code=499)


async def _healthz(request: Request) -> Response:
    return JSONResponse({"ok": True})


def create_app(gateway: Gateway, own_routes: list[Route] | None = None) -> Starlette:
    """The Starlette app serving `gateway` on every path (the upstream's), plus `/healthz` and
    `own_routes` (paths the gateway answers itself: `/v1/files`, `/v1/batches`), matched first."""
    routes = [Route("/healthz", _healthz, methods=["GET"]), *(own_routes or []),
              Route("/{path:path}", gateway.handle, methods=ALL_METHODS)]
    return Starlette(routes=routes, exception_handlers={HTTPException: _http_error, ClientDisconnect: _hung_up,
                                                         Exception: _internal_error})
