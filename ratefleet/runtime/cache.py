"""The fleet's answer cache: 2xx answers kept in a NATS KV bucket, served without a call.

Opt-in, per job (`Job.cache_ttl_s`, seconds) or per gateway caller (`[callers.<name>]
cache_ttl_s`); off by default. The cache key (`cache_key`) is the SHA-256 of upstream,
method, path, query and the canonical body (`canonical_json`: keys sorted, no whitespace,
UTF-8), so two requests that differ only in key order or spacing share an entry.

Where each role takes part:

* the worker writes the entry after a 2xx call of a job with `cache_ttl_s` (never for a
  streamed job, a body kept in the Object Store, or an entry over `cache.max_entry_bytes`);
* the gateway looks up before it submits (a hit is stored as the job's one Result and
  answered with `x-ratefleet-cache: hit`; the job never reaches the queue);
* every other producer (Client, `ratefleet submit`, rpc, any NATS client) is looked up by the
  leader dispatcher's intake (dispatcher/shell/puller.py), in the tier's pull-inbox callback,
  so the scheduler never waits on it and no token is spent: a hit is stored as the job's
  Result (`cached: true`) and the machine then answers and acks it like a redelivered job
  whose Result is stored. Doing it there rather than in the Client covers producers in any
  language and uses the fleet's own config (default upstream), at one KV read per opted-in
  job (none for the others).

`Job.cache_refresh` (the gateway sets it for `Cache-Control: no-cache`) skips the lookup;
the 2xx answer still replaces the entry. Entries expire with a per-message TTL (`Nats-TTL`,
nats-server 2.11+, on the bucket nats-py creates with `allow_msg_ttl`) and carry their own
`expires_at`, which a reader also checks; the bucket's max age (`cache.max_ttl_s`) bounds
every entry.
"""

from __future__ import annotations

import hashlib
import json
import math
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import anyio
from nats.js import JetStreamContext
from nats.js.errors import KeyNotFoundError, NotFoundError
from nats.js.kv import KeyValue
from pydantic import BaseModel

from ratefleet.runtime.logs import get_logger
from ratefleet.runtime.streams import Remake, open_kv, stream_gone
from ratefleet.schemas import Config, Job, Result, Subjects
from ratefleet.schemas.result import ResponseInfo, Timings

log = get_logger("ratefleet.cache")
IO_TIMEOUT_S = 2.0  # a cache read or write slower than this is given up (a miss / not written)
HIT_HEADER = "x-ratefleet-cache"  # gateway answers: "hit", "miss" or "bypass"


def canonical_json(value: Any) -> str:
    """`value` as canonical JSON: object keys sorted, no whitespace (separators `,` `:`),
    non-ASCII kept as UTF-8 characters. Equal JSON values give equal text."""
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False)


# request headers that never change an answer (tracing, per-request ids, the client's own make):
# left out of the cache key; every other header is in it
UNKEYED_HEADERS = frozenset({"traceparent", "tracestate", "baggage", "x-request-id", "idempotency-key", "user-agent"})
UNKEYED_PREFIXES = ("x-stainless-",)  # the openai SDKs' client description and retry count


def cache_key(upstream: str, job: Job) -> str:
    """The cache key of `job` on `upstream` (its resolved name): hex SHA-256 of the canonical
    JSON of [upstream, method, path, query, body], where body is the JSON body, or the text
    body, or null, plus the request's headers (names in lower case) when it has any that can
    change the answer: everything but UNKEYED_HEADERS and the `x-stainless-*` ones. So the same
    body sent for another OpenAI project or organization (`OpenAI-Project`,
    `OpenAI-Organization`), or with another `OpenAI-Beta` / `anthropic-version`, is another
    entry (a gateway trial: a project B request was served project A's answer). A job without
    such headers keeps the key it had before headers counted. A valid NATS KV key (64 hex digits)."""
    request = job.request
    body: Any = request.json_body if request.json_body is not None else request.body
    parts: list[Any] = [upstream, request.method, request.path, request.query, body]
    headers = {name.lower(): value for name, value in request.headers.items()
               if name.lower() not in UNKEYED_HEADERS and not name.lower().startswith(UNKEYED_PREFIXES)}
    if headers:
        parts.append(headers)
    material = canonical_json(parts)
    return hashlib.sha256(material.encode("utf-8", "surrogatepass")).hexdigest()


def wants_lookup(job: Job) -> bool:
    """True when `job` asks for the cache, not to bypass it, and is not streamed."""
    return wants_write(job) and not job.cache_refresh


def wants_write(job: Job) -> bool:
    """True when a 2xx answer of `job` is to be cached: it has `cache_ttl_s` and is not
    streamed (`"stream": true`: its answer is relayed as it comes, not replayed)."""
    return job.cache_ttl_s is not None and not _streamed(job)


def _streamed(job: Job) -> bool:
    body = job.request.json_body
    return isinstance(body, dict) and body.get("stream") is True


class CacheEntry(BaseModel):
    """One cached answer: the upstream's response, the job that paid for it, and when the
    entry was written and stops being served (epoch seconds)."""

    response: ResponseInfo
    job_id: str
    stored_at: float
    expires_at: float


