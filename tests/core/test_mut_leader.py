"""The leader machine's own rules for what goes out (dispatcher/core/leader.py), command for
command at named instants: a job that cannot reach a worker, a failed publish of an assignment,
readiness and wake-ups, housekeeping, step-down, and the status answer; its intake rules are in
test_mut_leader_intake.py. No NATS, no clock."""

from __future__ import annotations

from dataclasses import replace

import pytest
from leader_helpers import (
    MAX_DELIVER,
    T0,
    Run,
    assigned,
    beat,
    delivery,
    incoming,
    machine,
    only_vip,
    outcome,
    pulls,
    settings,
    spec,
)

from ratefleet.dispatcher.core import commands as cmd
from ratefleet.dispatcher.core import events as ev
from ratefleet.dispatcher.core.leader import LeaderMachine
from ratefleet.dispatcher.core.pulls import PULL_EXPIRES_S
from ratefleet.schemas import ErrorCode
from ratefleet.schemas.internal import Heartbeat

# -- hand-out ----------------------------------------------------------------------------------


def small_windows(window: int = 2, **overrides: object) -> Run:
    """Ready, a window of `window` jobs per tier, its pull request sent; no housekeeping before T0 + 0.5."""
    m = LeaderMachine(settings(windows={t: window for t in ("vip", "normal")}, **overrides), spec(), T0,
                      conservative=False)
    run = Run(m)
    run.at(T0, ev.SessionStarted())
    return run


def test_a_dispatched_job_goes_to_a_worker_holding_its_key_with_the_key_and_pool_named():
    run = small_windows()
    no_secret = Heartbeat(worker="w1", slots=4, unusable_keys={"k1": "secret not set"})
    run.at(T0, ev.HeartbeatReceived(no_secret))  # the most free slots, but no k1 secret
    run.at(T0, beat("w2", 1))
    first, second = delivery(1), delivery(2)
    run.at(T0 + 0.1, first)
    out = run.at(T0 + 0.2, second)  # both asked-for messages arrived: the window is full until one leaves
    [sent] = assigned(run.log)
    assert (sent.worker, sent.assignment, sent.key_id, sent.pool) == ("w2", "d1.1", "k1", "p")
    assert sent.incoming == first.verdict
    assert run.m.fleet.by_assignment["d1.1"].job_id == "j1"
    assert out == [] and run.m.scheduler.pending("normal") == 1  # w2 is full; w1 cannot call k1


def test_a_job_leaving_the_queue_frees_window_room_at_once():
    run = small_windows()
    run.at(T0, beat("w1", 1))
    # one of the two asked for arrives and goes out at once: its room is asked for in the same step
    out = run.at(T0 + 0.1, delivery(1))
    assert [a.incoming.job_id for a in assigned(out)] == ["j1"]
    assert pulls(out) == [cmd.Pull("normal", 1, PULL_EXPIRES_S)]
    assert pulls(run.at(T0 + 0.2, delivery(2))) == []  # held (w1 is busy): no room


def test_an_assignment_of_exactly_max_payload_bytes_is_sent_one_more_is_not():
    size = len(assigned(hand_out_one(1 << 20).log)[0].payload)
    assert [type(c).__name__ for c in hand_out_one(size).log if isinstance(c, cmd.Assign | cmd.EndJob)] == [
        "Assign"]
    run = hand_out_one(size - 1)
    assert pulls(run.log[-3:]) == [cmd.Pull("normal", 1, PULL_EXPIRES_S)]  # its room is asked for at once
    why = (f"the job's assignment to a worker is {size} bytes, more than the NATS server's "
           f"max_payload = {size - 1}; make the job smaller")
    assert unsent(run) == [cmd.Log("error", "job cannot be sent to a worker; ended as invalid",
                                   {"job_id": "j1", "reason": why}),
                           cmd.EndJob(delivery(1).verdict, ErrorCode.INVALID_JOB, why, "invalid")]  # type: ignore[arg-type]


def hand_out_one(max_payload: int) -> Run:
    run = small_windows(max_payload=max_payload)
    run.at(T0, beat("w1", 1))
    run.at(T0 + 0.1, delivery(1))
    return run


def unsent(run: Run) -> list[cmd.Command]:
    return [c for c in run.log if isinstance(c, cmd.Log) and c.level == "error" or isinstance(c, cmd.EndJob)]


