"""Off a terminal, a phase that does not move still says so (ratefleet/phases.py `remind`):
`submit --wait` and `results --wait` printed nothing for minutes while the keys were cooling
(a new user's trial: stderr stayed at 5 lines for more than 30 s)."""

from __future__ import annotations

import io
import re
import time

import anyio
import pytest
from rich.console import Console

from ratefleet.phases import Phases

pytestmark = pytest.mark.anyio


async def test_a_phase_that_does_not_move_is_reported_with_what_to_look_at():
    out = io.StringIO()
    with Phases(Console(file=out, force_terminal=False, width=200), every_s=0.05) as phases:
        handle = phases.start("results", 101, unit="results")
        async with anyio.create_task_group() as tg:
            tg.start_soon(phases.remind, handle, 0.2, "look here")
            await anyio.sleep(0.5)
            quiet = out.getvalue()
            phases.update(handle, completed=3)  # moves: printed (every_s passed), and the quiet clock restarts
            phases.finish(handle)  # the reminder ends by itself
    assert re.search(r"^results: 0/101 results \(0/s; nothing new for \d+s; look here\)$", quiet, re.MULTILINE), quiet
    assert out.getvalue().rstrip().endswith("/s)") and "results: 3/101" in out.getvalue()


async def test_a_terminal_gets_no_reminder_lines():
    out = io.StringIO()
    with Phases(Console(file=out, force_terminal=True, width=200)) as phases:
        handle = phases.start("results", 10, unit="results")
        with anyio.fail_after(1):
            await phases.remind(handle, 0.1, "x")  # returns at once: the bar shows the time itself
        phases.finish(handle)
    assert "nothing new" not in out.getvalue()


def test_results_stored_before_a_resume_are_not_in_the_rate_or_the_eta(monkeypatch):
    """A resumed `--wait` reads 4,945 stored Results back at once: they count, but the rate is
    what came since (a new user saw `4,945/20,000 (2,455/s, ETA 6s)` with 7 minutes left)."""
    out = io.StringIO()
    with Phases(Console(file=out, force_terminal=False, width=200), every_s=1.0) as phases:
        handle = phases.start("results", 20_000, unit="results", base=4_945)
        # the phase's own clock fields start from the real clock (dataclass default factories),
        # so the fake one starts from the real one read after them: set 1 ms ahead before the
        # start, it was behind them once the process lost the CPU for a millisecond in between
        # (a loaded run: the line at +1.0 s was never printed, 'results: 1,000/20,000' missing)
        clock = [time.monotonic()]
        monkeypatch.setattr("ratefleet.phases.time.monotonic", lambda: clock[0])
        clock[0] += 1.0
        phases.update(handle, completed=1_000)  # read back so far: said as such, not "(0/s)"
        clock[0] += 0.5
        phases.update(handle, completed=4_945)  # read back
        clock[0] += 8.5
        phases.update(handle, completed=5_245)  # 300 new in 10 s
    assert "results: 1,000/20,000 results (reading back the 4,945 stored earlier, " in out.getvalue(), \
        out.getvalue()
    assert "results: 5,245/20,000 results (30/s, ETA 492s)" in out.getvalue(), out.getvalue()
    terminal = io.StringIO()
    with Phases(Console(file=terminal, force_terminal=True, width=200)) as phases:
        handle = phases.start("results", 20_000, unit="results", base=4_945)
        phases.update(handle, completed=12)  # reading back from 0: the bar stays at its base
        assert phases._progress.tasks[0].completed == 4_945


async def test_a_hint_given_as_a_coroutine_function_is_asked_at_each_reminder():
    out = io.StringIO()
    asked = []

    async def hint() -> str:
        asked.append(1)
        return f"asked {len(asked)} times"

    with Phases(Console(file=out, force_terminal=False, width=200), every_s=0.05) as phases:
        handle = phases.start("results", 5, unit="results")
        async with anyio.create_task_group() as tg:
            tg.start_soon(phases.remind, handle, 0.2, hint)
            await anyio.sleep(0.7)
            phases.finish(handle)
    assert "; asked 1 times)" in out.getvalue() and "; asked 2 times)" in out.getvalue(), out.getvalue()


async def test_the_wait_of_a_cancelled_batch_says_it_is_cancelled_not_to_look_at_keys(nats_server):
    """`ratefleet cancel --batch cx1` while 20,000 jobs of another batch were queued before cx1's
    in tier normal: `submit --wait` of cx1 printed 'results: 0/5,000 results (0/s; nothing new
    for 120s; `ratefleet status` shows the keys (cooling, disabled) and the workers)' for two
    minutes, the keys and workers being fine. The reminder now says the batch is cancelled
    and when its jobs end."""
    from ratefleet import Client
    from ratefleet.batches import waiting_hint
    from ratefleet.phases import STALL_HINT
    from ratefleet.runtime.cancels import mark_cancelled
    from ratefleet.runtime.streams import ensure_topology
    from ratefleet.schemas.config import parse_config

    async with await Client.connect(nats_server.url) as client:
        await ensure_topology(client.js, parse_config({}))
        assert await waiting_hint(client.js, client.subjects, "cx1") == STALL_HINT
        await mark_cancelled(client.js, client.subjects, "cx1", by="test")
        said = await waiting_hint(client.js, client.subjects, "cx1")
        assert said.startswith("batch cx1 is cancelled: its queued jobs end `cancelled` without a call when the "
                               "dispatcher reaches them in their tier's queue"), said
        assert await waiting_hint(client.js, client.subjects, "other") == STALL_HINT


def test_a_phase_that_found_everything_stored_before_says_so_not_0_per_s():
    """A new user's finding: `results --wait` of a finished batch ended "(in 0.1s, 0/s)"."""
    out = io.StringIO()
    with Phases(Console(file=out, force_terminal=False, width=200), every_s=60) as phases:
        handle = phases.start("results", 19, unit="results", base=19)
        phases.update(handle, completed=19)
        phases.finish(handle)
        moved = phases.start("results", 20, unit="results", base=19)
        phases.update(moved, completed=20)
        phases.finish(moved)
    first, second = [line for line in out.getvalue().splitlines() if line.startswith("results: ")][-2:]
    assert first.endswith("; all stored before this command)") and "0/s" not in first, out.getvalue()
    assert re.search(r"results: 20/20 results \(in [\d.]+s, [\d,]+/s\)$", second), out.getvalue()
