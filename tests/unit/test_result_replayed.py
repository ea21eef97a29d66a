"""`ratefleet result ID` of a job that was replayed names the replay (an operations trial: after
`dlq replay --given-up` succeeded, `result` of an original id said `failed` with no hint of
`<id>-r<hex>`, and the dead letter that held it was gone). Real nats-server, the Results stored
as a worker stores them, the CLI as a user runs it."""

from __future__ import annotations

import subprocess
import sys

import nats
import pytest

from ratefleet.runtime.store import store_result
from ratefleet.runtime.streams import ensure_topology
from ratefleet.schemas import ErrorCode, ErrorInfo, Result, Subjects
from ratefleet.schemas.config import parse_config

pytestmark = [pytest.mark.anyio, pytest.mark.timeout(60)]


def cli(url: str, job_id: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "ratefleet", "result", job_id, "--nats", url],
                          capture_output=True, text=True, timeout=30)


async def test_result_of_a_replayed_job_names_its_latest_replay(nats_server):
    nc = await nats.connect(nats_server.url)
    js, subjects = nc.jetstream(), Subjects()
    try:
        await ensure_topology(js, parse_config({}))
        gave_up = ErrorInfo(code=ErrorCode.ATTEMPTS_EXHAUSTED, message="gave up after 3 attempts; last: HTTP 503")
        await store_result(js, subjects, Result(job_id="b7-14-aa", status="failed", tier="normal", batch="b7",
                                                error=gave_up, attempts=3))
        await store_result(js, subjects, Result(job_id="b7-15-bb", status="failed", tier="normal", batch="b7",
                                                error=gave_up, attempts=3))  # not replayed
        await store_result(js, subjects, Result(job_id="b7-14-aa-r1a2b3c4", status="failed", tier="normal",
                                                batch="b7", error=gave_up, metadata={"replay_of": "b7-14-aa"}))
        await store_result(js, subjects, Result(job_id="b7-14-aa-r1a2b3c4-r5d6e7f8", status="succeeded",
                                                tier="normal", batch="b7",
                                                metadata={"replay_of": "b7-14-aa-r1a2b3c4"}))
    finally:
        await nc.close()
    replayed = cli(nats_server.url, "b7-14-aa")
    assert replayed.returncode == 1, replayed.stderr  # the Result asked for, as stored
    assert Result.model_validate_json(replayed.stdout).job_id == "b7-14-aa"
    assert ("note: job b7-14-aa was replayed (`ratefleet dlq replay`); its latest replay b7-14-aa-r1a2b3c4-r5d6e7f8 "
            "succeeded: `ratefleet result b7-14-aa-r1a2b3c4-r5d6e7f8`") in replayed.stderr
    alone = cli(nats_server.url, "b7-15-bb")
    assert alone.returncode == 1 and "replayed" not in alone.stderr