def test_a_job_whose_assignment_cannot_be_serialised_ends_alone_and_frees_its_slot():
    run = small_windows()
    run.at(T0, beat("w1", 1))
    broken = delivery(1)
    broken.verdict.job.metadata["x"] = object()  # type: ignore[union-attr]  # no JSON for this
    run.at(T0 + 0.1, delivery(2))  # j2 goes out at once (its slot and token are free again later)
    run.at(T0 + 0.15, outcome("d1.1"))
    out = run.m.handle(broken, T0 + 0.2)
    why = "job cannot be serialised (PydanticSerializationError)"
    assert [c for c in out if not isinstance(c, cmd.Pull)] == [
        cmd.Log("error", "job cannot be sent to a worker; ended as invalid", {"job_id": "j1", "reason": why}),
        cmd.EndJob(broken.verdict, ErrorCode.INVALID_JOB, why, "invalid")]  # type: ignore[arg-type]
    assert pulls(out) == [cmd.Pull("normal", 1, PULL_EXPIRES_S)]  # its room is asked for at once
    assert run.m.fleet.free_slots() == 1 and not run.m.held
    assert run.m.scheduler.snapshot(T0 + 0.2)["keys"]["k1"]["in_flight"] == 0  # the reservation ended, no call
    assert [a.incoming.job_id for a in assigned(run.at(T0 + 0.3, delivery(3)))] == ["j3"]


def test_an_assignment_a_worker_never_lists_is_logged_with_its_job():
    run = Run(machine())
    run.at(T0, beat("w1", 2))
    [sent] = assigned(run.at(T0 + 0.1, delivery(1)))
    run.at(T0 + 2.5, beat("w1", 2))
    run.at(T0 + 3.0, beat("w1", 2))
    lost = [c for c in run.log if isinstance(c, cmd.Log) and c.level == "warning"]
    assert [c.fields for c in lost] == [{"job_id": "j1", "worker": "w1"}], lost
    assert cmd.Nak(sent.incoming.ack) in run.log


# -- a failed publish of an assignment ---------------------------------------------------------


def test_an_assignment_the_server_refuses_as_too_large_ends_its_job_alone():
    run = Run(machine())
    run.at(T0, beat("w1", 1))
    [sent] = assigned(run.at(T0 + 0.1, delivery(1)))
    out = run.m.handle(ev.AssignFailed(sent.assignment, sent.incoming, True, 2_000_000), T0 + 0.2)
    why = ("the job's assignment to a worker (2000000 bytes) is more than the NATS server "
           "takes in one message; make the job smaller")
    assert out[:2] == [cmd.Log("error", "job cannot be sent to a worker; ended as invalid", {"job_id": "j1", "reason": why}),
                       cmd.EndJob(sent.incoming, ErrorCode.INVALID_JOB, why, "invalid")]
    assert run.m.fleet.free_slots() == 1 and sent.assignment not in run.m.fleet.by_assignment
    assert run.m.scheduler.snapshot(T0 + 0.2)["keys"]["k1"]["in_flight"] == 0
    assert [a.incoming.job_id for a in assigned(run.at(T0 + 0.3, delivery(2)))] == ["j2"]  # the slot is free


def test_an_assignment_not_published_because_nats_is_away_frees_its_slot_and_ends_nothing():
    run = Run(machine())
    run.at(T0, beat("w1", 1))
    [sent] = assigned(run.at(T0 + 0.1, delivery(1)))
    out = run.m.handle(ev.AssignFailed(sent.assignment, sent.incoming, False), T0 + 0.2)
    assert [c for c in out if isinstance(c, cmd.EndJob | cmd.Log | cmd.Nak)] == []  # its message comes back
    assert run.m.fleet.free_slots() == 1 and run.m.scheduler.snapshot(T0 + 0.2)["keys"]["k1"]["in_flight"] == 0
    again = run.m.handle(ev.AssignFailed(sent.assignment, sent.incoming, True, 9), T0 + 0.3)
    assert [c for c in again if isinstance(c, cmd.EndJob | cmd.Log)] == []  # reported twice: once is enough


# -- readiness, wake-ups, step-down -------------------------------------------------------------


