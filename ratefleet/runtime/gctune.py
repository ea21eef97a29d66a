"""Less time in Python's cyclic garbage collector for a long-running role process.

Measured (bench/throughput.py, 6,000 jobs, gc.callbacks timing in each process): with the
interpreter's defaults (thresholds 700/10/10) a worker spent about 13 % of its CPU in the
collector and the dispatcher about 8 %: every few jobs a young-generation pass over the
objects of the calls in flight, and now and then a full pass over everything the imports
left behind (pydantic, OpenTelemetry, prometheus_client: ~300 ms each on a busy machine).

`quiet_gc()` is called once a role has started: it collects once, moves every object alive
then into the permanent generation (`gc.freeze()`, Python docs "gc" module: the objects a
process keeps for its lifetime are never scanned again), and raises the young-generation
threshold so most per-job objects are freed by reference counting before any pass runs.
Reference cycles are still collected, only less often; the memory they hold meanwhile is
bounded by YOUNG_THRESHOLD container allocations.

`imports_without_gc()` runs a process's start-up imports with the collector off: importing the
CLI and a role (pydantic models, nats-py, aiohttp, OpenTelemetry) allocates hundreds of
thousands of containers that all live on, and the collector passed over them 176 times, 77 ms
of the 793 ms of CPU that `import ratefleet.cli, ratefleet.roles` took (timed with
`gc.callbacks`). Every fleet process and CLI command starts this way; the test suite starts
about 700 of them.
"""

from __future__ import annotations

import contextlib
import gc
from collections.abc import Iterator

YOUNG_THRESHOLD = 20_000  # net container allocations between young-generation passes (default 700)
OLDER_THRESHOLDS = (20, 20)  # passes of the generation below between passes of the next (default 10, 10)


def quiet_gc() -> tuple[int, int, int]:
    """Freeze what the process holds after start-up and raise the collection thresholds.
    Returns the thresholds that were in force before (for tests and for undoing it)."""
    before = gc.get_threshold()
    gc.collect()
    gc.freeze()
    gc.set_threshold(YOUNG_THRESHOLD, *OLDER_THRESHOLDS)
    return before


@contextlib.contextmanager
def imports_without_gc() -> Iterator[None]:
    """The cyclic collector off for the block (start-up imports, module docstring), and back to
    what it was after it, also when an import fails. Objects stay freed by reference counting;
    cycles made inside the block are collected by the next pass after it."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()