@dataclass
class CacheStats:
    """Counters of one process (plain ints; the metric is
    `ratefleet_cache_requests_total{result="hit|miss"}`). `writes`: entries stored;
    `errors`: lookups or writes NATS failed (counted as misses / not written)."""

    hits: int = 0
    misses: int = 0
    writes: int = 0
    errors: int = 0

    def as_dict(self) -> dict[str, int]:
        return {"hits": self.hits, "misses": self.misses, "writes": self.writes, "errors": self.errors}


class ResultCache:
    """The KV bucket `ratefleet_cache` (one value per key, max age `cache.max_ttl_s`)."""

    def __init__(self, js: JetStreamContext, subjects: Subjects, *, max_ttl_s: float, max_entry_bytes: int,
                 replicas: int = 1) -> None:
        """`replicas`: of the bucket when this creates it (`streams.replicas`)."""
        self.js, self.bucket, self.replicas = js, subjects.cache_bucket, replicas
        self.max_ttl_s, self.max_entry_bytes = max_ttl_s, max_entry_bytes
        self.stats = CacheStats()
        self._kv: KeyValue | None = None
        self._remake = Remake()

    @classmethod
    def from_config(cls, js: JetStreamContext, config: Config) -> ResultCache:
        return cls(js, Subjects(config.nats.prefix), max_ttl_s=config.cache.max_ttl_s,
                   max_entry_bytes=config.cache.max_entry_bytes, replicas=config.streams.replicas)

    async def _bucket(self) -> KeyValue:
        if self._kv is None:
            self._kv = await open_kv(self.js, self.bucket, ttl=self.max_ttl_s, replicas=self.replicas)
            self._remake.made()
        return self._kv

    def _settling(self) -> bool:
        """The bucket was found gone less than `streams.REBUILD_SETTLE_S` ago: it is not made anew
        yet (`streams.Remake`), so lookups miss and writes are skipped, without waiting."""
        return self._kv is None and self._remake.wait_s() > 0

    async def lookup(self, key: str, now: float | None = None) -> CacheEntry | None:
        """The live entry for `key`, or None (absent, expired, unreadable, NATS away).
        `now`: epoch seconds (default: the clock). Counts a hit or a miss."""
        now = time.time() if now is None else now
        if self._settling():
            self.stats.misses += 1
            return None
        entry = None
        try:
            with anyio.fail_after(IO_TIMEOUT_S):
                kv = await self._bucket()
                found = await kv.get(key)
            if found.value:
                entry = CacheEntry.model_validate_json(found.value)
        except (KeyNotFoundError, NotFoundError):
            pass
        except Exception as exc:  # noqa: BLE001 - a cache that cannot answer is a miss, never a failure
            self.stats.errors += 1
            log.warning("cache lookup failed; treated as a miss", error=type(exc).__name__)
        if entry is None or entry.expires_at <= now:
            self.stats.misses += 1
            return None
        self.stats.hits += 1
        return entry

    async def store(self, key: str, result: Result, ttl_s: float, now: float | None = None) -> bool:
        """Keep the 2xx answer of `result` under `key` for `ttl_s` seconds (capped at
        `max_ttl_s`). False (nothing written) for a non-2xx or bodyless answer, a body kept in
        the Object Store, an entry over `max_entry_bytes`, a NATS failure (logged), or a bucket
        found gone less than `streams.REBUILD_SETTLE_S` ago (made anew on the first write after)."""
        response = result.response
        if response is None or not 200 <= response.status < 300 or response.body_ref is not None:
            return False
        now = time.time() if now is None else now
        ttl = min(ttl_s, self.max_ttl_s)
        entry = CacheEntry(response=response, job_id=result.job_id, stored_at=now, expires_at=now + ttl)
        payload = entry.model_dump_json(by_alias=True).encode()
        if len(payload) > self.max_entry_bytes or self._settling():
            return False
        try:
            with anyio.fail_after(IO_TIMEOUT_S):
                await self._bucket()
                # per-message TTL (whole seconds, at least 1): the server drops the entry itself
                await self.js.publish(f"$KV.{self.bucket}.{key}", payload, msg_ttl=max(1, math.ceil(ttl)),
                                      timeout=IO_TIMEOUT_S)
        except Exception as exc:  # noqa: BLE001 - the answer is stored as the Result: the cache is a bonus
            self.stats.errors += 1
            if stream_gone(exc):  # NATS lost the bucket (a restart without its store, or deleted): made anew
                self._kv = None  # once it has been gone for REBUILD_SETTLE_S (`_settling`)
                self._remake.lost()
            log.warning("cache entry not written", error=type(exc).__name__)
            return False
        self.stats.writes += 1
        return True


def cached_result(job: Job, job_id: str, tier: str, entry: CacheEntry, *, submitted_at: float | None = None,
                  variant: str | None = None) -> Result:
    """The Result of `job` answered from `entry`: `succeeded`, `cached: true`, no attempt, no
    key, pool or worker.
    `submitted_at`: epoch seconds the job was stored (None: now)."""
    now = time.time()
    submitted = now if submitted_at is None else submitted_at
    return Result(job_id=job_id, status="succeeded", tier=tier, batch=job.batch, response=entry.response,
                  attempts=0, cached=True, variant=variant,
                  metadata=job.metadata,
                  timings=Timings(submitted_at=datetime.fromtimestamp(submitted, UTC), queued_ms=0.0,
                                  upstream_ms=0.0, total_ms=max(0.0, (now - submitted) * 1000)))
