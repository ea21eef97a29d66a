"""Moved to `ratefleet.dispatcher.core.fleet` (the leader's state machine owns the fleet view)."""

from ratefleet.dispatcher.core.fleet import AssignmentRecord, Fleet, WorkerState

__all__ = ["AssignmentRecord", "Fleet", "WorkerState"]
