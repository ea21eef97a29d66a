"""coalesce_writes: publishes of consecutive loop iterations share one socket write, and
every message still arrives, in order, also after a reconnect (real nats-server)."""

from __future__ import annotations

import asyncio
import contextlib
import statistics
import time
from urllib.parse import urlparse

import nats
import pytest

from ratefleet.runtime.embedded import EmbeddedNats
from ratefleet.runtime.flusher import coalesce_writes

pytestmark = pytest.mark.anyio


def count_writes(nc) -> list[bytes]:
    """Wrap the connection's transport so every writelines call is recorded."""
    writes: list[bytes] = []
    transport = nc._transport
    original = transport.writelines

    def counting(payload):
        writes.append(b"".join(payload))
        return original(payload)

    transport.writelines = counting
    return writes


async def publish_over_iterations(nc, subject: str, n: int) -> None:
    """Pairs of publishes one loop iteration apart (two calls finishing one after the
    other), each pair sent before the next starts."""
    for i in range(0, n, 2):
        await nc.publish(subject, str(i).encode())
        await asyncio.sleep(0)
        await nc.publish(subject, str(i + 1).encode())
        await nc.flush()


async def received(nc, subject: str, n: int) -> list[bytes]:
    got: list[bytes] = []
    done = asyncio.Event()

    async def on_msg(msg):
        got.append(msg.data)
        if len(got) >= n:
            done.set()

    await nc.subscribe(subject, cb=on_msg)
    await nc.flush()
    return got, done


@pytest.mark.parametrize("coalesced", [False, True])
async def test_publishes_of_consecutive_iterations_share_a_write(nats_server, coalesced):
    nc = await nats.connect(nats_server.url)
    listener = await nats.connect(nats_server.url)
    try:
        got, done = await received(listener, "t.flush", 40)
        if coalesced:
            assert await coalesce_writes(nc)
        await nc.flush()
        writes = count_writes(nc)
        await publish_over_iterations(nc, "t.flush", 40)
        await nc.flush()
        await asyncio.wait_for(done.wait(), 10)
        assert got == [str(i).encode() for i in range(40)]
        ours = [w.count(b"PUB t.flush") for w in writes if b"PUB t.flush" in w]
        if coalesced:
            # mostly a pair per write (a busy flusher also waits out MIN_GAP_S, so often more);
            # on a loaded machine a pair now and then goes out in two writes: 22 of 40 seen
            assert sum(ours) == 40 and len(ours) <= 30, f"publishes per write: {ours}"
        else:
            assert ours == [1] * 40  # nats-py alone: one write per iteration (what the swap removes)
    finally:
        await nc.close()
        await listener.close()


async def routed(nc, listener) -> None:
    """Until a probe from `nc` reaches `listener`: both are back on the restarted server and it
    routes between them before the messages the test counts are sent. (In one CI run on a
    loaded machine, fewer than ten messages that plain nats-py published right after both
    reconnected callbacks arrived within 10 s; not reproduced in 24 runs beside four busy
    loops. Core NATS is at most once around a reconnect; the fleet's jobs go through JetStream.)"""
    _, probe = await received(listener, "t.probe", 1)
    while not probe.is_set():
        await nc.publish("t.probe", b"?")
        await nc.flush()
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(probe.wait(), 0.5)


