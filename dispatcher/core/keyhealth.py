"""Whether a key may be used: enabled, disabled (by provider evidence or by an operator), and
whether any worker holds its secret.

    enabled ──key-scoped evidence──▶ disabled by "provider" ──probe_at──▶ one probe in flight
       ▲                                    ▲                                  │
       │                                    └── probe failed: delay doubles ◀──┤
       └──────────────── probe succeeded, or an operator enables it ◀──────────┘

A provider-disabled key takes exactly one real job as its probe once `probe_at` has come
(like the breaker's half-open state); the first delay is `ProbePolicy.base_s`, and each
failed probe doubles it up to `max_s`. An operator-disabled key is never probed: it stays
out until an operator enables it. A plain 401/403 (or a model's 404) on the probe is no
verdict (the job may carry a bad request): the next probe comes after the same delay. While a probe is
scheduled, jobs wait for it rather than fail (`comes_back`). Independently,
`secret_missing` holds the reason no worker can call with the key (e.g. "LOCAL_KEY_1 not
set"); such a key takes no job either.
Only `disable`, `enable` and `settle_probe` change the disabled state.
"""

from __future__ import annotations

from typing import Any, Literal

from ratefleet.schemas.outcome import OutcomeKind

from .types import Outcome, ProbePolicy

DisabledBy = Literal["provider", "operator"]


def probe_verdict(outcome: Outcome) -> bool | None:
    """True: the provider accepted the credentials (2xx, 429, other 4xx); False: it refused
    them again with a key-scoped answer (key_error); None: says nothing (5xx, timeout, lost
    call, and a plain 401/403: the probe's job may carry a bad request, see denials.py)."""
    if outcome.kind in (OutcomeKind.OK, OutcomeKind.RATE_LIMITED, OutcomeKind.BAD_REQUEST):
        return True
    if outcome.kind == OutcomeKind.KEY_ERROR:
        return False
    return None


class KeyHealth:
    """One key's disabled state, probe schedule and secret availability (monotonic seconds)."""

    def __init__(self, policy: ProbePolicy) -> None:
        self.policy = policy
        self.by: DisabledBy | None = None
        self.reason: str | None = None
        self.since: float | None = None
        self.probe_delay_s = policy.base_s
        self.probe_at: float | None = None
        self.probe: int | None = None  # reservation id of the probe in flight
        self.secret_missing: str | None = None

    @property
    def disabled(self) -> bool:
        return self.by is not None

    def gate(self, now: float) -> float | None:
        """When the key may take a call: `now`, the probe time, or None (operator-disabled,
        no secret on any worker, or its probe is in flight)."""
        if self.secret_missing is not None:
            return None
        if self.by is None:
            return now
        if self.by == "operator" or self.probe is not None or self.probe_at is None:
            return None
        return max(now, self.probe_at)

    def could_serve(self, now: float) -> bool:
        """Whether a job may still end up on this key without anyone acting: enabled, or a
        probe that is due or in flight."""
        if self.secret_missing is not None or self.by == "operator":
            return False
        if self.by is None:
            return True
        return self.probe is not None or (self.probe_at is not None and now >= self.probe_at)

    def comes_back(self, now: float) -> bool:
        """Whether a job may end up on this key by waiting, without anyone acting: it could
        serve now (`could_serve`), or it is provider-disabled with a probe scheduled."""
        return self.could_serve(now) or (self.secret_missing is None and self.by == "provider"
                                         and self.probe_at is not None)

    def disable(self, by: DisabledBy, reason: str, now: float) -> bool:
        """Take the key out; returns whether anything changed. Provider evidence never
        overrides an operator's decision, and does not restart a running probe schedule."""
        if by == "provider" and self.by is not None:
            return False
        if by == "operator" and self.by == "operator" and self.reason == reason:
            return False
        self.by, self.reason, self.since, self.probe = by, reason, now, None
        self.probe_at = now + self.probe_delay_s if by == "provider" else None
        return True

    def enable(self) -> bool:
        """Back in rotation, probe delay reset; returns whether it was disabled."""
        was = self.by is not None
        self.by = self.reason = self.since = self.probe_at = self.probe = None
        self.probe_delay_s = self.policy.base_s
        return was

    def take_probe(self, reservation_id: int) -> bool:
        """Claim the probe for a call reserved now; returns whether the call is the probe."""
        if self.by != "provider":
            return False
        self.probe = reservation_id
        return True

    def release_probe(self, reservation_id: int) -> None:
        """The probe's call was not made: the next job may probe."""
        if self.probe == reservation_id:
            self.probe = None

    def settle_probe(self, reservation_id: int, verdict: bool | None, now: float) -> bool:
        """The probe's outcome: success enables, failure doubles the delay; returns whether
        the state changed. Outcomes of other reservations are ignored."""
        if self.probe != reservation_id:
            return False
        self.probe = None
        if verdict is None or self.by != "provider":
            return False
        if verdict:
            return self.enable()
        self.probe_delay_s = min(self.policy.max_s, self.probe_delay_s * 2.0)
        self.probe_at = now + self.probe_delay_s
        return True

    def postpone_probe(self, reservation_id: int, now: float) -> bool:
        """The probe's answer said nothing about the key but came from it (a plain 401/403 or
        a model's 404, maybe the job's own fault): no verdict, the next probe comes after the same delay
        (not doubled). Returns whether the call was the probe."""
        if self.probe != reservation_id:
            return False
        self.probe = None
        if self.by == "provider":
            self.probe_at = now + self.probe_delay_s
        return True

    def restore(self, by: DisabledBy, reason: str, now: float, *, probe_delay_s: float,
                probe_in_s: float | None, disabled_for_s: float = 0.0) -> None:
        """Load a state a previous leader persisted (times relative to `now`)."""
        self.by, self.reason, self.since, self.probe = by, reason, now - max(0.0, disabled_for_s), None
        self.probe_delay_s = min(self.policy.max_s, max(self.policy.base_s, probe_delay_s))
        self.probe_at = now + max(0.0, probe_in_s or 0.0) if by == "provider" else None

    def view(self, now: float) -> dict[str, Any]:
        """JSON-able state for status: `state` (enabled/disabled), `disabled_by` (provider,
        operator, or secret when no worker holds it), `disabled_for_s`, `probe_in_s` (None
        when no probe is scheduled; 0: due or in flight), `probe_in_flight` (a probe job is out
        now), `probe_delay_s`, `secret_missing`. The scheduler adds
        `disabled_reason` (KeyState.disabled_reason)."""
        state = "enabled" if self.by is None else "disabled"
        by: str | None = self.by
        if self.by is None and self.secret_missing is not None:
            state, by = "disabled", "secret"
        probe_in = None
        if self.by == "provider" and self.probe_at is not None:
            probe_in = 0.0 if self.probe is not None else round(max(0.0, self.probe_at - now), 3)
        return {
            "state": state,
            "disabled_by": by,
            "disabled_for_s": None if self.since is None else round(max(0.0, now - self.since), 3),
            "probe_in_s": probe_in,
            "probe_in_flight": self.probe is not None,
            "probe_delay_s": self.probe_delay_s if self.by == "provider" else None,
            "secret_missing": self.secret_missing,
        }
