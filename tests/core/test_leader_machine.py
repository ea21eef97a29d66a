"""Fake-clock tables for the leader's state machine (dispatcher/core/leader.py): fencing
after a pause, step-down with pull requests open, the last delivery, a redelivered job whose
Result is stored, and a worker that vanishes (its calls return; a new worker's calls in
flight are adopted). No NATS, no sleep: every instant is T0 + an offset."""

from __future__ import annotations

import pytest
from leader_helpers import MAX_DELIVER, T0, Run, assigned, beat, delivery, kinds, machine, outcome

from ratefleet.dispatcher.core import commands as cmd
from ratefleet.dispatcher.core import events as ev
from ratefleet.dispatcher.core.pulls import HANDBACK_MARGIN_S, PULL_EXPIRES_S

LATE = PULL_EXPIRES_S + HANDBACK_MARGIN_S

# -- fencing after a pause ----------------------------------------------------------------------

# the lease is ours until T0 + 5; the process "pauses" and wakes at T0 + 9
FENCE_TABLE = [
    # (offset, event, command kinds expected)
    (1.0, delivery(1), []),  # held: no worker yet
    (9.0, beat("w1", 2), []),  # a free slot, but the lease may be another's: no dispatch
    (9.1, delivery(2, 2), []),  # held, not ended or nak'd
    (9.2, ev.JobDelivered("normal", 3, 1, "a3", delivery(3).verdict), []),
    (9.3, ev.Tick(), []),  # housekeeping skipped: no in-progress, no announce, no expiry
    (9.4, delivery(4, MAX_DELIVER), ["EndRefused"]),  # the last delivery ends whatever the fence says
    (9.5, ev.LeaseRenewed(T0 + 20), ["Assign", "Assign"]),  # ours after all: the held jobs run
]


def test_a_leader_woken_after_a_pause_does_nothing_another_leader_may_own():
    run = Run(machine(lease_until=T0 + 5))
    for offset, event, expected in FENCE_TABLE:
        assert kinds(run.at(T0 + offset, event)) == expected, (offset, event)
    assert {a.incoming.job_id for a in assigned(run.log)} <= {"j1", "j2", "j3"}


def test_a_fenced_leader_answers_no_key_command_and_naks_no_lost_job():
    run = Run(machine(lease_until=T0 + 5))
    run.at(T0, beat("w1", 1))
    [sent] = assigned(run.at(T0 + 0.1, delivery(1)))
    # its worker goes silent; the leader is paused past its lease when it notices
    assert kinds(run.at(T0 + 9, ev.Tick())) == []
    assert kinds(run.at(T0 + 9.1, ev.KeyCommand({"action": "disable", "key": "k1"}, "inbox"))) == []
    assert run.m.fleet.by_assignment[sent.assignment].ack == sent.incoming.ack  # not returned while fenced


# -- step-down -------------------------------------------------------------------------------------


def test_step_down_with_pulls_open_hands_back_after_they_expired_and_lingers():
    run = Run(machine())
    run.at(T0, ev.Tick())  # ready: pull requests go out
    assert run.m.pulls.open()
    run.at(T0 + 0.1, delivery(1))
    run.at(T0 + 0.2, delivery(2, tier="vip"))
    out = run.at(T0 + 0.3, ev.StepDown())
    assert out == [cmd.HandBack(1, delivery(1).ack, LATE), cmd.HandBack(2, delivery(2).ack, LATE),
                   cmd.Linger(PULL_EXPIRES_S)]
    assert run.m.scheduler.pending("normal") == run.m.scheduler.pending("vip") == 0
    # a delivery that arrives on a still-open pull request goes back too, unread
    late = ev.JobDelivered("normal", 3, 1, "a3", None)
    assert run.at(T0 + 0.5, late) == [cmd.HandBack(3, "a3", LATE)]
    # nothing is dispatched or pulled while stepping down, even when a worker appears
    assert kinds(run.at(T0 + 0.6, beat("w1", 4))) == []
    assert [c for c in run.log if isinstance(c, cmd.Pull)] == [c for c in run.log[:3] if isinstance(c, cmd.Pull)]


def test_step_down_with_no_pull_open_hands_back_at_once():
    run = Run(machine())
    run.at(T0, ev.Tick())
    # each tier's window (8) fills up: every message asked for arrived, nothing more is asked for
    jobs = [delivery(seq, tier=tier) for seq, tier in enumerate(["vip", "normal"] * 8, start=1)]
    for job in jobs:
        run.at(T0 + 0.1, job)
    run.at(T0 + 1.1, ev.PullStatus("vip", "408"))
    assert not run.m.pulls.open()
    assert run.at(T0 + 1.2, ev.StepDown()) == [cmd.HandBack(job.seq, job.ack, 0.0) for job in jobs]


def test_a_fenced_step_down_hands_nothing_back():
    run = Run(machine(lease_until=T0 + 1))
    run.at(T0, ev.Tick())
    run.at(T0 + 0.1, delivery(1))
    assert run.at(T0 + 2, ev.StepDown()) == []
    assert run.at(T0 + 2.1, ev.JobDelivered("normal", 3, 1, "a3", None)) == []  # the new leader's by now


