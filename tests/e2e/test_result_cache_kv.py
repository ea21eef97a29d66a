"""ResultCache against a real nats-server: entries live in the KV bucket with a per-message
TTL and their own expiry; only fitting 2xx answers are written (ratefleet/runtime/cache.py)."""

from __future__ import annotations

import asyncio
import time

import nats
import pytest

from ratefleet.runtime.cache import ResultCache, cache_key
from ratefleet.schemas import Job, Result, Subjects
from ratefleet.schemas.result import ResponseInfo

pytestmark = [pytest.mark.timeout(60), pytest.mark.anyio]
JOB = Job.model_validate({"request": {"path": "/v1/embeddings", "json": {"input": "x"}}, "cache_ttl_s": 30})


def result(status: int, body: object = None) -> Result:
    return Result(job_id="j1", status="succeeded" if status < 300 else "failed",
                  response=ResponseInfo(status=status, json={"answer": body or 1}))


async def test_entries_hit_until_their_expiry_and_only_2xx_fitting_answers_are_written(nats_server):
    nc = await nats.connect(nats_server.url)
    try:
        cache = ResultCache(nc.jetstream(), Subjects(), max_ttl_s=3600, max_entry_bytes=4096)
        key = cache_key("u", JOB)
        assert await cache.lookup(key) is None
        assert await cache.store(key, result(200), ttl_s=30)
        entry = await cache.lookup(key)
        assert entry is not None and entry.response.json_body == {"answer": 1} and entry.job_id == "j1"
        assert await cache.lookup(key, now=time.time() + 31) is None  # past expires_at: a miss
        assert not await cache.store("k400", result(400), ttl_s=30) and await cache.lookup("k400") is None
        assert not await cache.store("kbig", result(200, "x" * 5000), ttl_s=30)  # over max_entry_bytes
        assert await cache.store("kshort", result(200), ttl_s=1)
        info = await nc.jetstream().stream_info("KV_ratefleet_cache")
        assert info.config.max_age == 3600 and info.config.allow_msg_ttl
        await asyncio.sleep(2.2)
        assert await cache.lookup("kshort") is None
        # the server dropped the message itself (Nats-TTL), not only our expiry check
        with pytest.raises(Exception):  # noqa: B017 - nats-py raises KeyNotFoundError or NotFoundError
            await (await nc.jetstream().key_value("ratefleet_cache")).get("kshort")
        assert cache.stats.as_dict() == {"hits": 1, "misses": 4, "writes": 2, "errors": 0}
    finally:
        await nc.close()
