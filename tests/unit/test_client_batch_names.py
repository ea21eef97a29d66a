"""A batch name the fleet cannot use is refused by the Client before anything is sent or read.
Before: `submit(job, batch="a.b")` (also `*`, `>`, `_`, "") returned an id; `as_job` set the
batch with pydantic's model_copy, which does not validate, so the job was stored and ended
`invalid` in the fleet with no batch, its Result never in the batch the caller followed; and
`results("*")` read every batch's Results (305 on a trial fleet), `results(">")` raised a NATS
error."""

from __future__ import annotations

import pytest

from ratefleet import Job, JobInvalid
from ratefleet.client import Client, as_job

JOB = {"request": {"path": "/v1/chat/completions", "json": {"model": "m"}}}


@pytest.mark.parametrize("batch", ["a.b", "*", ">", "_", "", "x y", "b" * 129])
def test_a_job_is_not_given_a_batch_name_the_fleet_refuses(batch):
    with pytest.raises(JobInvalid, match="batch"):
        as_job(JOB, batch=batch)
    with pytest.raises(JobInvalid, match="batch"):
        as_job(Job.model_validate(JOB), batch=batch)


def test_a_valid_batch_name_is_kept_and_a_job_keeps_its_own():
    assert as_job(JOB, batch="nightly-0412").batch == "nightly-0412"
    assert as_job({**JOB, "batch": "mine"}, batch="other").batch == "mine"


@pytest.mark.anyio
@pytest.mark.parametrize("batch", ["*", ">", "a.b", ""])
async def test_results_refuses_a_wildcard_or_no_batch_name(batch):
    client = Client.__new__(Client)  # refused before the connection is touched
    with pytest.raises(ValueError, match="batch must be a batch name"):
        async for _ in client.results(batch):
            pass
