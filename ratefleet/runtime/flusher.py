"""Fewer socket writes from nats-py: its flusher waits one more loop iteration before writing.

nats-py (2.16) queues every publish in memory and wakes a flusher task that writes what is
pending in one `writelines`. The flusher runs in the loop iteration after the publish, so
publishes made by callbacks of different iterations (a worker's 64 calls each finishing on
its own) go out as one small write each; on a busy 2-core machine such a write costs about
as much CPU as the Python work of a job (see ../shared/measurements.md). With one yield
before the write, the publishes of the next iteration ride along. While the process is busy
(its last BUSY_WAKES publishes that woke the flusher each came less than MIN_GAP_S after the
write before: above about 2,000 writes a second wanted) and the last write is less than
MIN_GAP_S (0.5 ms) old, the flusher also waits until it is, so a busy process writes at most
about 2,000 times a second however its publishes are spread: fewer, larger writes, for at
most 0.5 ms of latency (asyncio's epoll timeout counts whole milliseconds, so up to 1 ms in a
loop with nothing else to do).
Measured (bench/throughput.py, 4,000 jobs, strace on the fleet): NATS socket writes per job
in a worker ~1.5 -> ~1.05, in the dispatcher 0.83 -> 0.72.

Busy used to start with 4 writes within 2 ms and last until a publish came 2 ms after the last
write. A worker at 500 requests/s (a Result, its reply 0.2-0.4 ms later, about 1,000-1,500
writes a second) met the first now and then and never the second, so from then on every reply
waited out the gap: `Client.request` at 500 arrivals/s, median 3.9 ms with that wait and
2.8-3.2 ms without (three runs each, nginx upstream), the same jobs/s and CPU per job in
bench/throughput.py.

An idle process writes after the one yield. Before, the wait applied whenever the last write
was recent, so on the request path of a single `Client.request` a worker's reply (sent when
the Result's store is acknowledged, 0.2-0.4 ms after the Result's own write) and a
dispatcher's assignment waited out the rest of the 0.5 ms: two fleets side by side, requests
alternating one at a time, the paired median came out 0.56-1.26 ms lower without that wait
(three runs), with the same jobs/s and CPU per job under a 20,000-job backlog.

`coalesce_writes(nc)` swaps the flusher of a connected client (and of every reconnect,
which starts `nc._flusher()` anew). It only replaces private parts of nats-py whose shape
it checks first; with another nats-py it leaves the client as it is and returns False.
"""

from __future__ import annotations

import asyncio
import math
import types

from nats.aio.client import Client as NatsClient

MIN_GAP_S = 0.0005  # seconds: under load, at most one write per this gap
BUSY_WAKES = 4  # busy: this many wakes in a row each came less than MIN_GAP_S after the last write


async def _coalescing_flusher(self: NatsClient) -> None:
    """nats-py 2.16's `Client._flusher`, with one `sleep(0)` between waking and writing, and,
    while busy, a wait until MIN_GAP_S has passed since the last write. Busy: the last
    BUSY_WAKES wakes (a publish asking for a write) each came less than MIN_GAP_S after the
    write before it, i.e. publishes want more than about 2,000 writes a second. Measured on
    the demand (when a publish comes), not on the writes, so the gap's own spacing does not
    end it, and a process whose publishes come in pairs 0.2-0.4 ms apart (a worker's Result,
    then its reply once the store is acknowledged) with more time between pairs is not busy."""
    loop = asyncio.get_running_loop()
    last_write = -math.inf
    close_wakes = 0  # wakes in a row that came less than MIN_GAP_S after the last write
    while True:
        if not self.is_connected or self.is_connecting:
            break
        future: asyncio.Future = await self._flush_queue.get()
        try:
            close_wakes = close_wakes + 1 if loop.time() - last_write < MIN_GAP_S else 0
            await asyncio.sleep(0)  # the publishes of the callbacks ready now join this write
            if close_wakes >= BUSY_WAKES:  # the publishes of the rest of the half millisecond join it too
                gap = loop.time() - last_write
                if gap < MIN_GAP_S:
                    await asyncio.sleep(MIN_GAP_S - gap)
            if self._pending_data_size > 0:
                self._transport.writelines(self._pending[:])
                self._pending = []
                self._pending_data_size = 0
                last_write = loop.time()
                await self._transport.drain()
        except OSError as exc:
            await self._error_cb(exc)
            await self._process_op_err(exc)
            break
        except (asyncio.CancelledError, RuntimeError, AttributeError):
            break
        finally:
            if not future.done():
                future.set_result(None)


def _has_expected_shape(nc: NatsClient) -> bool:
    return all(hasattr(nc, name) for name in ("_flusher", "_flusher_task", "_flush_queue", "_pending",
                                              "_pending_data_size", "_transport", "_flush_pending"))


async def coalesce_writes(nc: NatsClient) -> bool:
    """Make `nc` (connected) write its pending publishes one loop iteration later, in fewer
    writes. True when done; False (nothing changed) when nats-py is not shaped as expected."""
    if not _has_expected_shape(nc) or not nc.is_connected:
        return False
    nc._flusher = types.MethodType(_coalescing_flusher, nc)  # reconnects start this one
    old = nc._flusher_task
    if old is not None and not old.done():
        old.cancel()
        try:
            await old
        except asyncio.CancelledError:
            pass
    nc._flusher_task = asyncio.get_running_loop().create_task(nc._flusher())
    await nc._flush_pending()  # what the old flusher left pending goes out now
    return True
