"""A request for a job id that is already stored, while no dispatcher runs: its follow-up
publish to the dispatchers' rpc endpoint (client_request `_follow_over_rpc`) has no responder,
and the server's 503 status lands in the request's own reply inbox. A break-it trial: 84 of 86
retries with one id raised pydantic's ValidationError within 2 ms ("Invalid JSON: EOF while
parsing", input b''), and `ratefleet request` exited 1 with "unexpected ValidationError". The
request now waits out its timeout and says why (real nats-server, streams made, no dispatcher)."""

from __future__ import annotations

import pytest

from ratefleet import Client, RequestTimeout
from ratefleet.runtime.streams import ensure_topology
from ratefleet.schemas.config import parse_config

pytestmark = [pytest.mark.anyio, pytest.mark.timeout(60)]
JOB = {"id": "retried-1", "request": {"path": "/v1/chat/completions", "json": {"model": "m"}}}


async def test_a_retry_while_no_dispatcher_runs_times_out_saying_why(nats_server):
    async with await Client.connect(nats_server.url) as client:
        await ensure_topology(client.js, parse_config({}))
        with pytest.raises(RequestTimeout):  # stored, nothing runs it
            await client.request(JOB, "vip", timeout=0.5)
        for _ in range(3):  # the retries: a duplicate each, followed over rpc, where nothing answers
            with pytest.raises(RequestTimeout) as caught:
                await client.request(JOB, "vip", timeout=0.6)
            assert caught.value.reason == "no_dispatcher", caught.value
            assert caught.value.job_id == "retried-1"
        assert client.replies.waiting == 0
