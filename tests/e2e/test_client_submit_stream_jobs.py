"""`Client.submit_stream` takes what `submit` takes. Before: a Job model without an id (as
`Job.model_validate(...)` builds one) failed inside nats-py with "AttributeError: 'NoneType'
object has no attribute 'strip'" (a None Nats-Msg-Id header), and a dict job with "'dict' object
has no attribute 'to_json'"; an invalid one was not reported as JobInvalid. Real nats-server."""

from __future__ import annotations

import pytest

from ratefleet import Client, Job, JobInvalid
from ratefleet.runtime.streams import ensure_topology
from ratefleet.schemas.config import parse_config

pytestmark = [pytest.mark.anyio, pytest.mark.timeout(60)]
JOB = {"request": {"path": "/v1/chat/completions", "json": {"model": "m"}}}


async def test_models_without_ids_and_dicts_are_validated_given_ids_and_stored(nats_server):
    async with await Client.connect(nats_server.url) as client:
        await ensure_topology(client.js, parse_config({}))
        given = [Job.model_validate(JOB), JOB, {**JOB, "id": "mine-1"}, Job.model_validate({**JOB, "id": "mine-2"})]
        stored = [item async for item in client.submit_stream(given, "guest")]
        ids = [item.job.id for item in stored]
        assert len(set(ids)) == 4 and ids[2:] == ["mine-1", "mine-2"] and all(ids)
        assert [item.duplicate for item in stored] == [False] * 4
        with pytest.raises(JobInvalid, match="request"):
            async for _ in client.submit_stream([{"request": {}}], "guest"):
                pass
