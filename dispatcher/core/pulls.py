"""Per-tier pull accounting of the leader (invariant 8: a small window in memory).

The shell sends its own pull requests (`Pull` commands) to
`$JS.API.CONSUMER.MSG.NEXT.<stream>.<consumer>` with the tier's inbox as reply subject;
this book keeps how many messages are still on their way, so the window of a tier
(`held + outstanding`) stays bounded while a backlog of millions stays in JetStream.
"""

from __future__ import annotations

from dataclasses import dataclass

from .commands import Pull

PULL_EXPIRES_S = 1.0  # short: a stepping-down leader waits this long to hand back late arrivals
HANDBACK_MARGIN_S = 0.25
STALE_AFTER_S = PULL_EXPIRES_S + 2  # a pull request lost to a reconnect never reports back


@dataclass
class TierPulls:
    """One tier: `window` jobs at most in memory; `outstanding` messages asked for and not
    yet arrived (or reported unfilled); `last_activity` monotonic seconds."""

    window: int
    outstanding: int = 0
    last_activity: float = 0.0


class PullBook:
    """Pull accounting for every tier; `active` is False before the leader is ready and once
    it steps down (then nothing more is asked for)."""

    def __init__(self, windows: dict[str, int], now: float) -> None:
        self.tiers = {tier: TierPulls(window, 0, now) for tier, window in windows.items()}
        self.active = False

    def set_windows(self, windows: dict[str, int], now: float) -> None:
        """A config change: new tiers get a book, removed ones lose theirs (nothing more is
        asked for them), the others take the new window size."""
        for tier in list(self.tiers):
            if tier not in windows:
                del self.tiers[tier]
        for tier, window in windows.items():
            if tier in self.tiers:
                self.tiers[tier].window = window
            else:
                self.tiers[tier] = TierPulls(window, 0, now)

    def top_up(self, tier: str, pending: int, now: float, owned: bool) -> list[Pull]:
        """Ask for more when at least half the window is free (`pending`: the tier's jobs
        waiting in the scheduler) and the lease is ours."""
        pulls = self.tiers[tier]
        room = pulls.window - pending - pulls.outstanding
        if not self.active or not owned or room < max(1, pulls.window // 2):
            return []
        pulls.outstanding += room
        pulls.last_activity = now
        return [Pull(tier, room, PULL_EXPIRES_S)]

    def delivered(self, tier: str, now: float) -> None:
        """A message arrived on the tier's inbox."""
        pulls = self.tiers[tier]
        pulls.last_activity = now
        pulls.outstanding = max(0, pulls.outstanding - 1)

    def status(self, tier: str, unfilled: int, now: float) -> None:
        """A request ended (408/409/404) with `unfilled` messages that will not come (0: all)."""
        pulls = self.tiers[tier]
        pulls.last_activity = now
        pulls.outstanding = max(0, pulls.outstanding - unfilled) if unfilled else 0

    def forget_stale(self, tier: str, now: float) -> None:
        """A pull request lost to a reconnect never reports back: forget it (then ask again)."""
        pulls = self.tiers[tier]
        if pulls.outstanding and now - pulls.last_activity > STALE_AFTER_S:
            pulls.outstanding = 0
            pulls.last_activity = now

    def open(self) -> bool:
        """Whether a pull request of ours may still deliver."""
        return any(pulls.outstanding for pulls in self.tiers.values())
