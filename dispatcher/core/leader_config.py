"""The leader's part of a live config change (`events.ConfigChanged`).

The scheduler applies the new spec (reconfigure.py: unchanged keys keep their state, no
bucket is refilled, removed keys finish their calls in flight); the leader then follows
with its own books: tier windows and last deliveries, pull accounting, the key ids it
knows, and the jobs it held for a removed tier, which are handed back (no call was made;
their messages stay in JetStream until the tier is configured again).
"""

from __future__ import annotations

from dataclasses import replace
from typing import TYPE_CHECKING

from .commands import Command, HandBack, Log
from .events import ConfigChanged

if TYPE_CHECKING:
    from .leader import LeaderMachine


def apply_config(machine: LeaderMachine, event: ConfigChanged, now: float) -> list[Command]:
    """Apply `event` to `machine` at `now`; a spec the scheduler refuses changes nothing and
    is logged (the running revision stays)."""
    try:
        done = machine.scheduler.reconfigure(event.spec, now)
    except ValueError as exc:
        return [Log("error", "config revision refused by the leader; the running one stays",
                    {"revision": event.revision, "running": machine.config_revision, "error": str(exc)})]
    # a removed tier's last delivery stays known: late arrivals on its inbox are judged by it
    max_deliver = {**machine.settings.max_deliver, **event.max_deliver}
    machine.settings = replace(machine.settings, windows=dict(event.windows), max_deliver=max_deliver)
    machine.pulls.set_windows(dict(event.windows), now)
    machine.keys.key_ids = machine.scheduler.key_ids()
    out: list[Command] = []
    owned = machine.owns(now)
    for job in done.dropped:
        held = machine.held.pop(job.handle, None)
        if held is not None and owned:
            out.append(HandBack(job.handle, held.incoming.ack, 0.0))
    out += machine.keys.sync_secrets()
    machine.config_revision = event.revision
    plan = done.keys
    out.append(Log("info", "config revision applied", {
        "revision": event.revision, "keys_added": list(plan.added), "keys_removed": list(plan.removed),
        "keys_changed": list(plan.changed), "tiers_added": list(done.tiers_added),
        "tiers_removed": list(done.tiers_removed), "jobs_handed_back": len(done.dropped)}))
    if machine.ready:
        for tier in machine.settings.windows:
            out += machine.pulls.top_up(tier, machine.scheduler.pending(tier), now, owned)
    return out
