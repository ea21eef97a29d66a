"""`Client.queued_job` tells "gone" (JetStream's 404) from "no answer" (NATS restarting, a
timeout), and a batch stop waits for a job it could not read instead of taking it for done.

Before, every failed read was "gone": a cancelled batch's stop stopped waiting for a job still
being called (the batch was finalized without its Result), or left a queued one undeleted."""

from __future__ import annotations

import time
import types

import nats.errors
import pytest
from structlog.testing import capture_logs

from ratefleet import Client
from ratefleet.gateway.batch_runner import BatchRunner
from ratefleet.runtime.streams import ensure_topology
from ratefleet.schemas import Job
from ratefleet.schemas.config import parse_config
from ratefleet.schemas.errors import NatsUnavailable

pytestmark = pytest.mark.anyio
JOB = {"request": {"method": "POST", "path": "/v1/chat/completions", "json": {"model": "m"}}}


async def test_a_read_without_an_answer_is_asked_again_and_a_deleted_one_is_gone(nats_server):
    async with await Client.connect(nats_server.url) as client:
        await ensure_topology(client.js, parse_config({}))
        await client.submit_many([{**JOB, "id": f"j{i}", "batch": "B"} for i in range(2)], "normal")
        real_get, failures = client.js.get_msg, [3]

        async def get_msg(stream, seq, **kwargs):  # the first reads time out, as while NATS restarts
            if failures[0]:
                failures[0] -= 1
                raise TimeoutError
            return await real_get(stream, seq, **kwargs)

        client.js.get_msg = get_msg  # type: ignore[method-assign]
        job = await client.queued_job(1)
        assert job is not None and job.id == "j0" and failures == [0]
        await client.js.delete_msg(client.subjects.jobs_stream, 2)
        assert await client.queued_job(2) is None  # 404: gone, at once
        failures[0] = 1000
        started = time.monotonic()
        with pytest.raises(Exception) as raised:
            await client.queued_job(1, retry_for=1.0)
        assert not isinstance(raised.value, AssertionError) and time.monotonic() - started < 10


async def test_a_batch_stop_waits_for_a_job_it_could_not_read(monkeypatch):
    deleted: list[int] = []

    class Unreadable:
        """seq 2 cannot be read (no answer); seq 1 is the batch's queued job; seq 3 another batch's."""

        async def queued_job(self, seq, **_):
            if seq == 2:
                raise TimeoutError
            return Job.model_validate({**JOB, "id": f"j{seq}", "batch": "B" if seq == 1 else "other"})

    client = Unreadable()
    client.js = types.SimpleNamespace(  # type: ignore[attr-defined]
        stream_info=_answer(types.SimpleNamespace(state=types.SimpleNamespace(last_seq=3))),
        consumer_info=_answer(types.SimpleNamespace(delivered=types.SimpleNamespace(stream_seq=0))))
    client.subjects = types.SimpleNamespace(jobs_stream="JOBS")  # type: ignore[attr-defined]

    async def delete(js, stream, seq):
        deleted.append(seq)

    runner = types.SimpleNamespace(client=client, stop_wait_s=1.0, poll_s=0.1)
    monkeypatch.setattr("ratefleet.gateway.batch_runner.delete_message", delete)
    started = time.monotonic()
    with capture_logs() as logs:
        await BatchRunner._stop_queued(runner, "B", "normal", types.SimpleNamespace(first_seq=1))
    waited = time.monotonic() - started
    assert deleted == [1]  # the batch's queued job; not the unreadable one, not another batch's
    assert waited >= 1.0  # waited (stop_wait_s) for the one it could not read
    assert any(e["event"] == "batch stop: a queued job could not be read; waiting for it" and e["seq"] == 2
               for e in logs)


def _answer(value):
    async def answer(*args, **kwargs):
        return value
    return answer


async def test_a_request_with_its_own_id_is_not_sent_when_its_result_lookup_gets_no_answer(nats_server):
    """The id may have its Result (past the dedup window, or refused over rpc): sent on a lookup
    that got no answer, the job ran (and was paid) again. Now nothing is sent and the caller
    gets NatsUnavailable within the request's timeout, to send it again."""
    async with await Client.connect(nats_server.url) as client:
        await ensure_topology(client.js, parse_config({}))

        async def no_answer(stream, subject, **kwargs):
            raise nats.errors.TimeoutError

        client.js.get_last_msg = no_answer  # type: ignore[method-assign]
        started = time.monotonic()
        with pytest.raises(NatsUnavailable):
            await client.request({**JOB, "id": "mine-1"}, "normal", timeout=2)
        assert time.monotonic() - started < 8
        info = await client.js.stream_info(client.subjects.jobs_stream)
        assert info.state.messages == 0
