"""429'd deliveries at intake: not attempts, not toward the poison limit, against their own
budget; how they are recorded beside the handbacks; the nak delay of a 429'd job."""

from __future__ import annotations

import json

import pytest
from nats.aio.msg import Msg

from ratefleet.dispatcher.shell.intake import Incoming, Refused, read_message
from ratefleet.runtime.handbacks import DeliveryCounts
from ratefleet.runtime.streams import consumer_config, tier_max_deliver
from ratefleet.schemas import Config
from ratefleet.workers.service import retry_delay

CONFIG = Config.model_validate({
    "upstreams": {"u": {"base_url": "http://127.0.0.1:9"}},
    "pools": {"p": {"keys": [{"id": "k1", "rps": 1, "secret": "env:UNUSED"}]}},
    "tiers": {"normal": {"max_attempts": 2, "max_rate_limited": 30}},
    "streams": {"max_deliver": 5},
})


def delivery(num_delivered: int) -> Msg:
    job = {"id": "j1", "request": {"method": "POST", "path": "/v1/x", "json": {}}}
    reply = f"$JS.ACK.RATEFLEET_JOBS.tier-normal.{num_delivered}.7.7.1700000000000000000.0"
    return Msg(_client=None, subject="ratefleet.jobs.normal", reply=reply, data=json.dumps(job).encode())


@pytest.mark.parametrize(
    "delivered, handbacks, rate_limited, expected",
    [
        (1, 0, 0, ("run", 1)),
        (3, 0, 0, ("attempts_exhausted", 3)),  # two non-429 deliveries before: max_attempts 2
        (12, 0, 11, ("run", 1)),  # eleven 429s: still the first attempt
        (14, 1, 11, ("run", 2)),
        (20, 0, 19, ("run", 1)),  # 20 deliveries, far past streams.max_deliver (5): not poison
        (6, 0, 0, ("poison_message", 6)),  # the poison rule for deliveries that are not 429s
        (9, 0, 3, ("poison_message", 6)),
        (31, 0, 30, ("rate_limited", 1)),  # the tier's 429 budget is spent
        (35, 0, 20, ("poison_message", 15)),  # the server's last delivery (5 + 30) always ends it
    ],
)
def test_intake_counts_429s_apart(delivered, handbacks, rate_limited, expected):
    verdict = read_message(delivery(delivered), "normal", CONFIG, handbacks, rate_limited)
    if isinstance(verdict, Incoming):
        assert ("run", verdict.attempt) == expected
        assert verdict.rate_limited == rate_limited and verdict.max_rate_limited == 30
    else:
        assert isinstance(verdict, Refused)
        assert (str(verdict.code), verdict.attempt) == expected


def test_consumer_leaves_room_for_the_429_budget():
    assert tier_max_deliver(CONFIG, "normal") == 35
    assert consumer_config(CONFIG, "normal").max_deliver == 35


@pytest.mark.parametrize(
    "value, counts",
    [(b"3", DeliveryCounts(3, 0)), (b"3 5", DeliveryCounts(3, 5)), (b"", DeliveryCounts(0, 0)),
     (b"0 12", DeliveryCounts(0, 12))],
)
def test_delivery_counts_round_trip(value, counts):
    assert DeliveryCounts.parse(value) == counts
    assert DeliveryCounts.parse(counts.encode()) == counts
    if counts.rate_limited == 0:
        assert counts.encode() == str(counts.handbacks).encode()  # the old form, for old readers


@pytest.mark.parametrize("value", [b"x", b"1 2 3", b"1 y"])
def test_malformed_delivery_counts_are_refused(value):
    with pytest.raises(ValueError):
        DeliveryCounts.parse(value)


def test_a_429d_job_waits_a_little_longer_each_time_never_long():
    delays = [retry_delay("rate_limited", 1, 0.0, n) for n in range(1, 10)]
    assert delays == [0.25, 0.5, 1.0, 2.0, 4.0, 5.0, 5.0, 5.0, 5.0]
    assert retry_delay("rate_limited", 1, 600.0, 1) == 0.25  # one key's Retry-After is that key's wait


def test_status_shows_effective_and_configured_rate_per_key():
    from rich.console import Console

    from ratefleet.status_view import render_status

    console = Console(record=True, width=200)
    render_status({"leader": "d1", "keys": {"k1": {"pool": "p", "rps": 20, "effective_rps": 2.004, "tokens": 0.5,
                                                   "cost_per_minute": 90000, "effective_cost_per_minute": 900.0}}},
                  console)
    text = console.export_text()
    assert "req/s effective / configured" in text and "2.004 / 20" in text and "900 / 90000 cost/min" in text
