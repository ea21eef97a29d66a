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
"""

from __future__ import annotations

import gc

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
