"""What an operator reads when hand-back accounting fails (ratefleet/runtime/handbacks.py):
the warning of a delivery not recorded names the error and whether it was a 429, and the
debug line of an unread bucket names the error. Both are the only trace of a delivery that
then counts as an attempt. Over a bucket that cannot be opened; deterministic, no server.
"""

from __future__ import annotations

import pytest
from structlog.testing import capture_logs

from ratefleet.runtime.handbacks import DeliveryCounts, Handbacks

pytestmark = pytest.mark.anyio


class AwayJetStream:
    """A JetStream context whose KV bucket cannot be opened (NATS away)."""

    async def key_value(self, bucket):
        raise ConnectionError("bucket away")


@pytest.mark.parametrize("rate_limited", [False, True])
async def test_a_delivery_not_recorded_is_a_warning_naming_the_error_and_the_kind(rate_limited):
    with capture_logs() as logs:
        await Handbacks(AwayJetStream(), "ratefleet_handbacks").add(7, rate_limited=rate_limited)
    [line] = logs
    assert line["log_level"] == "warning"
    assert "not recorded" in line["event"].lower() and "attempt" in line["event"].lower()
    assert line["error"] == "ConnectionError" and line["rate_limited"] is rate_limited


async def test_an_unread_bucket_is_logged_with_its_error_and_reads_as_zeros():
    with capture_logs() as logs:
        assert await Handbacks(AwayJetStream(), "ratefleet_handbacks").counts(7) == DeliveryCounts()
    [line] = logs
    assert line["log_level"] == "debug" and "not read" in line["event"].lower()
    assert line["error"] == "ConnectionError"
