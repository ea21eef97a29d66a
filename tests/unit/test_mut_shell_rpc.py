"""Request/reply intake (dispatcher/shell/rpc.py) over a real nats-server: what each kind of
request gets back, what is stored (the job in JOBS, a Result, a dead letter) and what is not.
Each test names the rule it pins; the e2e tests run the same through a whole fleet."""

from __future__ import annotations

import json

import anyio
import nats
import pytest

from ratefleet.dispatcher.shell.rpc import RpcResponder, _with_id
from ratefleet.runtime.store import MSG_ID, REPLY_HEADER, read_result, store_result
from ratefleet.runtime.streams import ensure_topology
from ratefleet.schemas import Config, Result, Subjects

pytestmark = [pytest.mark.anyio, pytest.mark.timeout(60)]
SUBJECTS = Subjects()
TP = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"


def config(**streams) -> Config:
    return Config.model_validate({
        "upstreams": {"u": {"base_url": "http://127.0.0.1:9", "auth_header": "X-Custom-Auth"}},
        "pools": {"p": {"keys": [{"id": "k1", "rps": 100, "secret": "env:UNUSED"}]}},
        "streams": streams,
    })


class Fleet:
    """A nats-server with the streams, and one RpcResponder serving `<prefix>.rpc.*`."""

    def __init__(self, url: str, conf: Config) -> None:
        self.url, self.config = url, conf

    async def __aenter__(self) -> Fleet:
        self.nc = await nats.connect(self.url)
        self.js = self.nc.jetstream()
        await ensure_topology(self.js, self.config)
        self.responder = RpcResponder(self.config, self.nc)
        self.sub = await self.nc.subscribe(SUBJECTS.rpc("*"), cb=self.responder.handle)
        return self

    async def __aexit__(self, *exc) -> None:
        await self.nc.close()

    async def request(self, tier: str, payload: bytes, headers: dict | None = None) -> dict:
        reply = await self.nc.request(SUBJECTS.rpc(tier), payload, timeout=5, headers=headers)
        return json.loads(reply.data)

    async def no_answer(self, tier: str, payload: bytes) -> None:
        inbox = self.nc.new_inbox()
        sub = await self.nc.subscribe(inbox)
        await self.nc.publish(SUBJECTS.rpc(tier), payload, reply=inbox)
        with pytest.raises(nats.errors.TimeoutError):
            await sub.next_msg(timeout=1.0)
        await sub.unsubscribe()

    async def _stored(self, stream: str, subject: str) -> list:
        info = await self.js.stream_info(stream)
        msgs: list = []
        if not info.state.messages:
            return msgs
        for seq in range(info.state.first_seq, info.state.last_seq + 1):
            try:
                msg = await self.js.get_msg(stream, seq)
            except nats.js.errors.NotFoundError:
                continue
            if subject in (msg.subject, "*") or (subject.endswith(".*") and msg.subject.startswith(subject[:-1])):
                msgs.append(msg)
        return msgs

    async def letters(self, tier: str) -> list[dict]:
        """The tier's dead letters once there is one: the answer goes out before the letter is
        stored, so a loaded machine may read the stream in between (bounded wait)."""
        with anyio.fail_after(10):
            while not (found := await self._stored(SUBJECTS.dead_stream, SUBJECTS.dead(tier))):
                await anyio.sleep(0.05)
        return [json.loads(m.data) for m in found]

    async def jobs(self, tier: str) -> list:
        return await self._stored(SUBJECTS.jobs_stream, SUBJECTS.jobs(tier))


def job(**fields) -> bytes:
    return json.dumps({"request": {"path": "/v1/x"}, **fields}).encode()


async def test_an_unknown_tier_is_answered_and_nothing_is_stored(nats_server):
    """A caller waiting on a reply gets the refusal and its id stays free: before, the `invalid`
    Result was stored and dead-lettered, and the retry on the right tier with the same id got
    the old `unknown_tier` Result for 24 h (a break-it trial; the README said "nothing stored")."""
    async with Fleet(nats_server.url, config()) as fleet:
        answer = await fleet.request("platinum", job(id="j1", batch="b1"))
        assert (answer["job_id"], answer["status"], answer["tier"]) == ("j1", "invalid", "platinum")
        assert answer["error"]["code"] == "unknown_tier"
        assert "'platinum'" in answer["error"]["message"] and "'normal'" in answer["error"]["message"]
        assert await read_result(fleet.js, SUBJECTS, "j1") is None
        assert await read_result(fleet.js, SUBJECTS, "j1", "b1") is None
        await anyio.sleep(0.5)  # (a dead letter went out after the answer)
        assert await fleet._stored(SUBJECTS.dead_stream, "*") == []
        assert await fleet.jobs("*") == []
        await fleet.nc.publish(SUBJECTS.rpc("normal"), job(id="j1", batch="b1"))  # the fixed one: stored
        with anyio.fail_after(10):
            while not (stored := await fleet.jobs("normal")):
                await anyio.sleep(0.05)
        assert [m.headers[MSG_ID] for m in stored] == ["j1"]


