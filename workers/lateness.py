"""How late an assignment reaches this worker, judged by the two wall clocks without trusting them to agree.

The leader stamps when it sent an assignment (`submitted_at + queued_ms`, its wall clock); the
worker reads its own wall clock on arrival. Their difference is the transit time plus the skew
between the two machines' clocks, and a skew of a few seconds (no NTP, a VM resumed with an old
clock) is as large as `worker_timeout_s`. So lateness is measured against the fastest arrival of
the last one to two windows (`window_s`): the skew cancels out, and a forward step of either
clock is forgotten within two windows. Before any arrival the clocks are taken to agree.
"""

from __future__ import annotations

WINDOW_S = 60.0


class Lateness:
    """`late_by(delay, now)`: seconds an arrival with this wall-clock delay came later than the
    fastest recent one `record`ed. `now`: monotonic seconds, only to age the windows. Pure; no clock read."""

    def __init__(self, window_s: float = WINDOW_S) -> None:
        self.window_s = window_s
        self.started: float | None = None
        self.current: float | None = None  # fastest delay seen in this window
        self.previous: float | None = None  # fastest in the window before

    def late_by(self, delay: float, now: float) -> float:
        self._age(now)
        known = [d for d in (self.current, self.previous) if d is not None]
        return delay - (min(known) if known else 0.0)

    def record(self, delay: float, now: float) -> None:
        """An arrival taken as on time (judged so, or its job found not run elsewhere): it may
        set the pace. One found run elsewhere must not, or the next held one would pass as on time."""
        self._age(now)
        self.current = delay if self.current is None else min(self.current, delay)

    def _age(self, now: float) -> None:
        if self.started is not None and now - self.started < self.window_s:
            return
        recent = self.started is not None and now - self.started < 2 * self.window_s
        self.previous = self.current if recent else None
        self.current, self.started = None, now