def test_a_leader_taking_over_starts_with_empty_buckets():
    # the default: the leader before it may have spent the burst just now
    m = LeaderMachine(settings(), spec(rps=1.0, burst=5.0), T0)
    run = Run(m)
    run.at(T0, ev.SessionStarted())
    run.at(T0, beat("w1", 4))
    assert assigned(run.at(T0, delivery(1))) == []
    assert m.scheduler.snapshot(T0)["keys"]["k1"]["tokens"] == pytest.approx(0.0)
    assert [a.incoming.job_id for a in assigned(run.at(T0 + 1.01, ev.Tick()))] == ["j1"]  # one token a second
    fresh = Run(machine(rps=1.0, burst=5.0))  # conservative=False: the burst is there at once
    fresh.at(T0, beat("w1", 4))
    assert [a.incoming.job_id for a in assigned(fresh.at(T0, delivery(1)))] == ["j1"]


def test_before_the_session_starts_nothing_is_pulled_or_dispatched():
    m = LeaderMachine(settings(housekeeping_s=5.0), spec(), T0, conservative=False)
    assert m.wake_at() == T0 + 5.0
    out = m.handle(beat("w1", 2), T0 + 0.1) + m.handle(delivery(1), T0 + 0.2) + m.handle(ev.Tick(), T0 + 0.3)
    assert not [c for c in out if isinstance(c, cmd.Pull | cmd.Assign)]


def test_the_leader_wakes_at_readiness_and_then_never_in_the_past():
    m = LeaderMachine(settings(ready_after_s=1.5, housekeeping_s=5.0), spec(), T0, conservative=False)
    m.handle(ev.SessionStarted(), T0)
    assert m.wake_at() == T0 + 1.5  # readiness comes before the first housekeeping
    m.handle(ev.Tick(), T0 + 1.5)
    assert m.ready and m.wake_at() == T0 + 5.0  # the next housekeeping, not the readiness instant gone by


def test_a_stepping_down_leader_asks_for_no_more_messages_and_no_wake_up():
    run = Run(machine())
    run.at(T0, ev.Tick())
    run.at(T0 + 0.1, ev.StepDown())
    assert run.m.wake_at() == float("inf")
    # its pull requests end meanwhile: nothing new is asked for
    assert pulls(run.m.handle(ev.PullStatus("vip", "408"), T0 + 1.2)) == []
    assert pulls(run.m.handle(ev.PullStatus("normal", "409"), T0 + 1.3)) == []


# -- housekeeping --------------------------------------------------------------------------------


def test_a_held_job_is_kept_alive_once_per_keep_alive_period():
    run = Run(machine())
    run.at(T0 + 0.1, delivery(1))  # held: no worker
    kept = []
    for step in range(1, 61):  # housekeeping every 0.5 s for 30 s; keep_alive_after_s = 10
        out = run.at(T0 + 0.1 + step * 0.5, ev.Tick())
        kept += [(step * 0.5, c) for c in out if isinstance(c, cmd.InProgress)]
    assert [c for _, c in kept] == [cmd.InProgress(delivery(1).ack)] * 2
    assert [at for at, _ in kept] == [10.5, 21.0]


# -- status ---------------------------------------------------------------------------------


def test_the_status_answer_names_the_leader_keys_tiers_workers_and_revision():
    m = LeaderMachine(settings(since=1_700_000_000.0), spec(), T0, conservative=False)
    run = Run(m)
    run.at(T0, ev.SessionStarted())
    assert m.status(T0)["config_revision"] is None  # the local file's config
    run.at(T0, beat("w1", 3))
    run.at(T0 + 0.1, only_vip())
    status = m.status(T0 + 0.2)
    assert set(status) == {"leader", "leader_since", "keys", "tiers", "workers", "config_revision"}
    assert (status["leader"], status["leader_since"], status["config_revision"]) == ("d1", 1_700_000_000.0, 2)
    assert set(status["keys"]) == {"k1"} and status["keys"]["k1"]["rps"] == 100.0
    assert status["tiers"] == {"vip": {"pending": 0, "in_flight": 0, "dispatched": 0}}
    assert [(w["id"], w["slots"], w["last_seen_s"]) for w in status["workers"]] == [("w1", 3, 0.2)]


