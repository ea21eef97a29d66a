"""Client.stored_result reads one job's Result by its id: an id or batch that is no subject
token is refused before anything is read. Real nats-server, no fleet."""

from __future__ import annotations

import pytest

from ratefleet import Client
from ratefleet.runtime.streams import ensure_topology
from ratefleet.schemas.config import parse_config

pytestmark = [pytest.mark.anyio, pytest.mark.timeout(60)]



@pytest.mark.parametrize("job_id, batch", [("*", None), (">", None), ("a.b", None), ("", None),
                                           ("j-theirs", "*"), ("j-theirs", ">")])
async def test_stored_result_never_answers_with_another_jobs_result(nats_server, job_id, batch):
    """A service handing a caller's job id to stored_result (GET /jobs/{id}) answered `*` with
    the last Result of any job (another user's answer) and `>` with a NATS error; a batch `*`
    with the job's Result in whatever batch. Now ValueError before anything is read."""
    from ratefleet.schemas import Result

    async with await Client.connect(nats_server.url) as client:
        await ensure_topology(client.js, parse_config({}))
        theirs = Result.model_validate({"job_id": "j-theirs", "status": "succeeded", "tier": "vip", "batch": "b1",
                                        "attempts": 1})
        await client.js.publish("ratefleet.results.b1.j-theirs", theirs.model_dump_json().encode())
        try:
            got = await client.stored_result(job_id, batch)
        except ValueError:
            return
        pytest.fail(f"stored_result({job_id!r}, {batch!r}) answered {got and got.job_id!r}")
