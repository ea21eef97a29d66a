"""A worker one config revision behind the leader: the leader (new revision) assigns a job of
an upstream the worker does not know yet. The worker hands it back unrun and uncounted (a
hand-back, as for a key it does not know yet), instead of refusing it as a forged pairing,
which naks the delivery so that it counts toward `streams.max_deliver` (poison_message)."""

from __future__ import annotations

import pytest
from structlog.testing import capture_logs
from test_bite_worker import ACK, assignment, make_worker, record_handbacks, take

pytestmark = pytest.mark.anyio


async def test_an_upstream_of_a_newer_revision_is_handed_back_not_refused(monkeypatch):
    worker, nc, finisher = make_worker(monkeypatch)
    handed = record_handbacks(worker)
    lagging = assignment(upstream="fresh").model_copy(update={"upstream": "fresh"})
    executor = await take(worker, lagging)
    assert executor.calls == 0 and finisher.finished == []
    assert handed == [(7, ACK)], "not handed back: the delivery was nak'd and counts toward poison"
    assert ("nak", ACK, 1.0) not in finisher.log
    assert [(r.kind, r.terminal) for r in nc.reports()] == [("none", False)]


async def test_a_key_paired_with_another_known_upstream_is_still_refused(monkeypatch):
    """A known upstream the key's pools do not serve: the forged-pairing refusal (a nak that
    counts), not a hand-back. Pool `p` names its upstream, as a config with two upstreams must
    (else `Config.pool_upstream` raises and the worker's "failed unexpectedly" path naks too,
    and the test would pass without reaching the check)."""
    worker, nc, finisher = make_worker(monkeypatch)
    worker.config.upstreams["v"] = worker.config.upstreams["u"].model_copy()
    worker.config.pools["p"] = worker.config.pools["p"].model_copy(update={"upstream": "u"})
    assert worker.config.pool_upstream("p") == "u"
    handed = record_handbacks(worker)
    forged = assignment(upstream="v").model_copy(update={"upstream": "v"})
    with capture_logs() as logs:
        executor = await take(worker, forged)
    assert executor.calls == 0 and handed == [] and finisher.finished == []
    assert ("nak", ACK, 1.0) in finisher.log
    refusals = [e for e in logs if e["event"].startswith("assignment refused")]
    assert [e["problem"] for e in refusals] == ["key 'k1' belongs to pools of ['u'], not of 'v'"]
    assert not [e for e in logs if e["log_level"] in ("exception", "critical") or "unexpected" in e["event"]]
