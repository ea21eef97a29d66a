"""A batch whose record is deleted while it runs says so, not "another sweep carries it on"
(no sweep can find a batch without its record). The KeyError of BatchBook.update comes out of
the runner's task group wrapped in an ExceptionGroup (a reviewer found the first version's
`except KeyError` never ran)."""

from __future__ import annotations

import anyio
import pytest
from structlog.testing import capture_logs

from ratefleet.gateway.batch_runner import BatchRunner

pytestmark = pytest.mark.anyio


class Lease:
    async def claim(self, batch_id: str) -> bool:
        return True

    async def keep(self, batch_id: str, scope) -> None:
        await anyio.sleep(60)

    async def release(self, batch_id: str) -> None:
        pass


@pytest.mark.parametrize("error, says", [(KeyError("batch_1"), "its record is gone"),
                                         (RuntimeError("other"), "another sweep carries it on")])
async def test_a_record_gone_mid_run_is_named_and_other_failures_left_to_a_sweep(error, says):
    runner = BatchRunner.__new__(BatchRunner)
    runner._running, runner.lease = set(), Lease()

    async def _run(batch_id, tmp):
        raise error

    runner._run = _run
    with capture_logs() as logs:
        await runner.run("batch_1")
    assert [entry["event"] for entry in logs if "batch stopped" in entry["event"]][0].count(says) == 1, logs
    assert runner._running == set()
