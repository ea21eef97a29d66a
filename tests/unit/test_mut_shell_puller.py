"""A tier's pull inbox (dispatcher/shell/puller.py) over the in-memory bus: pull requests out,
pull statuses and deliveries in as events, with the lookups a redelivery or a cached job
needs, and what it does at step-down. No nats-server (tests/e2e run it over NATS)."""

from __future__ import annotations

import json
import time
from datetime import UTC, datetime
from types import SimpleNamespace

import anyio
import pytest

from ratefleet.dispatcher.core.delivery import Incoming, Refused
from ratefleet.dispatcher.core.events import JobDelivered, PullStatus
from ratefleet.dispatcher.shell.memory_bus import MemoryBus, MemoryMessage
from ratefleet.dispatcher.shell.puller import DRAIN_S, STORED_LOOKUP_S, TierInbox
from ratefleet.runtime.handbacks import DeliveryCounts
from ratefleet.schemas import Config, ErrorCode

pytestmark = [pytest.mark.anyio, pytest.mark.timeout(30)]


def config() -> Config:
    return Config.model_validate({
        "upstreams": {"u": {"base_url": "http://127.0.0.1:9"}},
        "pools": {"p": {"keys": [{"id": "k1", "rps": 100, "secret": "env:UNUSED"}]}},
        "streams": {"max_deliver": 5},
        "tiers": {"normal": {"max_attempts": 3, "max_rate_limited": 4}},
    })


def inbox(bus: MemoryBus, max_deliver: int = 9) -> tuple[TierInbox, list]:
    events: list = []
    return TierInbox(bus, config(), "normal", "JOBS", "tier-normal", max_deliver, events.append), events


def delivery(seq: int = 3, delivered: int = 1, body: dict | bytes | None = None) -> MemoryMessage:
    meta = SimpleNamespace(num_delivered=delivered, sequence=SimpleNamespace(stream=seq, consumer=seq),
                           timestamp=datetime.now(UTC))
    data = body if isinstance(body, bytes) else json.dumps(body or {"id": f"j{seq}", "request": {"path": "/x"}}).encode()
    return MemoryMessage("inbox", data, f"ack.{seq}", {"Nats-Msg-Id": f"j{seq}"}, meta)


async def test_pull_requests_go_to_the_consumers_next_subject_with_the_inbox_as_reply():
    bus = MemoryBus()
    tier, _ = inbox(bus)
    assert tier.next_subject == "$JS.API.CONSUMER.MSG.NEXT.JOBS.tier-normal" and tier.reading
    await tier.start()
    assert tier.inbox and tier.inbox in bus.subs
    await tier.pull(7, 1.5)
    assert bus.published == [(tier.next_subject, json.dumps({"batch": 7, "expires": 1_500_000_000}).encode(),
                              tier.inbox)]


async def test_a_pull_status_becomes_an_event_with_what_was_left_unfilled():
    bus = MemoryBus()
    tier, events = inbox(bus)
    await tier.start()
    headers = {"Status": "408", "Description": "Request Timeout", "Nats-Pending-Messages": "4"}
    await bus.deliver(MemoryMessage(tier.inbox, b"", "", headers))
    await bus.deliver(MemoryMessage(tier.inbox, b"", "", {"Status": "404"}))
    await bus.deliver(MemoryMessage(tier.inbox, b"", "", {"Status": "409", "Nats-Pending-Messages": ""}))
    assert events == [PullStatus("normal", "408", 4, "Request Timeout"), PullStatus("normal", "404", 0, None),
                      PullStatus("normal", "409", 0, None)]


async def test_a_first_delivery_is_read_without_lookups():
    class Bus(MemoryBus):
        async def delivery_counts(self, seq):
            raise AssertionError("a first delivery has no earlier ones")

    bus = Bus(results={"j3": b"{}"})
    tier, events = inbox(bus)
    await tier.start()
    before = time.time()
    msg = delivery()
    msg.subject = tier.inbox
    await bus.deliver(msg)
    [event] = events
    assert isinstance(event, JobDelivered) and (event.tier, event.seq, event.delivered, event.ack) == (
        "normal", 3, 1, "ack.3")
    assert isinstance(event.verdict, Incoming) and event.verdict.job_id == "j3" and event.verdict.attempt == 1
    assert event.stored is None and not event.cached and before <= event.wall <= time.time()


async def test_a_first_delivery_marked_as_a_repeat_finds_its_stored_result():
    """`Ratefleet-Repeat: 1` (a batch run again, an own id retried past the dedup window): the
    job may have its Result from the first message, so it is looked up like a redelivery."""
    bus = MemoryBus(results={"j3": b'{"job_id":"j3"}'})
    tier, _ = inbox(bus)
    marked = delivery()
    marked.headers = {**(marked.headers or {}), "Ratefleet-Repeat": "1"}
    event = await tier.delivery(marked)
    assert event.verdict.repeat and event.stored == b'{"job_id":"j3"}' and not event.cached
    plain = await tier.delivery(delivery())
    assert not plain.verdict.repeat and plain.stored is None  # unmarked first deliveries cost no lookup


