"""Each stored Result is republished by the server on `<prefix>.stored.<batch>.<job>`
(RATEFLEET_RESULTS' JetStream `republish`, ratefleet/runtime/streams.py), and
`Client.request` waits there besides its reply inbox: the Result reaches a waiting request
the moment it is stored, without the worker's round trip for the store's ack and its reply.
Real nats-server; a stand-in worker stores Results as a worker does (`store_result`)."""

from __future__ import annotations

import asyncio
import json
import time

import nats
import pytest
from nats.js.api import StreamConfig

from ratefleet import Client
from ratefleet.runtime.store import REPLY_HEADER, store_result
from ratefleet.runtime.streams import ensure_topology, stream_configs
from ratefleet.schemas import Config, Result, Subjects

pytestmark = [pytest.mark.anyio, pytest.mark.timeout(90)]
SUBJECTS = Subjects("ratefleet")


def config() -> Config:
    return Config.model_validate({
        "upstreams": {"m": {"base_url": "http://127.0.0.1:9"}},
        "pools": {"p": {"keys": [{"id": "k1", "secret": "x", "rps": 1}]}}})


def result(job_id: str, batch: str | None = None, status: str = "succeeded", worker: str = "w1") -> Result:
    return Result(job_id=job_id, status=status, tier="normal", batch=batch, attempts=1, worker=worker)


async def test_a_request_gets_its_result_when_it_is_stored_even_without_a_reply(nats_server):
    nc = await nats.connect(nats_server.url)
    js = nc.jetstream()
    await ensure_topology(js, config())
    replies_seen: list[str] = []

    async def stand_in_worker(msg) -> None:  # stores the Result; never answers the reply header
        replies_seen.append(msg.headers[REPLY_HEADER])
        job = json.loads(msg.data)
        await store_result(js, SUBJECTS, result(job["id"], job.get("batch")))

    await nc.subscribe(SUBJECTS.jobs("*"), cb=stand_in_worker)
    try:
        async with await Client.connect(nats_server.url) as client:
            for batch in (None, "nightly-1"):
                started = time.monotonic()
                got = await client.request({"id": f"job-{batch}", "batch": batch, "request": {"path": "/x"}},
                                           "normal", timeout=20)
                # without the stored subject the request waits out its 20 s timeout, then reads the store
                assert time.monotonic() - started < 5
                assert (got.job_id, got.batch, got.status, got.worker) == (f"job-{batch}", batch, "succeeded", "w1")
    finally:
        await nc.close()
    assert len(replies_seen) == 2  # the reply inbox is still offered (a Result stored before needs it)


async def test_only_a_newly_stored_result_is_republished_as_it_was_stored(nats_server):
    nc = await nats.connect(nats_server.url)
    js = nc.jetstream()
    await ensure_topology(js, config())
    seen: list[tuple[str, bytes]] = []

    async def on_stored(msg) -> None:
        seen.append((msg.subject, msg.data))

    await nc.subscribe(SUBJECTS.stored(">", "").rstrip("."), cb=on_stored)
    try:
        first = result("j1", "b1", worker="w1")
        assert await store_result(js, SUBJECTS, first) is True
        assert await store_result(js, SUBJECTS, result("j1", "b1", status="failed", worker="w2")) is False
        assert await store_result(js, SUBJECTS, result("j2")) is True
        await nc.flush()
        await asyncio.sleep(0.3)
    finally:
        await nc.close()
    assert seen == [(SUBJECTS.stored("b1", "j1"), first.to_json()), (SUBJECTS.stored(None, "j2"), result("j2").to_json())]


async def test_a_results_stream_made_before_the_republish_gets_it(nats_server):
    nc = await nats.connect(nats_server.url)
    js = nc.jetstream()
    try:
        old = next(s for s in stream_configs(config()) if s.name == SUBJECTS.results_stream)
        await js.add_stream(StreamConfig.from_response({**old.as_dict(), "republish": None}))
        assert (await js.stream_info(SUBJECTS.results_stream)).config.republish is None
        await ensure_topology(js, config())
        republish = (await js.stream_info(SUBJECTS.results_stream)).config.republish
        assert (republish.src, republish.dest) == (
            "ratefleet.results.*.*", "ratefleet.stored.{{wildcard(1)}}.{{wildcard(2)}}")
    finally:
        await nc.close()


async def test_a_user_without_the_stored_permission_still_gets_replies_and_stops_asking(tmp_path):
    # an account config from before the republish (subscribe: only its own inboxes): the first
    # request's `stored` SUB is refused and the reply inbox answers it; later requests skip the SUB
    from ratefleet.runtime.embedded import EmbeddedNats

    conf = tmp_path / "accounts.conf"
    conf.write_text("""
accounts {
  FLEET {
    jetstream: enabled
    users = [
      { user: fleet, password: fleet-pw }
      {
        user: app, password: app-pw
        permissions {
          publish { allow: [">"] }
          subscribe { allow: ["_INBOX.>"] }
        }
      }
    ]
  }
}
""")
    server = EmbeddedNats(tmp_path / "nats", extra_args=("-c", str(conf))).start()
    host = server.url.removeprefix("nats://")
    try:
        nc = await nats.connect(f"nats://fleet:fleet-pw@{host}")
        js = nc.jetstream()
        await ensure_topology(js, config())

        async def stand_in_worker(msg) -> None:  # a worker: stores, then answers the reply header
            job = json.loads(msg.data)
            await store_result(js, SUBJECTS, result(job["id"]))
            await nc.publish(msg.headers[REPLY_HEADER], result(job["id"]).to_json())

        await nc.subscribe(SUBJECTS.jobs("*"), cb=stand_in_worker)
        async with await Client.connect(f"nats://app:app-pw@{host}") as client:
            first = await client.request({"id": "first", "request": {"path": "/x"}}, "normal", timeout=10)
            stored_subs = []
            original = client.nc._transport.writelines
            client.nc._transport.writelines = lambda payload: (
                stored_subs.extend(p for p in payload if b"SUB ratefleet.stored." in p), original(payload))[1]
            second = await client.request({"id": "second", "request": {"path": "/x"}}, "normal", timeout=10)
        await nc.close()
    finally:
        server.stop()
    assert (first.job_id, second.job_id) == ("first", "second")
    assert stored_subs == []
