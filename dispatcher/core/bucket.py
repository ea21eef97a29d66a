"""Token bucket with `now` passed in, after golang.org/x/time/rate.

`advance(now)` computes the level at `now` and changes nothing; the few mutating methods
move the bucket to `now` first. Time never goes backwards: an earlier `now` counts as the
last one seen.

Giving tokens back (a cancelled reservation, an actual cost below the estimate) is where a
naive bucket overspends: if the bucket refilled to capacity while the tokens were held,
the refill was clamped and adding them back would let more through than a provider's
bucket that never saw the call. So `refund` only returns what the bucket could not have
absorbed: at most the smallest headroom (`capacity - level`) the bucket had since the
reservation, in a history where earlier refunds are already applied. The history is kept
as "fill" values (`level - capacity`, the negated headroom) in a short decreasing list
indexed by mutation sequence numbers ("marks"), so it stays right when the capacity
changes. This keeps the bucket at or below the provider's own bucket (same rate and
capacity) as long as the actual cost of a call does not exceed its reserved cost.

`set_rate(now, rate, capacity)` changes the refill rate (and capacity) at `now`: tokens
accrued up to `now` at the old rate are kept (cut to a smaller capacity, never raised),
and from `now` on the new rate applies, so a change never grants more than either rate
would have.
"""

from __future__ import annotations

import bisect
import math

# Tolerance for float rounding when comparing a level with a request.
EPSILON = 1e-9
_MAX_PEAKS = 256


class TokenBucket:
    """Refills at `rate` tokens per second up to `capacity`; may go negative (debt)."""

    def __init__(self, rate: float, capacity: float, tokens: float, now: float) -> None:
        if rate <= 0 or capacity <= 0:
            raise ValueError("bucket rate and capacity must be > 0")
        self.rate = rate
        self.capacity = capacity
        self._tokens = min(tokens, capacity)
        self._last = now
        self._seq = 0
        self._peaks: list[tuple[int, float]] = []  # (seq, level - capacity), strictly decreasing
        self._forgotten = -1  # marks <= this lost their peak history
        self._cap: tuple[float, float] | None = None  # (at, level): `cap_at`, not yet reached

    def advance(self, now: float) -> float:
        """The level at `now`, without changing anything."""
        tokens, last = self._tokens, self._last
        if self._cap is not None and now >= self._cap[0]:
            at, level = self._cap
            tokens, last = min(self.capacity, tokens + (at - last) * self.rate, level), at
        elapsed = max(0.0, now - last)
        return min(self.capacity, tokens + elapsed * self.rate)

    def cap_at(self, at: float, level: float) -> None:
        """At time `at` the level is cut to at most `level`, and refills from there (a later call
        replaces an earlier cap still ahead). Applied when time passes `at`, whatever changes the
        bucket meanwhile (a rate change, a refund: they act before the cut, as they happened);
        tokens spent before the cut are not given back after it (their marks lose their history:
        the cut is a new start). `at` not after the last change: cut now."""
        if at <= self._last:
            self._cap = None
            self._cut(self._last, level)
        else:
            self._cap = (at, level)

    def ready_at(self, now: float, n: float) -> float:
        """Earliest time >= now at which `n` tokens are available (inf if n > capacity)."""
        if n > self.capacity + EPSILON:
            return math.inf
        missing = n - self.advance(now)
        if missing <= EPSILON:
            return now
        return max(now, self._last) + missing / self.rate

    def take(self, now: float, n: float) -> int:
        """Spend `n` tokens (the level may go negative); returns the mark for `refund`."""
        self._move(now)
        self._tokens -= n
        self._seq += 1
        return self._seq

    def refund(self, now: float, n: float, mark: int) -> float:
        """Give back up to `n` tokens spent at `mark`; returns how many were given back."""
        self._move(now)
        room = -self._peak_since(mark)
        given = max(0.0, min(n, room))
        if given > 0:
            self._tokens += given
            self._raise_since(mark, given)
        self._seq += 1
        return given

    def limit(self, now: float, level: float) -> None:
        """Lower the level to `level` if it is above it (resync from upstream headers)."""
        self._move(now)
        if level < self._tokens:
            self._tokens = level
            self._seq += 1

    def set_rate(self, now: float, rate: float, capacity: float | None = None) -> None:
        """From `now` on, refill at `rate` tokens/s up to `capacity` (unchanged when None).

        The level at `now` is computed with the old rate first, so no accrued token is lost
        and none is granted early; a smaller capacity cuts the level, a larger one only
        leaves room to refill. Raises ValueError for a rate or capacity <= 0.
        """
        if rate <= 0 or (capacity is not None and capacity <= 0):
            raise ValueError("bucket rate and capacity must be > 0")
        self._move(now)
        self.rate = rate
        if capacity is not None and capacity != self.capacity:
            self.capacity = capacity
            self._tokens = min(self._tokens, capacity)
            self._seq += 1
            self._note_peak(self._tokens)

    def _move(self, now: float) -> None:
        if self._cap is not None and now >= self._cap[0]:
            at, level = self._cap
            self._cap = None
            self._tokens = min(self.capacity, self._tokens + (at - self._last) * self.rate)
            self._last = at
            self._cut(at, level)
        level = self.advance(now)
        self._last = max(self._last, now)
        self._tokens = level
        self._note_peak(level)

    def _cut(self, at: float, level: float) -> None:
        """The level at `at` (the bucket already moved there) cut to `level`; earlier marks forgotten."""
        self._tokens = min(self._tokens, level)
        self._seq += 1
        self._forgotten = self._seq
        self._peaks = []
        self._note_peak(self._tokens)

    def _note_peak(self, level: float) -> None:
        fill = level - self.capacity
        while self._peaks and self._peaks[-1][1] <= fill:
            self._peaks.pop()
        self._peaks.append((self._seq, fill))
        if len(self._peaks) > _MAX_PEAKS:
            dropped = self._peaks[: _MAX_PEAKS // 2]
            del self._peaks[: _MAX_PEAKS // 2]
            self._forgotten = dropped[-1][0]

    def _raise_since(self, mark: int, amount: float) -> None:
        """Rewrite the peak history as if the refunded tokens had never been spent.

        Without this, two overlapping refunds would each be measured against a history
        in which the other was still spent, and together give back too much.
        """
        i = bisect.bisect_left(self._peaks, mark, key=lambda peak: peak[0])
        raised = [(seq, level + amount) for seq, level in self._peaks[i:]]
        kept = self._peaks[:i]
        while kept and raised and kept[-1][1] <= raised[0][1]:
            kept.pop()
        self._peaks = kept + raised

    def _peak_since(self, mark: int) -> float:
        """Highest fill (level - capacity) after the mutation that returned `mark` (now included)."""
        if mark <= self._forgotten:
            return 0.0
        i = bisect.bisect_left(self._peaks, mark, key=lambda peak: peak[0])
        earlier = self._peaks[i][1] if i < len(self._peaks) else -math.inf
        return max(earlier, self._tokens - self.capacity)
