"""The leader's real bus (dispatcher/shell/bus.py `NatsLeaderBus`) over a real nats-server:
core publish/subscribe with headers and the max_payload refusal, ack/nak/in-progress on a
job's ack subject, hand-backs counted before the nak, stored and cached Results, refusals
stored and dead-lettered with the upstream's auth header masked, key records in their bucket."""

from __future__ import annotations

import json

import anyio
import nats
import pytest
from nats.errors import MaxPayloadError

from ratefleet.dispatcher.core.delivery import Incoming, Refused
from ratefleet.dispatcher.shell.bus import NatsLeaderBus, PayloadTooLarge
from ratefleet.runtime.cache import ResultCache, cache_key
from ratefleet.runtime.store import read_result, store_result
from ratefleet.runtime.streams import ensure_topology
from ratefleet.schemas import Config, ErrorCode, Job, Result, Subjects
from ratefleet.schemas.result import ResponseInfo

pytestmark = [pytest.mark.anyio, pytest.mark.timeout(60)]
SUBJECTS = Subjects()


def config() -> Config:
    return Config.model_validate({
        "upstreams": {"u": {"base_url": "http://127.0.0.1:9", "auth_header": "X-Custom-Auth"}},
        "pools": {"p": {"keys": [{"id": "k1", "rps": 100, "secret": "env:UNUSED"}]}},
    })


