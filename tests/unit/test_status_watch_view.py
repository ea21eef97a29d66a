"""The pieces of `ratefleet status --watch` (ratefleet/status_watch.py): done/s between
answers, the queued count, the config revision, and the loop's frames and clean stop."""

from __future__ import annotations

import io
import os
import signal

import pytest
from rich.console import Console

from ratefleet.status_watch import DoneRates, config_revision, render_watch, waiting, watch


def answer(at: float, dispatched: int, in_flight: int, **extra) -> dict:
    return {"at": at, "leader": "d1", "dispatcher": "d1",
            "tiers": {"normal": {"queued": 5, "pending": 3, "in_flight": in_flight, "dispatched": dispatched}},
            "keys": {"k1": {"rps": 20, "effective_rps": 10.0, "tokens": 1.5, "in_flight": in_flight,
                            "concurrency": 4, "disabled": True, "disabled_by": "operator",
                            "disabled_reason": "rotating"}},
            "workers": [{"id": "w1", "slots": 8, "in_flight": in_flight, "calls": dispatched}], **extra}


def test_done_per_second_between_two_answers():
    rates = DoneRates()
    assert rates.update(answer(100.0, 10, 2)) == {"normal": None}  # nothing to compare with yet
    assert rates.update(answer(102.0, 30, 4)) == {"normal": pytest.approx((26 - 8) / 2)}
    # a new leader counts from zero: no rate for that interval, then rates again
    assert rates.update(answer(103.0, 2, 1)) == {"normal": None}
    assert rates.update(answer(104.0, 6, 1)) == {"normal": pytest.approx(4.0)}


def test_queued_counts_the_stream_and_the_leaders_window():
    assert waiting({"queued": 5, "pending": 3}) == 8
    assert waiting({"queued": 5}) == 5
    assert waiting({}) is None


@pytest.mark.parametrize("status, shown", [
    ({}, "-"), ({"config_revision": 7}, "7"), ({"revision": 3}, "3"), ({"config": {"revision": 12}}, "12"),
])
def test_config_revision(status, shown):
    assert config_revision(status) == shown


def test_a_frame_names_leader_revision_tiers_keys_and_workers():
    console = Console(file=io.StringIO(), width=140, color_system=None)
    console.print(render_watch(answer(100.0, 10, 2, config_revision=4), {"normal": 2.5}, 1.0))
    text = console.file.getvalue()
    assert "leader d1" in text and "config revision 4" in text
    row = next(line for line in text.splitlines() if "normal" in line)
    assert [c.strip() for c in row.split("│") if c.strip()] == ["normal", "8", "2", "2.5", "3"]
    assert "10.0 / 20" in text and "2/4" in text and "DISABLED by an operator: rotating" in text
    assert "w1" in text


@pytest.mark.anyio
async def test_not_on_a_terminal_frames_follow_each_other_and_a_signal_ends_the_watch_with_0():
    console = Console(file=io.StringIO(), width=140, color_system=None, force_terminal=False)
    calls = 0

    async def fetch() -> dict:
        nonlocal calls
        calls += 1
        if calls == 2:
            raise TimeoutError("no dispatcher answered")
        if calls == 4:
            os.kill(os.getpid(), signal.SIGINT)  # Ctrl-C
        return answer(100.0 + calls, 10 * calls, 1)

    assert await watch(fetch, 0.05, console) == 0
    text = console.file.getvalue()
    assert text.count("leader d1") == 3 and "no status answer (TimeoutError: no dispatcher answered)" in text


def test_both_views_show_a_keys_token_budget_as_left_of_per_minute():
    """A tokens-per-minute key shows what it may spend now of its budget; before, `status`
    said "cost tokens 51832.76" beside "tokens 1.69" (the request bucket) and `--watch` showed
    no token budget at all."""
    from ratefleet.status_view import render_status

    status = answer(100.0, 10, 2)
    status["keys"]["k1"].update(disabled=False, cost_per_minute=100000, cost_tokens=51832.76, pool="p")
    for draw in (lambda c: c.print(render_watch(status, {"normal": 2.5}, 1.0)), lambda c: render_status(status, c)):
        console = Console(file=io.StringIO(), width=200, color_system=None)
        draw(console)
        text = console.file.getvalue()
        assert "token budget left / per min" in text and "51,833 / 100,000" in text and "req tokens" in text
