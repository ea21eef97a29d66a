"""The outbox's size bound (workers/outbox.py): reports of one loop iteration are published
together until they reach `max_bytes`, then at once, so one message never grows past the
bound whatever number of jobs end in one iteration. Deterministic, no server.
"""

from __future__ import annotations

import json

import anyio
import pytest

from ratefleet.workers.outbox import ReportOutbox

pytestmark = pytest.mark.anyio


@pytest.mark.parametrize("max_bytes, batches", [
    (100, [[0, 1, 2, 3], [4]]),  # 31 + 31 + 31 = 93 < 100; the fourth makes 124: four go at once
    (93, [[0, 1, 2], [3, 4]]),   # exactly at the bound: published at once
])
async def test_reports_are_published_at_once_when_a_round_reaches_max_bytes(max_bytes, batches):
    published: list[bytes] = []

    async def publish(payload: bytes) -> None:
        published.append(payload)

    outbox = ReportOutbox(publish, max_bytes=max_bytes)
    reports = [json.dumps({"n": n, "pad": "x" * 11}).encode() for n in range(5)]  # 30 bytes each, 31 counted
    assert {len(report) for report in reports} == {30}
    async with anyio.create_task_group() as tg:
        for report in reports:
            tg.start_soon(outbox.send, report)
    assert [[entry["n"] for entry in batch] if isinstance(batch, list) else [batch["n"]]
            for batch in (json.loads(payload) for payload in published)] == batches
    assert outbox.pending == 0


async def test_a_failed_publish_is_a_warning_naming_the_error_and_the_count():
    from structlog.testing import capture_logs

    async def publish(payload: bytes) -> None:
        raise ConnectionError("connection closed")

    outbox = ReportOutbox(publish)
    with capture_logs() as logs:
        async with anyio.create_task_group() as tg:
            for n in range(3):
                tg.start_soon(outbox.send, json.dumps({"n": n}).encode())
    [line] = logs
    assert line["log_level"] == "warning" and line["event"] == "outcome report not sent"
    assert line["error"] == "ConnectionError" and line["reports"] == 3
    assert outbox.pending == 0  # dropped: the next heartbeat tells the leader those calls ended
