"""The Client serialises a job once: the dump that proves it can be sent is the payload sent
(`checked_job`). `submit_many` dumped each job three times (the check, the size check before
anything is sent, the publish), `submit` and `request` twice: 33 µs a dump for a 32 KiB prompt.
Against a real nats-server; counted, not timed."""

from __future__ import annotations

import json

import nats
import pytest
from test_closed_between_steps import recording_client

from ratefleet import JobInvalid, NatsUnavailable, RequestTimeout
from ratefleet.runtime.pubpipe import PublishPipe
from ratefleet.schemas import Job, Subjects

pytestmark = [pytest.mark.anyio, pytest.mark.timeout(60)]
JOB = {"request": {"path": "/v1/chat/completions", "json": {"model": "m", "messages": [{"role": "user",
                                                                                         "content": "hé"}]}}}


@pytest.fixture
def dumps(monkeypatch) -> list[str | None]:
    """The id of every job Job.to_json serialises."""
    seen: list[str | None] = []
    to_json = Job.to_json

    def counting(self: Job) -> bytes:
        seen.append(self.id)
        return to_json(self)

    monkeypatch.setattr(Job, "to_json", counting)
    return seen


async def test_submit_many_and_submit_dump_each_job_once(nats_server, dumps):
    client, _ = await recording_client(nats_server.url)
    async with client:
        ids = await client.submit_many([JOB, {**JOB, "id": "own-1"}, Job.model_validate(JOB)], "guest", batch="b1")
        assert sorted(dumps, key=str) == sorted(ids) and len(ids) == 3
        dumps.clear()
        one = await client.submit({**JOB, "id": "own-2"}, "guest")
        assert dumps == [one]
        stored = [json.loads(m.data) async for m in _jobs(client, 4)]
    # what was sent is the job, with its id and batch
    assert {s["id"] for s in stored} == {*ids, one} and {s.get("batch") for s in stored} == {"b1", None}
    assert all(s["request"]["json"]["messages"][0]["content"] == "hé" for s in stored)


async def test_submit_stream_dumps_a_job_model_with_an_id_once_and_a_dict_once(nats_server, dumps):
    client, _ = await recording_client(nats_server.url)
    async with client:
        model = Job.model_validate({**JOB, "id": "own-3"})
        stored = [s.job.id async for s in client.submit_stream([model, JOB], "guest")]
    assert sorted(dumps) == sorted(stored) and len(stored) == 2


async def _jobs(client, n: int):
    """The first `n` messages of the JOBS stream, by sequence (a work queue takes no ordered consumer)."""
    stream = Subjects().jobs_stream
    for seq in range(1, n + 1):
        yield await client.js.get_msg(stream, seq)


async def test_a_request_dumps_its_job_once(nats_server, dumps):
    """(no dispatcher runs: the request times out after storing the job, which is all counted here)"""
    client, _ = await recording_client(nats_server.url)
    async with client:
        with pytest.raises(RequestTimeout):
            await client.request(JOB, "guest", timeout=0.5)
        [stored] = [json.loads(m.data) async for m in _jobs(client, 1)]
    assert dumps == [stored["id"]]


@pytest.mark.parametrize("items", [
    [(Job.model_validate({**JOB, "id": "t1"}), b"not json")],  # a pair: not taken for a checked job
    list({"a": JOB}.items()),
])
async def test_submit_stream_refuses_what_is_not_a_job_and_sends_nothing(nats_server, items):
    client, sent = await recording_client(nats_server.url)
    async with client:
        with pytest.raises(JobInvalid):
            [s async for s in client.submit_stream(items, "guest")]
    assert not [subject for subject in sent if subject.startswith("ratefleet.jobs.")]


async def test_submit_many_says_how_many_were_stored_when_nats_fails_midway(nats_server, monkeypatch):
    """A raw nats-py error inside the pipeline is ours (NatsUnavailable) before submit_many adds
    the count of jobs stored, as it was when submit_many went through submit_stream."""
    client, _ = await recording_client(nats_server.url)
    publish = PublishPipe.publish
    calls = 0

    async def failing(self, *args, **kwargs):
        nonlocal calls
        calls += 1
        if calls == 3:
            raise nats.errors.ConnectionDrainingError()
        return await publish(self, *args, **kwargs)

    monkeypatch.setattr(PublishPipe, "publish", failing)
    async with client:
        with pytest.raises(NatsUnavailable, match=r"\(2 of 5 jobs stored before that\)"):
            await client.submit_many([JOB] * 5, "guest", concurrency=1)