@pytest.mark.parametrize("coalesced", [False, True])
async def test_the_coalescing_flusher_survives_a_reconnect(tmp_path, coalesced):
    nats_server = EmbeddedNats(tmp_path / "nats").start()
    nats_server.port = urlparse(nats_server.url).port  # a restart comes back on the same port
    back = {"nc": asyncio.Event(), "listener": asyncio.Event()}

    def on_reconnect(name):
        async def cb():
            back[name].set()
        return cb

    options = {"reconnect_time_wait": 0.2, "max_reconnect_attempts": -1}
    nc = await nats.connect(nats_server.url, reconnected_cb=on_reconnect("nc"), **options)
    listener = await nats.connect(nats_server.url, reconnected_cb=on_reconnect("listener"), **options)
    try:
        if coalesced:
            assert await coalesce_writes(nc)
        nats_server.stop()
        nats_server.start()
        await asyncio.wait_for(asyncio.gather(back["nc"].wait(), back["listener"].wait()), 30)
        # subscribed before the probe: once a probe reaches the listener, the server has this
        # SUB too (one connection's protocol is in order). Subscribed after it, the first pair
        # was lost now and then (1 run in 7): the flush meant to confirm the SUB returned first
        got, done = await received(listener, "t.after", 10)
        await asyncio.wait_for(routed(nc, listener), 30)
        await publish_over_iterations(nc, "t.after", 10)
        await asyncio.wait_for(done.wait(), 10)
        assert got == [str(i).encode() for i in range(10)]
        assert not coalesced or nc._flusher.__func__.__name__ == "_coalescing_flusher"
    finally:
        await nc.close()
        await listener.close()
        nats_server.stop()


async def test_publishes_close_together_share_a_write_when_busy(nats_server):
    """Publishes 0.1 ms apart over separate iterations (calls finishing one by one under
    load) go out in a few writes, not one each: once BUSY_WAKES publishes in a row come
    within MIN_GAP_S of the write before, each write waits out MIN_GAP_S."""
    ours = await spread_writes(nats_server.url, "t.busy", 30, 0.0001)
    assert sum(ours) == 30 and len(ours) <= 15, f"publishes per write: {ours}"


async def publish_spread(nc, subject: str, n: int, apart_s: float, work_s: float = 0.0,
                         clock=time.perf_counter) -> None:
    """`n` publishes `apart_s` apart, other iterations running in between (calls finishing
    one by one; not a timer's resolution), each iteration spending `work_s` of CPU (other
    callbacks' work in a loaded process)."""
    for i in range(n):
        await nc.publish(subject, str(i).encode())
        until = clock() + apart_s
        while True:
            spin = clock() + work_s
            while clock() < spin:
                pass
            await asyncio.sleep(0)
            if clock() >= until:
                break


@contextlib.contextmanager
def cpu_clock(loop):
    """The loop's clock (the flusher's `loop.time()` and its timers) and the publishes' spacing
    counted in this thread's CPU time while measuring. The busy state lives on sub-millisecond
    spacing and a publish MIN_GAP_S (0.5 ms) after the last write rightly ends it; on a
    loaded 2-core machine the process was preempted for 2-16 ms between publishes 40-100
    times in 400 (measured), so in wall-clock time a run counted 135-334 writes for 400
    publishes with the hold working, and what was measured was the scheduler. In CPU time a
    preemption is no gap, and the spacing is the one the test means. Timers made inside are
    done (or cancelled) inside: they are due in the other clock."""
    loop.time = time.thread_time
    try:
        yield
    finally:
        del loop.time


async def spread_writes(url: str, subject: str, n: int, apart_s: float, work_s: float = 0.0) -> list[int]:
    """`publish_spread` on a coalescing connection: every message arrives, in order; returns
    how many of them each socket write carried."""
    nc = await nats.connect(url)
    listener = await nats.connect(url)
    try:
        got, done = await received(listener, subject, n)
        assert await coalesce_writes(nc)
        await nc.flush()
        writes = count_writes(nc)
        with cpu_clock(asyncio.get_running_loop()):
            await publish_spread(nc, subject, n, apart_s, work_s, clock=time.thread_time)
            await nc.flush()
            await asyncio.wait_for(done.wait(), 10)
        assert got == [str(i).encode() for i in range(n)]
        pub = f"PUB {subject} ".encode()
        return [w.count(pub) for w in writes if pub in w]
    finally:
        await nc.close()
        await listener.close()


