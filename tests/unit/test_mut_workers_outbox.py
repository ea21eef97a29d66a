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


async def test_reports_are_published_at_once_when_a_round_reaches_max_bytes():
    published: list[bytes] = []

    async def publish(payload: bytes) -> None:
        published.append(payload)

    outbox = ReportOutbox(publish, max_bytes=100)
    reports = [json.dumps({"n": n, "pad": "x" * 11}).encode() for n in range(5)]  # 30 bytes each, 31 counted
    assert {len(report) for report in reports} == {30}
    async with anyio.create_task_group() as tg:
        for report in reports:
            tg.start_soon(outbox.send, report)
    batches = [json.loads(payload) for payload in published]
    # 31 + 31 + 31 = 93 < 100; the fourth makes 124: those four go at once, the fifth with its round
    assert [[entry["n"] for entry in batch] if isinstance(batch, list) else [batch["n"]] for batch in batches] == [
        [0, 1, 2, 3], [4]]
    assert outbox.pending == 0
