"""A JetStream that takes a job's publish and never acknowledges it, while the connection is up
(real nats-server): a stream that lost its files to a deletion under way takes no job for good
and only nats-server's log says why (ratefleet/runtime/streams.py `Rebuilder`). Here a plain
subscriber on the tier's subject stands in for it: it answers nothing, so no 503 comes either.
`submit` and `request` end saying NATS is connected and where the reason is, not "is the NATS
server up?" (it is), and still that the same id is safe to send again."""

from __future__ import annotations

import nats
import pytest

from ratefleet import Client
from ratefleet.runtime.store import publish_job
from ratefleet.schemas import Subjects
from ratefleet.schemas.errors import RequestTimeout, SubmitError

pytestmark = pytest.mark.anyio
SUBJECTS = Subjects("ratefleet")


async def _silent(nc) -> None:
    async def swallow(msg) -> None:
        pass

    await nc.subscribe(SUBJECTS.jobs("vip"), cb=swallow)  # a responder that never answers
    await nc.flush()


async def test_a_submit_nats_never_acknowledges_says_nats_is_up_and_where_to_look(nats_server):
    nc = await nats.connect(nats_server.url)
    try:
        await _silent(nc)
        with pytest.raises(SubmitError) as refused:
            await publish_job(nc.jetstream(), SUBJECTS, "vip", "job-1", b"{}", timeout=0.2, retry_for=0.5)
        text = str(refused.value)
        assert "NATS did not confirm job job-1" in text and "Resubmitting with the same id is safe" in text
        assert "NATS is connected, but JetStream did not acknowledge it" in text
        assert "RATEFLEET_JOBS" in text and "the NATS server's log then says why" in text
        assert "Is the NATS server up?" not in text
    finally:
        await nc.close()


async def test_a_request_nats_never_acknowledges_points_at_the_servers_log(nats_server):
    async with await Client.connect(nats_server.url) as client:
        await _silent(client.nc)
        with pytest.raises(RequestTimeout) as timed_out:
            await client.request({"request": {"path": "/v1/chat/completions", "json": {"model": "m", "messages": []}}},
                                 "vip", timeout=0.6)
        text = str(timed_out.value)
        assert "NATS did not confirm storing it (its acknowledgement had not come)" in text
        assert "request it again with the same id" in text
        assert "the NATS server's log says why JetStream stores nothing" in text
        assert timed_out.value.reason is None
