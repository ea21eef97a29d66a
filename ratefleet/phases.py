"""Progress of long CLI phases (validating, submitting, results) with rate and ETA.

On a terminal: rich progress bars. Elsewhere (a pipe, a CI log, `NO_COLOR` is honoured by
rich itself): one plain line per phase every `every_s` seconds and one when it ends, e.g.

    submitting: 120,000/1,000,000 jobs (61,204/s, ETA 14s)

and, while a phase does not move (`remind`), one every 30 s saying so:

    results: 0/101 results (0/s; nothing new for 30s; `ratefleet status` shows the keys and workers)
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

import anyio
from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    ProgressColumn,
    Task,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.text import Text

STALL_HINT = "`ratefleet status` shows the keys (cooling, disabled) and the workers"


class RateColumn(ProgressColumn):
    """Items per second, e.g. `61,204/s`."""

    def render(self, task: Task) -> Text:
        return Text(f"{task.speed:,.0f}/s" if task.speed else "", style="progress.data.speed")


@dataclass
class _Plain:
    name: str
    unit: str
    total: float | None
    done: float = 0.0
    base: float = 0.0  # done before the phase began (e.g. Results stored before a resume): not in the rate
    started: float = field(default_factory=time.monotonic)
    printed: float = field(default_factory=time.monotonic)
    changed: float = field(default_factory=time.monotonic)  # when `done` last moved
    finished: bool = False


class Phases:
    """Progress display for a few phases. Use as a context manager."""

    def __init__(self, console: Console, every_s: float = 2.0) -> None:
        self.console = console
        self.every_s = every_s
        self.rich = console.is_terminal
        self._progress = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), RateColumn(),
                                  TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn(),
                                  console=console, transient=False) if self.rich else None
        self._plain: dict[int, _Plain] = {}
        self._bases: dict[int, float] = {}  # (terminal) a phase's base: its bar never moves below it

    def __enter__(self) -> Phases:
        if self._progress:
            self._progress.start()
        return self

    def __exit__(self, *exc: object) -> None:
        if self._progress:
            self._progress.stop()

    def start(self, name: str, total: float | None, unit: str = "", base: float = 0) -> int:
        """Begin a phase; returns its handle. `base`: how much of it was done before it began
        (Results stored before a resumed run, read back at once): counted, but left out of the
        rate and the ETA."""
        if self._progress:
            handle = self._progress.add_task(f"{name:<11}", total=total, completed=base)
            self._bases[handle] = base
            return handle
        handle = len(self._plain)
        self._plain[handle] = _Plain(name, unit, total, base=base)
        return handle

    def update(self, handle: int, *, completed: float | None = None, advance: float = 0,
               total: float | None = None) -> None:
        """Set or advance a phase's count (and its total when it became known)."""
        if self._progress:
            if completed is not None:  # read back from 0: below the base the bar (and its speed) stays put
                completed = max(completed, self._bases.get(handle, 0))
            self._progress.update(handle, completed=completed, advance=advance or None, total=total)
            return
        phase = self._plain[handle]
        done = completed if completed is not None else phase.done + advance
        if done != phase.done:
            phase.done, phase.changed = done, time.monotonic()
        if total is not None:
            phase.total = total
        now = time.monotonic()
        if now - phase.printed >= self.every_s:
            phase.printed = now
            self._say(phase, now)

    async def remind(self, handle: int, quiet_s: float = 30.0,
                     hint: str | Callable[[], Awaitable[str]] = "") -> None:
        """Until the phase finishes (run it as a task; cancel it after): off a terminal, when
        nothing was printed for `quiet_s` seconds, print the phase's line anyway, saying how
        long it has not moved, plus `hint` (what to look at; a coroutine function is asked
        each time, e.g. whether the batch was cancelled since). A terminal's bar shows that
        itself (its elapsed time runs on)."""
        if self._progress:
            return
        phase = self._plain[handle]
        while not phase.finished:
            await anyio.sleep(min(5.0, quiet_s))
            now = time.monotonic()
            if not phase.finished and now - phase.printed >= quiet_s:
                phase.printed = now
                said = hint if isinstance(hint, str) else await hint()
                self._say(phase, now, still=f"nothing new for {now - phase.changed:.0f}s" + (f"; {said}" if said else ""))

    def finish(self, handle: int) -> None:
        """The phase ended (it may have stopped short of its total)."""
        if self._progress:
            self._progress.stop_task(handle)
            return
        phase = self._plain[handle]
        if not phase.finished:
            phase.finished = True
            self._say(phase, time.monotonic(), final=True)

    def print(self, message: str, style: str | None = None) -> None:
        """One line of text (never read as markup: it may quote a user's line)."""
        self.console.print(message, style=style, highlight=False, markup=False, soft_wrap=True)

    def _say(self, phase: _Plain, now: float, final: bool = False, still: str = "") -> None:
        elapsed = max(now - phase.started, 1e-6)
        rate = max(0.0, phase.done - phase.base) / elapsed
        total = f"/{phase.total:,.0f}" if phase.total else ""
        if final and phase.base and phase.done <= phase.base:  # nothing new: "in 0.1s, 0/s" read as a stall
            tail = f"in {elapsed:.1f}s; all stored before this command"
        elif final:
            tail = f"in {elapsed:.1f}s, {rate:,.0f}/s"
        elif phase.done < phase.base:  # still reading back what was stored before: its own rate, no ETA
            tail = f"reading back the {phase.base:,.0f} stored earlier, {phase.done / elapsed:,.0f}/s" + (
                f"; {still}" if still else "")
        else:
            eta = (phase.total - phase.done) / rate if phase.total and rate > 0 else None
            tail = f"{rate:,.0f}/s" + (f", ETA {eta:.0f}s" if eta is not None else "") + (f"; {still}" if still else "")
        self.console.print(f"{phase.name}: {phase.done:,.0f}{total} {phase.unit} ({tail})".replace("  ", " "),
                           highlight=False, markup=False, soft_wrap=True)