async def test_an_unknown_tier_without_a_reply_subject_is_still_stored(nats_server):
    """Published without a reply subject, nobody hears the refusal: its Result and dead letter
    are the producer's only way to learn of it."""
    async with Fleet(nats_server.url, config()) as fleet:
        await fleet.nc.publish(SUBJECTS.rpc("platinum"), job(id="j2"))
        with anyio.fail_after(10):
            while await read_result(fleet.js, SUBJECTS, "j2") is None:
                await anyio.sleep(0.05)
        [letter] = await fleet.letters("_")
        assert letter["reason"]["code"] == "unknown_tier" and letter["job_id"] == "j2"
        assert json.loads(json.dumps(letter["payload"]))["id"] == "j2"  # the raw payload, as sent
        assert await fleet.jobs("*") == []


async def test_a_refused_job_is_answered_and_not_stored_or_dead_lettered_with_its_secret_masked(nats_server):
    async with Fleet(nats_server.url, config()) as fleet:
        payload = job(id="j3", batch="b3", request={"path": "/v1/x", "headers": {"x-custom-auth": "sekret-123"}})
        answer = await fleet.request("normal", payload)
        assert (answer["job_id"], answer["status"], answer["tier"], answer["batch"]) == ("j3", "invalid", "normal", "b3")
        assert answer["error"]["code"] == "forbidden_target" and "'X-Custom-Auth'" in answer["error"]["message"]
        assert "sekret" not in json.dumps(answer)
        assert await read_result(fleet.js, SUBJECTS, "j3", "b3") is None  # the id stays free for the fixed job
        # without a reply subject: stored and dead-lettered, replayable, the secret masked
        await fleet.nc.publish(SUBJECTS.rpc("normal"), payload)
        [letter] = await fleet.letters("normal")
        assert letter["reason"]["code"] == "forbidden_target" and letter["job_id"] == "j3"
        assert letter["job"]["request"]["headers"] == {"x-custom-auth": "***"}
        assert "sekret" not in json.dumps(letter)
        stored = json.loads(await read_result(fleet.js, SUBJECTS, "j3", "b3"))
        assert stored["error"]["code"] == "forbidden_target"
        assert await fleet.jobs("normal") == []


async def test_a_refused_payload_that_is_no_job_keeps_its_raw_bytes_and_gets_a_fresh_id(nats_server):
    async with Fleet(nats_server.url, config()) as fleet:
        answer = await fleet.request("normal", b"[1, 2]")
        assert answer["status"] == "invalid" and answer["job_id"] and answer["tier"] == "normal"
        await fleet.nc.publish(SUBJECTS.rpc("normal"), b"[1, 2]")  # no reply subject: dead-lettered
        [letter] = await fleet.letters("normal")
        assert letter["job_id"] and letter["job_id"] != answer["job_id"] and letter["payload"] == [1, 2]


async def test_a_job_too_large_for_the_servers_max_payload_is_refused_at_the_door(nats_server):
    async with Fleet(nats_server.url, config(max_job_bytes=8 << 20)) as fleet:
        room = fleet.nc.max_payload - 2000  # fits one message, but not inside an assignment
        answer = await fleet.request("normal", job(id="j4", metadata={"pad": "x" * (room - 100)}))
        assert (answer["job_id"], answer["status"], answer["error"]["code"]) == ("j4", "invalid", "invalid_job")
        assert "max_payload" in answer["error"]["message"]
        assert await fleet.jobs("normal") == []


async def test_a_valid_job_is_stored_with_its_id_reply_subject_and_trace(nats_server):
    async with Fleet(nats_server.url, config()) as fleet:
        inbox = fleet.nc.new_inbox()
        await fleet.nc.publish(SUBJECTS.rpc("normal"), job(), reply=inbox, headers={"traceparent": TP})
        await fleet.nc.publish(SUBJECTS.rpc("normal"), job(id="j5"), reply=inbox)
        with anyio.fail_after(10):
            while len(stored := await fleet.jobs("normal")) < 2:
                await anyio.sleep(0.05)
        first, second = sorted(stored, key=lambda m: m.seq)
        assert first.subject == SUBJECTS.jobs("normal")
        assert first.headers[REPLY_HEADER] == inbox and first.headers["traceparent"] == TP
        assert first.headers[MSG_ID] == json.loads(first.data)["id"]  # the id it was given
        assert second.headers[MSG_ID] == "j5" and json.loads(second.data) == json.loads(job(id="j5"))


async def test_a_job_sent_without_a_reply_subject_is_stored_without_one(nats_server):
    async with Fleet(nats_server.url, config()) as fleet:
        await fleet.nc.publish(SUBJECTS.rpc("normal"), job(id="j6"))
        with anyio.fail_after(10):
            while not (stored := await fleet.jobs("normal")):
                await anyio.sleep(0.05)
        assert REPLY_HEADER not in (stored[0].headers or {})