async def test_a_redelivery_counts_earlier_hand_backs_and_429s_and_finds_its_stored_result():
    bus = MemoryBus(counts={3: DeliveryCounts(handbacks=1, rate_limited=2)}, results={"j3": b'{"job_id":"j3"}'})
    tier, _ = inbox(bus)
    event = await tier.delivery(delivery(delivered=4))
    assert (event.verdict.attempt, event.verdict.rate_limited) == (1, 2)
    assert event.stored == b'{"job_id":"j3"}' and not event.cached


async def test_a_redelivery_past_its_attempts_is_refused_with_the_counts_read():
    bus = MemoryBus(counts={3: DeliveryCounts(handbacks=0, rate_limited=0)})
    tier, _ = inbox(bus)
    event = await tier.delivery(delivery(delivered=4))
    assert isinstance(event.verdict, Refused) and event.verdict.code == ErrorCode.ATTEMPTS_EXHAUSTED
    assert event.stored is None  # no lookup for a refusal


async def test_a_job_asking_for_the_cache_is_looked_up_and_a_hit_is_marked_cached():
    body = {"id": "j3", "request": {"path": "/x"}, "cache_ttl_s": 60}
    hit = MemoryBus(cache={"j3": b'{"cached":true}'})
    tier, _ = inbox(hit)
    event = await tier.delivery(delivery(body=body))
    assert event.stored == b'{"cached":true}' and event.cached
    miss = MemoryBus()
    tier, _ = inbox(miss)
    event = await tier.delivery(delivery(body=body))
    assert event.stored is None and not event.cached
    plain = MemoryBus(cache={"j3": b'{"cached":true}'})
    tier, _ = inbox(plain)
    event = await tier.delivery(delivery())  # no cache_ttl_s: never looked up
    assert event.stored is None and not event.cached


async def test_a_stored_result_wins_over_the_cache():
    body = {"id": "j3", "request": {"path": "/x"}, "cache_ttl_s": 60}
    bus = MemoryBus(results={"j3": b"stored"}, cache={"j3": b"cached"})
    tier, _ = inbox(bus)
    event = await tier.delivery(delivery(delivered=2, body=body))
    assert (event.stored, event.cached) == (b"stored", False)


async def test_a_result_lookup_without_an_answer_marks_the_redelivery_unknown_and_skips_the_cache():
    """Slow, or failing after read_result's retries (NATS away): whether the job has a Result is
    not known, so the leader hands it back (it was called before: paid twice when it had one)."""
    class Slow(MemoryBus):
        async def stored_result(self, job_id, batch):
            await anyio.sleep(60)

        async def cached_result(self, incoming):
            raise AssertionError("no cache lookup for a job that may have its Result")

    class Failing(Slow):
        async def stored_result(self, job_id, batch):
            raise TimeoutError

    body = {"id": "j3", "request": {"path": "/x"}, "cache_ttl_s": 60}
    for bus in (Slow(), Failing()):
        tier, _ = inbox(bus)
        started = time.monotonic()
        event = await tier.delivery(delivery(delivered=2, body=body))
        assert isinstance(event.verdict, Incoming) and event.unknown and event.stored is None and not event.cached
        assert time.monotonic() - started < STORED_LOOKUP_S + 5


async def test_a_slow_or_failing_cache_is_a_miss_and_the_job_is_called():
    class Slow(MemoryBus):
        async def cached_result(self, incoming):
            await anyio.sleep(60)

    class Failing(MemoryBus):
        async def cached_result(self, incoming):
            raise TimeoutError

    body = {"id": "j3", "request": {"path": "/x"}, "cache_ttl_s": 60}
    for bus in (Slow(), Failing()):
        tier, _ = inbox(bus)
        started = time.monotonic()
        event = await tier.delivery(delivery(delivered=1, body=body))
        assert isinstance(event.verdict, Incoming) and event.stored is None and not event.cached
        assert not event.unknown and time.monotonic() - started < STORED_LOOKUP_S + 5


async def test_a_message_intake_cannot_read_is_ended_as_invalid():
    tier, _ = inbox(MemoryBus())
    msg = delivery()
    msg.metadata.timestamp = None  # read_message fails on it in an unforeseen way
    event = await tier.delivery(msg)
    assert isinstance(event.verdict, Refused) and event.verdict.status == "invalid"
    assert (event.verdict.job_id, event.verdict.code) == ("j3", ErrorCode.INVALID_JOB)


