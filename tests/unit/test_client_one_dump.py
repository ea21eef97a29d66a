"""The Client serialises a job once: the dump that proves it can be sent is the payload sent
(`checked_job`). `submit_many` dumped each job three times (the check, the size check before
anything is sent, the publish), `submit` and `request` twice: 33 µs a dump for a 32 KiB prompt.
Against a real nats-server; counted, not timed."""

from __future__ import annotations

import json

import pytest
from test_closed_between_steps import recording_client

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