def test_before_the_session_starts_the_status_has_no_key_state_to_report():
    """A new leader answers status requests before it has loaded the persisted key records:
    an operator-disabled key must not read as enabled then (a CI failure: `disabled_by` None
    right after a failover)."""
    m = LeaderMachine(settings(since=1_700_000_000.0), spec(), T0, conservative=False)
    early = m.status(T0)
    assert early == {"leader": "d1", "leader_since": 1_700_000_000.0, "starting": True, "config_revision": None}
    record = {"by": "operator", "reason": "leaked in a CI log", "probe_delay_s": None, "probe_in_s": None,
              "disabled_for_s": 3.0, "saved_at": 1_700_000_000.0}
    m.handle(ev.SessionStarted({"k1": record}, 1_700_000_002.0), T0 + 0.1)
    k1 = m.status(T0 + 0.1)["keys"]["k1"]
    assert (k1["disabled_by"], k1["disabled_reason"]) == ("operator", "leaked in a CI log")
    assert "starting" not in m.status(T0 + 0.1)


# -- batches, fencing, rejections, wake-ups ----------------------------------------------------


def test_events_handled_together_keep_every_command():
    run = Run(machine())
    first, second = delivery(1, MAX_DELIVER), delivery(2, MAX_DELIVER)
    out = run.m.handle_all((first, second), T0 + 0.1)
    assert [c for c in out if isinstance(c, cmd.EndRefused)] == [cmd.EndRefused(first.verdict),  # type: ignore[arg-type]
                                                                 cmd.EndRefused(second.verdict)]  # type: ignore[arg-type]
    assert run.m.scaling.arrival_rate(T0 + 0.2) == 0.0  # last deliveries are not new arrivals
    run.m.handle_all((delivery(3), delivery(4)), T0 + 0.3)
    assert run.m.scaling.arrival_rate(T0 + 0.4) > 0.0


def test_a_lost_lease_fences_the_leader_at_once_and_the_lease_ends_at_its_instant():
    run = Run(machine(lease_until=T0 + 5))
    run.at(T0, beat("w1", 4))
    assert assigned(run.at(T0 + 5, delivery(1))) == []  # ours until T0 + 5, not at it
    assert run.m.wake_at() == T0 + 5 + 0.1  # looked at again soon: a renewal may come
    run.at(T0 + 5.05, ev.LeaseRenewed(T0 + 20))
    assert len(assigned(run.log)) == 1
    run.at(T0 + 6, ev.LeaseLost())
    assert assigned(run.at(T0 + 6.1, delivery(2))) == []
    assert run.at(T0 + 6.2, ev.KeyCommand({"action": "disable", "key": "k1"}, "inbox")) == []


def test_a_job_no_key_can_ever_serve_ends_as_no_key_available():
    run = Run(machine())
    run.at(T0, beat("w1", 4))
    stray = replace(incoming(1), upstream="elsewhere")
    out = run.at(T0 + 0.1, ev.JobDelivered("normal", 1, 1, stray.ack, stray))
    [end] = [c for c in out if isinstance(c, cmd.EndJob)]
    assert (end.incoming, end.code, end.status) == (stray, ErrorCode.NO_KEY_AVAILABLE, "failed")
    assert isinstance(end.message, str) and end.message
    assert not run.m.held and assigned(out) == []


def test_the_announce_carries_the_applied_config_revision():
    run = Run(machine())
    run.at(T0, only_vip())
    out = run.m.handle(ev.Tick(), T0 + 0.5)
    [announce] = [c for c in out if isinstance(c, cmd.Announce)]
    assert b'"config_revision":2' in announce.payload


def test_wake_ups_follow_the_housekeeping_period_and_the_dispatch_passes():
    run = Run(machine(rps=1.0, burst=1.0))
    run.at(T0, beat("w1", 4))
    assert run.m.wake_at() == T0 + 0.5  # the first housekeeping
    run.at(T0 + 0.5, ev.Tick())
    assert run.m.wake_at() == T0 + 1.0  # the next one, housekeeping_s later
    run.at(T0 + 0.6, delivery(1))  # takes the one token
    run.at(T0 + 0.7, delivery(2))  # waits for the next token, at about T0 + 1.6
    assert T0 + 0.7 < run.m.wake_at() <= T0 + 1.0
    run.at(T0 + 1.0, ev.Tick())
    assert T0 + 1.0 < run.m.wake_at() <= T0 + 1.6 + 1e-6