# -- the last delivery -----------------------------------------------------------------------------


@pytest.mark.parametrize("stepping_down", [False, True])
@pytest.mark.parametrize("fenced", [False, True])
def test_the_last_delivery_is_ended_never_handed_back(stepping_down, fenced):
    run = Run(machine(lease_until=T0 + 1 if fenced else T0 + 1_000))
    run.at(T0, ev.Tick())
    if stepping_down:
        run.at(T0 + 0.1, ev.StepDown())
    last = delivery(1, MAX_DELIVER)
    out = [c for c in run.at(T0 + 2, last) if not isinstance(c, cmd.Announce | cmd.Pull)]
    assert out == [cmd.EndRefused(last.verdict)]  # type: ignore[arg-type]


def test_the_last_delivery_of_a_held_job_still_ends():
    run = Run(machine())
    run.at(T0, delivery(1, MAX_DELIVER - 1))  # held (no worker)
    assert kinds(run.at(T0 + 1, delivery(1, MAX_DELIVER - 1))) == []  # a late duplicate: dropped
    assert kinds(run.at(T0 + 2, delivery(1, MAX_DELIVER))) == ["EndRefused"]


# -- a redelivered job whose Result is stored ---------------------------------------------------------


def test_a_redelivered_job_with_its_result_stored_is_answered_from_the_store():
    run = Run(machine())
    run.at(T0, beat("w1", 4))
    redelivery = delivery(1, 2, stored=b'{"job_id": "j1"}')
    out = run.at(T0 + 0.1, redelivery)
    assert out == [cmd.AnswerStored(b'{"job_id": "j1"}', redelivery.ack, None)]
    assert not run.m.held and run.m.scheduler.pending("normal") == 0  # not called again
    # fenced: left alone (its owner finds the Result too)
    fenced = Run(machine(lease_until=T0 + 1))
    assert fenced.at(T0 + 2, delivery(1, 2, stored=b"{}")) == []
    assert not fenced.m.held


def test_a_cache_hit_at_intake_is_answered_without_a_call_and_logged_as_a_cache_hit():
    run = Run(machine())
    run.at(T0, beat("w1", 4))
    first = delivery(1, 1, stored=b'{"job_id": "j1", "cached": true}')
    hit = ev.JobDelivered(first.tier, first.seq, first.delivered, first.ack, first.verdict, first.stored, cached=True)
    out = run.at(T0 + 0.1, hit)
    assert out == [cmd.AnswerStored(b'{"job_id": "j1", "cached": true}', hit.ack, None)]
    assert not run.m.held and run.m.scheduler.pending("normal") == 0
    said = [c.message for c in run.log if isinstance(c, cmd.Log) and "job_id" in c.fields]
    assert said == ["answered from the cache; acked without a call"], said
    redelivered = Run(machine())
    redelivered.at(T0 + 0.2, delivery(2, 2, stored=b"{}"))
    assert [c.message for c in redelivered.log if isinstance(c, cmd.Log)] == [
        "redelivered job already has its result; acked without a second call"]


def test_a_redelivery_of_a_job_a_worker_is_calling_is_not_handed_out_again():
    # a JetStream consumer whose leader changes (a cluster server restarted) redelivers at once
    # the messages whose delivery it had not replicated, while their calls still run: in a
    # rolling restart of a 3-server cluster 12 of 20,000 jobs were called twice, 150 ms apart
    run = Run(machine())
    run.at(T0, beat("w1", 4))
    [first] = assigned(run.at(T0 + 0.1, delivery(1)))
    assert kinds(run.at(T0 + 0.2, delivery(1, 2))) == []  # its call runs: not a second one
    assert not run.m.held and run.m.scheduler.pending("normal") == 0
    said = [c.message for c in run.log if isinstance(c, cmd.Log) and c.fields.get("job_id") == "j1"]
    assert said == ["redelivery of a job a worker is calling; not handed out again"], said
    # once its call ended (here: a 429, the job nak'd by its worker), the next delivery is taken
    run.at(T0 + 0.3, outcome(first.assignment, kind="rate_limited"))
    run.at(T0 + 0.4, delivery(1, 3))
    assert 1 in run.m.held and run.m.scheduler.pending("normal") == 1


def test_a_redelivery_of_a_call_adopted_from_an_earlier_leader_is_not_handed_out_again():
    # a SIGKILLed cluster server can take both the lease and the consumer's leader: the new
    # leader knows the calls in flight only from heartbeats (job id, no stream sequence)
    from dataclasses import replace

    run = Run(machine())
    run.at(T0, beat("w9", 4, (("old.1", "k1"),)))  # its job id: x-old.1
    first = delivery(1, 2)
    redelivery = ev.JobDelivered(first.tier, first.seq, first.delivered, first.ack,
                                 replace(first.verdict, job_id="x-old.1"))  # type: ignore[arg-type]
    assert kinds(run.at(T0 + 0.1, redelivery)) == []
    assert not run.m.held and run.m.scheduler.pending("normal") == 0
    run.at(T0 + 0.2, outcome("old.1"))  # the call ended: a later delivery is taken
    later = ev.JobDelivered(first.tier, first.seq, 3, first.ack, replace(first.verdict, job_id="x-old.1"))  # type: ignore[arg-type]
    assert kinds(run.at(T0 + 0.3, later)) == ["Assign"]


