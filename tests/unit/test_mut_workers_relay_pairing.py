"""Two small worker rules (workers/relay.py, workers/pairing.py): a streamed chunk that cannot be
relayed is logged with its error and does not fail the paid call; an assignment whose raw job
names its upstream with something other than a string is not refused as a mispairing (it ends
`invalid` after one delivery instead of circling until `poison_message`). Deterministic, no server.
"""

from __future__ import annotations

import pytest
from structlog.testing import capture_logs

from ratefleet.schemas import Job
from ratefleet.schemas.config import parse_config
from ratefleet.workers.pairing import pairing_problem
from ratefleet.workers.relay import chunk_relay

pytestmark = pytest.mark.anyio


class AwayNats:
    def __init__(self):
        self.tried: list[tuple[str, bytes, dict]] = []

    async def publish(self, subject, payload=b"", headers=None):
        self.tried.append((subject, payload, headers))
        raise ConnectionError("connection closed")


async def test_a_chunk_not_relayed_is_a_warning_naming_the_error():
    nc = AwayNats()
    relay = chunk_relay(nc, "_INBOX.abc.r", 2, Job.model_validate(
        {"request": {"path": "/v1/x", "json": {"stream": True}}}))
    with capture_logs() as logs:
        await relay(b"data: 1\n\n")  # does not raise: the Result still carries the whole answer
    assert nc.tried == [("_INBOX.abc.r.s", b"data: 1\n\n", {"Ratefleet-Attempt": "2"})]
    [line] = logs
    assert line["log_level"] == "warning" and line["event"] == "streamed chunk not relayed"
    assert line["error"] == "ConnectionError"


@pytest.mark.parametrize("named", [5, None, ["u"], {"u": 1}])
def test_a_raw_job_naming_no_string_upstream_is_judged_by_the_default(named):
    config = parse_config({"upstreams": {"u": {"base_url": "https://api.example.test"}},
                           "pools": {"p": {"keys": [{"id": "k1", "secret": "env:X", "rps": 1}]}}})
    assert pairing_problem(config, "k1", "u", {"upstream": named}) is None