class Bus:
    """A nats-server with the fleet's streams and buckets, a NatsLeaderBus on it, and a
    subscription that keeps what reaches `ack.*` and `reply.*` (a job's ack and reply subjects)."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.seen: list[tuple[str, bytes]] = []

    async def __aenter__(self) -> Bus:
        self.nc = await nats.connect(self.url)
        self.js = self.nc.jetstream()
        self.config = config()
        await ensure_topology(self.js, self.config)
        self.bus = NatsLeaderBus(self.config, self.nc)
        for subject in ("ack.>", "reply.>"):
            await self.nc.subscribe(subject, cb=self._keep)
        return self

    async def _keep(self, msg) -> None:
        self.seen.append((msg.subject, msg.data))

    async def __aexit__(self, *exc) -> None:
        await self.nc.close()

    async def received(self, count: int) -> list[tuple[str, bytes]]:
        with anyio.fail_after(10):
            while len(self.seen) < count:
                await anyio.sleep(0.02)
        return self.seen

    async def letters(self, tier: str) -> list[dict]:
        with anyio.fail_after(10):
            while True:
                info = await self.js.stream_info(SUBJECTS.dead_stream)
                if info.state.messages:
                    break
                await anyio.sleep(0.05)
        out = []
        for seq in range(info.state.first_seq, info.state.last_seq + 1):
            msg = await self.js.get_msg(SUBJECTS.dead_stream, seq)
            if msg.subject == SUBJECTS.dead(tier):
                out.append(json.loads(msg.data))
        return out


def job(**fields) -> Job:
    return Job.model_validate({"id": "j1", "request": {"path": "/v1/x", **fields}})


def incoming(the_job: Job, **fields) -> Incoming:
    base = dict(job=the_job, job_id=the_job.id, tier="normal", upstream="u", ack="ack.1", reply_to="reply.1",
                attempt=2, max_attempts=3, submitted_at=1_700_000_000.0, stream_seq=7, traceparent=None,
                tracestate=None)
    return Incoming(**{**base, **fields})


async def test_publish_reaches_a_subscriber_with_reply_and_headers(nats_server):
    async with Bus(nats_server.url) as f:
        got: list = []

        async def handler(msg) -> None:
            got.append(msg)

        await f.bus.subscribe("t.one", handler)
        await f.bus.publish("t.one", b"a", reply="r.1", headers={"traceparent": "tp"})
        await f.bus.publish("t.one", b"b")
        await f.bus.flush(2)
        with anyio.fail_after(10):
            while len(got) < 2:
                await anyio.sleep(0.02)
        assert [(m.data, m.reply, m.headers) for m in got] == [(b"a", "r.1", {"traceparent": "tp"}), (b"b", "", None)]
        assert f.bus.max_payload == f.nc.max_payload > 0
        assert f.bus.new_inbox().startswith("_INBOX.") and f.bus.new_inbox() != f.bus.new_inbox()


async def test_a_publish_over_max_payload_is_the_payloads_fault(nats_server):
    async with Bus(nats_server.url) as f:
        with pytest.raises(PayloadTooLarge) as refused:
            await f.bus.publish("t.big", b"x" * (f.bus.max_payload + 1))
        assert refused.value.__cause__ is None and refused.value.__suppress_context__
        assert str(refused.value) == str(MaxPayloadError())  # nats-py's words, for the refusal's message


async def test_a_slow_handler_loses_no_message(nats_server):
    """No pending limit on the leader's subscriptions: a burst beyond nats-py's default
    limit (65536 messages) is queued, not dropped as a slow consumer."""
    async with Bus(nats_server.url) as f:
        async def handler(msg) -> None:
            return None

        sub = await f.bus.subscribe("t.burst", handler)
        assert sub._pending_msgs_limit == 0


async def test_nak_in_progress_and_a_stored_answer_go_to_the_jobs_ack_subject(nats_server):
    async with Bus(nats_server.url) as f:
        await f.bus.nak("ack.1")
        await f.bus.nak("ack.2", 1.5)
        await f.bus.in_progress("ack.3")
        await f.bus.answer_stored(b'{"stored": 1}', "ack.4", "reply.4")
        await f.bus.answer_stored(b'{"stored": 2}', "ack.5", None)
        assert sorted(await f.received(6)) == [("ack.1", b"-NAK"), ("ack.2", b'-NAK {"delay": 1500000000}'),
                                               ("ack.3", b"+WPI"), ("ack.4", b"+ACK"), ("ack.5", b"+ACK"),
                                               ("reply.4", b'{"stored": 1}')]


async def test_a_hand_back_is_counted_then_nakd_with_its_delay(nats_server):
    async with Bus(nats_server.url) as f:
        assert (await f.bus.delivery_counts(7)).handbacks == 0
        await f.bus.hand_back(7, "ack.7", 2.0)
        await f.bus.hand_back(7, "ack.7", 0.0)
        assert (await f.bus.delivery_counts(7)).handbacks == 2
        assert (await f.bus.delivery_counts(8)).handbacks == 0
        assert await f.received(2) == [("ack.7", b'-NAK {"delay": 2000000000}'), ("ack.7", b"-NAK")]


async def test_a_stored_result_is_read_by_job_id_and_batch(nats_server):
    async with Bus(nats_server.url) as f:
        result = Result(job_id="j1", status="succeeded", tier="normal", batch="b1")
        assert await store_result(f.js, SUBJECTS, result)
        assert json.loads(await f.bus.stored_result("j1", "b1"))["job_id"] == "j1"
        assert await f.bus.stored_result("j1", None) is None
        assert await f.bus.stored_result("j2", "b1") is None


async def test_a_cache_hit_is_stored_as_the_jobs_result_and_a_miss_stores_nothing(nats_server):
    async with Bus(nats_server.url) as f:
        cached = Job.model_validate({"id": "j1", "batch": "b1", "cache_ttl_s": 60,
                                     "request": {"path": "/v1/x", "json": {"q": 1}}})
        assert await f.bus.cached_result(incoming(cached, tier="vip")) is None
        assert await read_result(f.js, SUBJECTS, "j1", "b1") is None
        answer = Result(job_id="earlier", status="succeeded", tier="normal",
                        response=ResponseInfo(status=200, headers={}, json={"a": 1}))
        cache = ResultCache.from_config(f.js, f.config)
        assert await cache.store(cache_key("u", cached), answer, 60)
        payload = await f.bus.cached_result(incoming(cached, tier="vip", submitted_at=1_700_000_000.0))
        stored = json.loads(payload)
        assert stored == json.loads(await read_result(f.js, SUBJECTS, "j1", "b1"))
        assert (stored["job_id"], stored["batch"], stored["tier"], stored["status"], stored["cached"]) == \
            ("j1", "b1", "vip", "succeeded", True)
        assert stored["response"]["json"] == {"a": 1}
        assert stored["timings"]["submitted_at"].startswith("2023-11-14T22:13:20")
        # a second hit finds the Result stored already and answers with that one
        assert json.loads(await f.bus.cached_result(incoming(cached, tier="vip"))) == stored
        assert f.bus.cache_stats()["hits"] == 2 and f.bus.cache_stats()["misses"] == 1


async def test_a_job_ended_at_the_leader_is_stored_answered_and_dead_lettered_masked(nats_server):
    async with Bus(nats_server.url) as f:
        masked = job(headers={"X-Custom-Auth": "sekret-1"})
        await f.bus.end_job(incoming(masked), ErrorCode.INVALID_JOB, "unsendable after all", "invalid")
        stored = json.loads(await read_result(f.js, SUBJECTS, "j1"))
        # its 2nd delivery ended here without a call: the one before it may have reached one
        assert (stored["status"], stored["error"]["code"], stored["attempts"]) == ("invalid", "invalid_job", 1)
        assert stored["error"]["message"] == "unsendable after all"
        [letter] = await f.letters("normal")
        assert letter["job"]["request"]["headers"] == {"X-Custom-Auth": "***"} and "sekret" not in json.dumps(letter)
        assert sorted(s for s, _ in await f.received(2)) == ["ack.1", "reply.1"]


async def test_a_message_refused_at_intake_is_stored_and_dead_lettered(nats_server):
    async with Bus(nats_server.url) as f:
        refused = Refused(status="invalid", code=ErrorCode.INVALID_JOB, message="not a job", job_id="j9",
                          batch=None, tier="normal", ack="ack.9", reply_to=None, attempt=1, raw=b"[1, 2]")
        await f.bus.end_refused(refused)
        stored = json.loads(await read_result(f.js, SUBJECTS, "j9"))
        assert (stored["status"], stored["error"]["code"]) == ("invalid", "invalid_job")
        assert stored["attempts"] == 0  # ended at its first delivery: never called (a new user read 1 as a call)
        [letter] = await f.letters("normal")
        assert letter["job_id"] == "j9" and letter["payload"] == [1, 2]


async def test_key_records_live_in_the_keys_bucket(nats_server):
    async with Bus(nats_server.url) as f:
        assert await f.bus.load_keys() == {}
        assert await f.bus.save_key("k1", {"by": "operator", "reason": "rotated"}) is True
        assert await f.bus.save_key("k2", {"by": "provider"}) is True
        assert await f.bus.save_key("k2", None) is True
        loaded = await f.bus.load_keys()
        assert list(loaded) == ["k1"] and loaded["k1"]["reason"] == "rotated"
        kv = await f.js.key_value(SUBJECTS.keys_bucket)
        assert json.loads((await kv.get("k1")).value)["by"] == "operator"
