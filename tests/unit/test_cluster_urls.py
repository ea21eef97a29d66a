"""A comma-separated `[nats] url` (a cluster's servers) and topology set-up that waits out
a cluster electing a stream leader."""

from __future__ import annotations

import nats.errors
import pytest

from ratefleet.runtime.connect import connect, server_list
from ratefleet.runtime.embedded import port_answers
from ratefleet.runtime.streams import ensure_topology, kv_buckets
from ratefleet.schemas import Config, Subjects

pytestmark = pytest.mark.anyio

DEAD = "nats://127.0.0.1:1"  # nothing listens on port 1


def config(url: str, replicas: int = 1) -> Config:
    return Config.model_validate({
        "nats": {"url": url}, "upstreams": {"m": {"base_url": "http://127.0.0.1:9"}},
        "pools": {"p": {"keys": [{"id": "k1", "secret": "x", "rps": 1}]}}, "streams": {"replicas": replicas}})


def test_server_list_splits_trims_and_keeps_order():
    assert server_list("nats://a:4222") == ["nats://a:4222"]
    assert server_list(" nats://a:4222, nats://u:p@b:4223 ,,tls://c:4224 ") == [
        "nats://a:4222", "nats://u:p@b:4223", "tls://c:4224"]


def test_port_answers_takes_a_list(nats_server):
    assert port_answers(f"{DEAD},{nats_server.url}")
    assert not port_answers(f"{DEAD},{DEAD}")


async def test_connect_reaches_the_server_that_answers_in_a_list(nats_server):
    for url in (f"{DEAD},{nats_server.url}", f"{nats_server.url}, {DEAD}"):
        nc = await connect(url, name="test-list", forever=False, connect_timeout=2)
        try:
            assert nc.is_connected
            await nc.publish("x.y", b"1")
            await nc.flush()
        finally:
            await nc.close()


def test_every_kv_bucket_of_the_fleet_is_listed():
    subjects = Subjects()
    names = [bucket for bucket, _, _ in kv_buckets(config("nats://x:4222"))]
    assert names == [subjects.handbacks_bucket, subjects.leader_bucket, subjects.leader_bucket + "_seen",
                     subjects.keys_bucket, subjects.config_bucket]


class FlakyJs:
    """A JetStreamContext whose first `timeouts` stream_info requests time out, as a cluster's
    do while a just-created stream has no leader yet."""

    def __init__(self, js, timeouts: int):
        self._js, self.timeouts = js, timeouts

    async def stream_info(self, *args, **kwargs):
        if self.timeouts:
            self.timeouts -= 1
            raise nats.errors.TimeoutError
        return await self._js.stream_info(*args, **kwargs)

    def __getattr__(self, name):
        return getattr(self._js, name)


async def test_topology_waits_out_api_timeouts(nats_server):
    nc = await nats.connect(nats_server.url)
    try:
        js = nc.jetstream()
        await ensure_topology(FlakyJs(js, timeouts=2), config(nats_server.url))
        info = await js.stream_info(Subjects().jobs_stream)
        assert info.config.name == Subjects().jobs_stream
        with pytest.raises(TimeoutError):
            await ensure_topology(FlakyJs(js, timeouts=10**6), config(nats_server.url), patience_s=1.0)
    finally:
        await nc.close()


async def test_ensure_topology_creates_every_kv_bucket(nats_server):
    """One server holds R1 only; the R3 check runs on three (tests/e2e/test_jetstream_cluster.py)."""
    nc = await nats.connect(nats_server.url)
    try:
        js = nc.jetstream()
        await ensure_topology(js, config(nats_server.url))
        streams = {info.config.name for info in await js.streams_info()}
        assert {f"KV_{bucket}" for bucket, _, _ in kv_buckets(config(nats_server.url))} <= streams
    finally:
        await nc.close()


async def test_a_cancel_ends_the_reachability_probe_of_a_server_that_never_answers():
    # a listener with a full backlog drops further SYNs: a connect to it hangs, like one to a
    # firewalled host. The probe used to block the loop for connect_timeout (5 s a server), so a
    # Ctrl-C of `ratefleet submit` waited that long; now it is a cancellable wait
    import contextlib
    import socket
    import time

    import anyio

    from ratefleet.schemas.errors import NatsUnavailable

    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(0)
    port = listener.getsockname()[1]
    backlog = []
    for _ in range(8):
        pending = socket.socket()
        pending.setblocking(False)
        try:
            pending.connect(("127.0.0.1", port))
        except BlockingIOError:
            pass
        backlog.append(pending)
    try:
        started = time.monotonic()
        with anyio.move_on_after(0.3), contextlib.suppress(NatsUnavailable):  # (a kernel that refuses: at once)
            await connect(f"nats://127.0.0.1:{port}", name="t", forever=False, connect_timeout=5)
        assert time.monotonic() - started < 2.0
        with pytest.raises(NatsUnavailable, match="nothing answers"):  # and a short timeout still says so
            await connect(f"nats://127.0.0.1:{port},{DEAD}", name="t", forever=False, connect_timeout=0.2)
    finally:
        for sock in [*backlog, listener]:
            sock.close()
