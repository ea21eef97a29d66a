"""A caller between two steps as its Client closes ends at once, and sends nothing more.

`Client.close()` cancels the reply futures waiting at that moment (ReplyInbox.abandon). A call
that asked for a reply future after that moment (a `request` that was reading its stored Result
when the close came, a publish pipe's next publish) got a fresh one nothing cancelled, sent its
message over the closing connection and waited for a reply that could not come: its whole
timeout, or a submit's 10 s ack_timeout. (A fresh-clone suite once saw a `submit_many` end 10.03 s
after the close in tests/e2e/test_client_close_in_flight.py; these tests pin the mechanism.)"""

from __future__ import annotations

import asyncio

import pytest

from ratefleet import Client, NatsUnavailable
from ratefleet.runtime.pubpipe import PublishPipe
from ratefleet.runtime.replies import ReplyInbox
from ratefleet.runtime.streams import ensure_topology
from ratefleet.schemas.config import parse_config

pytestmark = [pytest.mark.anyio, pytest.mark.timeout(60)]
JOB = {"request": {"path": "/v1/chat/completions", "json": {"model": "m"}}}


class CountingNats:
    """Just enough of nats-py's client for a ReplyInbox / PublishPipe."""

    def __init__(self) -> None:
        self.published: list[str] = []

    def new_inbox(self) -> str:
        return "_INBOX.t"

    async def subscribe(self, subject, cb):
        return object()

    async def publish(self, subject, payload, reply="", headers=None):
        self.published.append(subject)


async def test_an_abandoned_inbox_hands_out_cancelled_futures():
    inbox = ReplyInbox(CountingNats())  # type: ignore[arg-type]
    _, before = await inbox.expect()
    inbox.abandon()
    _, after = await inbox.expect()
    assert before.cancelled() and after.cancelled() and inbox.waiting == 0


async def test_an_abandoned_pipe_sends_nothing_more():
    nc = CountingNats()
    pipe = PublishPipe(nc)  # type: ignore[arg-type]
    await pipe.__aenter__()
    first = await pipe.publish("ratefleet.jobs.guest", b"{}")
    pipe.abandon()
    second = await pipe.publish("ratefleet.jobs.guest", b"{}")
    assert first.cancelled() and second.cancelled()
    assert nc.published == ["ratefleet.jobs.guest"]  # the second was not sent


async def recording_client(url: str) -> tuple[Client, list[str]]:
    """A connected Client (its streams made) and the subjects it publishes to from now on."""
    client = await Client.connect(url)
    await ensure_topology(client.js, parse_config({}))
    sent: list[str] = []
    published = client.nc.publish

    async def publish(subject, payload=b"", reply="", headers=None):
        sent.append(subject)
        await published(subject, payload, reply=reply, headers=headers)

    client.nc.publish = publish
    return client, sent


async def test_a_request_whose_client_closes_while_it_reads_its_stored_result_ends_at_once(nats_server):
    """A job with its own id reads its stored Result before it is sent; the close came during
    that read. Before: the request then took a fresh reply future nothing cancelled and tried to
    send the job over the closed connection: "NATS did not answer or the connection was lost ...
    check that NATS runs", about a Client the app had closed itself (a close still draining
    would have taken the job and left the request waiting its whole timeout)."""
    client, sent = await recording_client(nats_server.url)

    async def stored_result(job_id, batch=None, *, retry_for=0.0):
        await client.close()  # the app shuts down while the read is under way
        return None

    client.stored_result = stored_result  # type: ignore[method-assign]
    started = asyncio.get_running_loop().time()
    with pytest.raises(NatsUnavailable, match="this Client is closed"):
        await client.request({**JOB, "id": "own-id-1"}, "guest", timeout=30)
    assert asyncio.get_running_loop().time() - started < 5.0
    assert not [s for s in sent if s.startswith(client.subjects.jobs(""))]  # the job was not sent


async def test_a_duplicate_request_whose_client_closes_while_it_is_stored_asks_no_dispatcher(nats_server):
    """A job id already queued is followed over rpc as well (a second message to the
    dispatchers); when the close came while the job was being stored, that message still went
    (found in review): nothing more is sent once the Client is closed."""
    client, sent = await recording_client(nats_server.url)

    async def stored_result(job_id, batch=None, *, retry_for=0.0):
        return None

    async def publish_job(tier, model, *, reply_to=None, payload=None, repeat=False):
        await client.close()  # the app shuts down while the duplicate is being stored
        return False  # JetStream's answer: a duplicate of a message it holds

    client.stored_result = stored_result  # type: ignore[method-assign]
    client._publish = publish_job  # type: ignore[method-assign]
    with pytest.raises(NatsUnavailable, match="closed"):
        await client.request({**JOB, "id": "own-id-2"}, "guest", timeout=30)
    assert client.subjects.rpc("guest") not in sent