# -- a worker that vanishes ------------------------------------------------------------------------------


def test_a_silent_worker_s_jobs_go_back_to_the_queue_and_free_their_keys():
    run = Run(machine(concurrency=1))
    run.at(T0, beat("w1", 2))
    [sent] = assigned(run.at(T0 + 0.1, delivery(1)))
    assert kinds(run.at(T0 + 0.2, delivery(2))) == []  # k1 has one call in flight, its limit
    run.at(T0 + 0.3, beat("w2", 2))
    # w1 says nothing more; w2 keeps beating; past the worker timeout w1's job is nak'd
    out = []
    for offset in (1.0, 2.0, 3.0, 3.6):
        out += run.at(T0 + offset, beat("w2", 2, tuple((a, "k1") for a, r in run.m.fleet.by_assignment.items()
                                                       if r.worker == "w2")))
        out += run.at(T0 + offset + 0.01, ev.Tick())
    assert cmd.Nak(sent.incoming.ack) in out
    assert [a.incoming.job_id for a in assigned(out)] == ["j2"]  # its slot on k1 went to the next job
    assert "w1" not in run.m.fleet.workers


def test_an_assignment_two_heartbeats_do_not_list_goes_back():
    run = Run(machine())
    run.at(T0, beat("w1", 2))
    [sent] = assigned(run.at(T0 + 0.1, delivery(1)))
    assert kinds(run.at(T0 + 2.5, beat("w1", 2))) == []  # once is not enough: the outcome may be on its way
    assert run.at(T0 + 3.0, beat("w1", 2))[:1] == [cmd.Nak(sent.incoming.ack)]


def test_a_new_worker_s_calls_in_flight_are_adopted_against_their_key():
    run = Run(machine(concurrency=1))
    run.at(T0, delivery(1))
    # a worker of an earlier leader still runs a call on k1 (the only key, one call at a time)
    assert kinds(run.at(T0 + 0.1, beat("w9", 4, (("old.1", "k1"),)))) == []
    assert run.m.scheduler.snapshot(T0 + 0.1)["keys"]["k1"]["in_flight"] == 1
    # its outcome frees the key: only then the held job goes out
    assert kinds(run.at(T0 + 0.5, outcome("old.1"))) == ["Assign"]


def test_an_unknown_key_in_flight_is_logged_not_adopted():
    run = Run(machine())
    run.at(T0, beat("w9", 4, (("old.1", "nope"),)))
    assert any(isinstance(c, cmd.Log) and c.level == "error" for c in run.log)
    assert "old.1" not in run.m.fleet.by_assignment


# -- readiness, payload, keys -----------------------------------------------------------------------------


def test_nothing_is_pulled_or_dispatched_before_the_fleet_is_known():
    from leader_helpers import settings, spec

    from ratefleet.dispatcher.core.leader import LeaderMachine
    m = LeaderMachine(settings(ready_after_s=1.5), spec(), T0, conservative=False)
    run = Run(m)
    assert kinds(run.at(T0, ev.SessionStarted())) == [] and T0 < m.wake_at() <= T0 + 1.5
    run.at(T0 + 0.1, beat("w1", 2))
    assert not [c for c in run.log if isinstance(c, cmd.Pull | cmd.Assign)]
    out = run.m.handle(ev.Tick(), T0 + 1.5)
    assert {c.tier for c in out if isinstance(c, cmd.Pull)} == {"vip", "normal"}


def test_an_assignment_larger_than_max_payload_ends_the_job_alone():
    from leader_helpers import settings, spec

    from ratefleet.dispatcher.core.leader import LeaderMachine
    m = LeaderMachine(settings(max_payload=300), spec(), T0, conservative=False)
    run = Run(m)
    run.at(T0, ev.SessionStarted())
    run.at(T0, beat("w1", 2))
    out = run.at(T0 + 0.1, delivery(1))
    assert kinds(out) == ["EndJob"] and out[0].status == "invalid"  # type: ignore[union-attr]
    assert m.fleet.free_slots() == 2 and m.scheduler.snapshot(T0)["keys"]["k1"]["in_flight"] == 0


def test_an_operator_disable_is_answered_after_it_is_persisted():
    run = Run(machine())
    [respond] = run.at(T0, ev.KeyCommand({"action": "disable", "key": "k1", "reason": "rotating"}, "inbox"))
    assert isinstance(respond, cmd.Respond) and respond.answer["ok"] and respond.answer["changed"]
    assert [s.key_id for s in respond.saves] == ["k1"] and respond.saves[0].record["reason"] == "rotating"  # type: ignore[index]
    [bad] = run.at(T0, ev.KeyCommand(None, "inbox", "ValueError"))
    assert isinstance(bad, cmd.Respond) and not bad.answer["ok"]
