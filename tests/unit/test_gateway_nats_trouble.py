"""The gateway when NATS goes away or stops answering after a job was handed to it (a gateway
trial, nats-server paused with SIGSTOP): a plain request got 502 `gateway_error` without
Retry-After, a streamed one waited 33 s against the caller's 20 s timeout."""

from __future__ import annotations

import asyncio
import json
import time
import types

import pytest

from ratefleet.gateway.app import Gateway
from ratefleet.gateway.errors import GatewayRefusal
from ratefleet.schemas import Job
from ratefleet.schemas.errors import NatsUnavailable

pytestmark = pytest.mark.anyio
CALLER = types.SimpleNamespace(name="app", tier="vip", timeout_s=0.5)


def job(stream: bool) -> Job:
    return Job.model_validate({"id": "job-1", "request": {"path": "/v1/chat/completions",
                                                         "json": {"model": "m", "messages": [], "stream": stream}}})


class Sub:
    async def unsubscribe(self) -> None:
        pass


class PausedNats:
    """A client whose NATS does not answer: request raises NatsError, a store never returns."""

    def __init__(self) -> None:
        self.nc = types.SimpleNamespace(new_inbox=lambda: "_INBOX.x", subscribe=self._subscribe)

    async def _subscribe(self, subject):
        return Sub()

    async def request(self, job, tier, timeout):
        raise NatsUnavailable("NATS did not answer in time while reading a stored result (TimeoutError)")

    async def submit_for_reply(self, job, tier, reply_to):
        await asyncio.sleep(3600)


def gateway() -> Gateway:
    made = Gateway.__new__(Gateway)
    made.client = PausedNats()  # type: ignore[assignment]
    made.stop_at = None
    return made


async def test_a_request_nats_does_not_answer_gets_503_with_retry_after_not_502():
    with pytest.raises(GatewayRefusal) as refused:
        await gateway()._run(job(False), CALLER)  # type: ignore[arg-type]
    got = refused.value
    assert (got.status, got.code, got.retry_after_s, got.sdk_retry) == (503, "service_unavailable", 2.0, False)
    assert got.job_id == "job-1" and "may or may not have been stored" in json.loads(got.body())["error"]["message"]


async def test_a_stream_whose_store_nats_does_not_confirm_ends_at_the_callers_timeout():
    started = time.monotonic()
    with pytest.raises(GatewayRefusal) as refused:
        await gateway()._run(job(True), CALLER)  # type: ignore[arg-type]
    assert time.monotonic() - started < 3.0  # the caller's 0.5 s, not the store's own retries
    got = refused.value
    assert (got.status, got.code) == (504, "job_timeout")
    assert "NATS did not confirm storing it in time" in json.loads(got.body())["error"]["message"]


async def test_a_nats_error_that_is_no_outage_keeps_its_502_and_its_text():
    from ratefleet.schemas.errors import NatsError as Plain

    class Refusing(PausedNats):
        async def request(self, job, tier, timeout):
            raise Plain("stream RATEFLEET_JOBS does not exist")

    made = gateway()
    made.client = Refusing()  # type: ignore[assignment]
    with pytest.raises(GatewayRefusal) as refused:
        await made._run(job(False), CALLER)  # type: ignore[arg-type]
    assert (refused.value.status, refused.value.code) == (502, "gateway_error")
    assert "does not exist" in json.loads(refused.value.body())["error"]["message"]