async def test_stepping_down_hands_back_unread_except_the_last_delivery():
    bus = MemoryBus()
    tier, _ = inbox(bus, max_deliver=4)
    tier.reading = False
    unread = await tier.delivery(delivery(delivered=3))
    assert unread.verdict is None and (unread.seq, unread.delivered, unread.ack) == (3, 3, "ack.3")
    last = await tier.delivery(delivery(delivered=4))
    assert isinstance(last.verdict, Refused) and last.delivered == 4  # read: the server will not repeat it
    tier.max_deliver = 0  # no server limit known: every delivery may come back
    assert (await tier.delivery(delivery(delivered=30))).verdict is None


async def test_stop_drains_once_and_survives_a_drain_that_fails():
    drained: list[int] = []

    class Sub:
        async def drain(self):
            drained.append(1)
            raise ConnectionError("away")

        async def unsubscribe(self):
            pass

    tier, _ = inbox(MemoryBus())
    await tier.stop()  # never started: nothing to drain
    tier._sub = Sub()
    await tier.stop()
    await tier.stop()
    assert drained == [1] and tier._sub is None
    assert DRAIN_S == 5.0


async def test_an_empty_message_without_headers_is_a_delivery_ended_as_invalid_not_a_pull_status():
    bus = MemoryBus()
    tier, events = inbox(bus)
    await tier.start()
    msg = delivery(body=b"")
    msg.subject, msg.headers = tier.inbox, None
    await bus.deliver(msg)
    [event] = events
    assert isinstance(event, JobDelivered) and isinstance(event.verdict, Refused)
    assert (event.verdict.status, event.verdict.job_id) == ("invalid", "s3")


async def test_an_unread_delivery_at_step_down_names_its_tier_and_arrival():
    tier, _ = inbox(MemoryBus(), max_deliver=4)
    tier.reading = False
    before = time.time()
    unread = await tier.delivery(delivery(delivered=1))
    assert unread.tier == "normal" and before <= unread.wall <= time.time()


async def test_intake_is_told_the_servers_max_payload():
    tier, _ = inbox(MemoryBus(max_payload=9000))  # jobs up to max_payload less the assignment overhead
    event = await tier.delivery(delivery(body={"id": "j3", "request": {"path": "/x"}, "metadata": {"p": "x" * 2000}}))
    assert isinstance(event.verdict, Refused) and "max_payload" in event.verdict.message


async def test_an_unreadable_message_is_ended_in_its_tier_naming_the_cause():
    tier, _ = inbox(MemoryBus())
    msg = delivery()
    msg.metadata.timestamp = None
    event = await tier.delivery(msg)
    assert event.verdict.tier == "normal" and "NoneType" not in event.verdict.message
    assert event.verdict.message.startswith("job could not be read (")


async def test_a_redelivered_batch_job_finds_its_result_in_its_batch():
    class Bus(MemoryBus):
        async def stored_result(self, job_id, batch):
            return b"stored" if (job_id, batch) == ("j3", "b1") else None

    tier, _ = inbox(Bus())
    event = await tier.delivery(delivery(delivered=2, body={"id": "j3", "batch": "b1", "request": {"path": "/x"}}))
    assert event.stored == b"stored"


async def test_result_lookups_run_beside_intake_and_stop_waits_for_them():
    """A batch run again makes every message a repeat: one 0.3 s lookup after the other, 20 of
    them took 6 s (a tier read at one round trip per job). Now they overlap, bounded by
    LOOKUPS_IN_FLIGHT, and a first delivery without a lookup is not held up behind them."""
    class Slow(MemoryBus):
        async def stored_result(self, job_id, batch):
            await anyio.sleep(0.3)
            return None

    bus = Slow()
    tier, events = inbox(bus)
    await tier.start()
    started = time.monotonic()
    for seq in range(1, 21):
        msg = delivery(seq, delivered=2)
        msg.subject = tier.inbox
        await bus.deliver(msg)
    plain = delivery(99)
    plain.subject = tier.inbox
    await bus.deliver(plain)
    assert [e.seq for e in events] == [99]  # read at once, ahead of the 20 lookups
    await tier.stop()  # waits for the lookups under way
    assert sorted(e.seq for e in events) == [*range(1, 21), 99]
    assert time.monotonic() - started < 3.0


async def test_a_first_delivery_looks_up_its_stored_result_only_while_ids_may_be_forgotten():
    # a NATS restart forgot the ids of done jobs: one sent again is a first delivery with a Result
    bus = MemoryBus(results={"j3": b'{"job_id":"j3"}'})
    tier, _ = inbox(bus)
    assert (await tier.delivery(delivery(delivered=1))).stored is None  # no restart: no read
    bus.forgotten_until = time.time() + 60
    assert (await tier.delivery(delivery(delivered=1))).stored == b'{"job_id":"j3"}'