async def test_an_idle_connection_writes_without_waiting_out_the_gap(nats_server):
    """Three publishes 0.2 ms apart on a connection that wrote nothing for 50 ms (a worker's
    Result, then its reply once the store is acknowledged) go out as three writes: none waits
    for MIN_GAP_S after the previous write, which would make the third join the second. Five
    trials, most must show it (a preemption between a publish and its write can join two)."""
    nc = await nats.connect(nats_server.url)
    listener = await nats.connect(nats_server.url)
    try:
        assert await coalesce_writes(nc)
        await nc.flush()
        writes = count_writes(nc)
        shapes = []
        for trial in range(5):
            subject = f"t.idle.{trial}"
            got, done = await received(listener, subject, 3)
            await asyncio.sleep(0.05)  # idle: the first publish comes long after the last write
            start = len(writes)
            await publish_spread(nc, subject, 3, 0.0002)
            await asyncio.wait_for(done.wait(), 10)
            assert got == [b"0", b"1", b"2"]
            pub = f"PUB {subject} ".encode()
            shapes.append([w.count(pub) for w in writes[start:] if pub in w])
        assert sum(shape == [1, 1, 1] for shape in shapes) >= 3, shapes
    finally:
        await nc.close()
        await listener.close()


async def test_publishes_in_pairs_with_time_between_do_not_wait_out_the_gap(nats_server):
    """A worker at 500 requests/s: a Result, its reply 0.3 ms later (the store acknowledged),
    then 1.2 ms with nothing (about 1,300 writes a second wanted, under the 2,000 of "busy").
    The reply goes out in the loop iteration after it is published. Before, four writes within
    2 ms made the connection busy, and busy lasted until 2 ms passed without a write, which at
    this pace never happens: every reply waited out the rest of MIN_GAP_S, which asyncio's
    millisecond epoll timeout makes up to 1 ms (the fleet's Client.request at 500/s measured
    0.8 ms lower at the median without that wait). Wall clock, median over 60 pairs."""
    nc = await nats.connect(nats_server.url)
    listener = await nats.connect(nats_server.url)
    try:
        got, done = await received(listener, "t.pairs", 120)
        assert await coalesce_writes(nc)
        await nc.flush()
        written: list[tuple[float, bytes]] = []
        transport = nc._transport
        original = transport.writelines

        def timed(payload):
            written.append((time.perf_counter(), b"".join(payload)))
            return original(payload)

        transport.writelines = timed
        published: dict[bytes, float] = {}

        async def spin(seconds: float) -> None:
            until = time.perf_counter() + seconds
            while time.perf_counter() < until:
                await asyncio.sleep(0)

        for i in range(60):
            for n, pause in ((2 * i, 0.0003), (2 * i + 1, 0.0012)):
                published[str(n).encode()] = time.perf_counter()
                await nc.publish("t.pairs", str(n).encode())
                await spin(pause)
        await nc.flush()
        await asyncio.wait_for(done.wait(), 10)
        assert got == [str(i).encode() for i in range(120)]
        waits = []
        for i in range(60):
            body = str(2 * i + 1)
            reply = f"PUB t.pairs  {len(body)}\r\n{body}\r\n".encode()
            when = next(at for at, data in written if reply in data)
            waits.append(when - published[str(2 * i + 1).encode()])
        assert statistics.median(waits) < 0.00015, f"median wait {statistics.median(waits) * 1e3:.3f} ms"
    finally:
        await nc.close()
        await listener.close()


async def test_a_loaded_process_stays_busy_while_its_writes_are_spaced_by_the_gap(nats_server):
    """Publishes 0.1 ms apart while each loop iteration also spends 0.3 ms of CPU (a loaded
    worker): the spaced writes themselves must not end "busy" (busy is read from when the
    publishes come, which the gap does not space), else every few writes three go out
    unthrottled. Measured: ~25 % as many writes as publishes with the hold, ~57 % without."""
    ours = await spread_writes(nats_server.url, "t.loaded", 400, 0.0001, work_s=0.0003)
    assert sum(ours) == 400 and len(ours) <= 160, f"{len(ours)} writes for 400 publishes"


async def test_a_client_of_another_shape_is_left_alone():
    class NotNats:
        is_connected = True

    assert await coalesce_writes(NotNats()) is False