async def test_a_duplicate_is_answered_with_the_stored_result_and_a_fresh_job_never_is(nats_server):
    async with Fleet(nats_server.url, config()) as fleet:
        done = Result(job_id="j7", status="succeeded", tier="normal")
        await store_result(fleet.js, SUBJECTS, done)
        # the id has its Result (e.g. an earlier rpc request refused as invalid: nothing in JOBS):
        # answered with it, and not stored in JOBS (it would be called, its answer dropped)
        answer = await fleet.request("normal", job(id="j7"))
        assert (answer["job_id"], answer["status"]) == ("j7", "succeeded")
        assert await fleet.jobs("normal") == []
        await fleet.nc.publish(SUBJECTS.rpc("normal"), job(id="j8"))
        await fleet.no_answer("normal", job(id="j8"))  # a duplicate still running: no answer yet


async def test_a_full_queue_is_answered_queue_full_with_the_stores_reason(nats_server):
    async with Fleet(nats_server.url, config(jobs_max_msgs=1)) as fleet:
        await fleet.nc.publish(SUBJECTS.rpc("normal"), job(id="j9"))
        answer = await fleet.request("normal", job(id="j10"))
        assert (answer["job_id"], answer["status"], answer["tier"]) == ("j10", "failed", "normal")
        assert answer["error"]["code"] == "queue_full"
        assert answer["error"]["message"].startswith("the job queue is full")
        assert await read_result(fleet.js, SUBJECTS, "j10") is None  # nothing stored: resubmit later


async def test_an_own_id_whose_result_lookup_gets_no_answer_is_refused_not_stored(nats_server):
    """Whether the id has a Result could not be read (NATS not answering): storing it anyway
    called (and paid) an id whose Result existed. The caller is told to send it again."""
    async with Fleet(nats_server.url, config()) as fleet:
        async def no_answer(stream, subject, **kwargs):
            raise TimeoutError

        fleet.responder.js.get_last_msg = no_answer
        answer = await fleet.request("normal", job(id="j11"))
        assert (answer["job_id"], answer["status"], answer["error"]["code"]) == ("j11", "failed", "submit_failed")
        assert "send it again with the same id" in answer["error"]["message"]
        assert await fleet.jobs("normal") == []


def test_a_payload_without_an_id_gets_one_in_compact_utf8():
    job_id, payload = _with_id('{"request": {"path": "/x", "json": {"t": "é\\ud83d"}}}'.encode())
    assert payload == ('{"request":{"path":"/x","json":{"t":"é\ud83d"}},"id":"' + job_id + '"}').encode(
        "utf-8", "surrogatepass")



class Untouchable:
    """A NATS connection that must not be used: an rpc request dropped at the door."""

    max_payload = 1 << 20

    def jetstream(self):
        return self

    def __getattr__(self, name):
        raise AssertionError(f"the connection was used ({name})")


async def test_a_reply_subject_in_the_fleets_own_namespace_is_dropped_under_a_custom_prefix():
    conf = config().model_copy(update={"nats": config().nats.model_copy(update={"prefix": "acme"})})
    responder = RpcResponder(conf, Untouchable())

    class Msg:
        subject = "acme.rpc.normal"
        reply = "acme.admin.keys"
        headers = None
        data = job(id="j11")

    await responder.handle(Msg())  # dropped: nothing stored, nothing published


async def test_a_job_id_requested_again_and_again_is_followed_once_and_every_requester_answered(nats_server):
    """A caller retrying a long job with its idempotency key every second started one background
    follower per retry (each reading the Result store every 5 s for 600 s; 1,000 at most, shared
    by every caller): one job id now has one follower, and each requester still gets the Result."""
    async with Fleet(nats_server.url, config()) as fleet:
        await fleet.nc.publish(SUBJECTS.rpc("normal"), job(id="j30"))  # fresh: queued, runs (no worker here)
        inboxes = [fleet.nc.new_inbox() for _ in range(20)]
        subs = [await fleet.nc.subscribe(inbox) for inbox in inboxes]
        for inbox in inboxes:
            await fleet.nc.publish(SUBJECTS.rpc("normal"), job(id="j30"), reply=inbox)
        await fleet.nc.flush()
        with anyio.fail_after(10):
            while sum(len(w) for w in getattr(fleet.responder, "_waiting", {}).values()) < 20 \
                    and len(fleet.responder._followers) < 20:
                await anyio.sleep(0.05)
        assert len(fleet.responder._followers) == 1
        await store_result(fleet.js, SUBJECTS, Result(job_id="j30", status="succeeded", tier="normal"))
        for sub in subs:
            assert json.loads((await sub.next_msg(timeout=8)).data)["job_id"] == "j30"
