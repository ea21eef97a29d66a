"""The leader machine's own rules for what comes in (dispatcher/core/leader.py), command for
command at named instants: a late delivery on a removed tier, the pull statuses that free a
tier's window, and intake (a refused delivery without the lease, a stored Result, A/B routing, a
job's cost). No NATS, no clock."""

from __future__ import annotations

from dataclasses import replace

import pytest
from leader_helpers import (
    MAX_DELIVER,
    T0,
    WINDOW,
    Run,
    ack,
    acts,
    assigned,
    beat,
    delivery,
    incoming,
    kinds,
    machine,
    only_vip,
    outcome,
    poison,
    pulls,
    settings,
)

from ratefleet.dispatcher.core import KeySpec, PoolSpec, SchedulerSpec, TierSpec
from ratefleet.dispatcher.core import commands as cmd
from ratefleet.dispatcher.core import events as ev
from ratefleet.dispatcher.core.leader import LOOKUP_RETRY_S, LeaderMachine
from ratefleet.dispatcher.core.pulls import PULL_EXPIRES_S, STALE_AFTER_S
from ratefleet.dispatcher.core.split import SplitSpec, variant_of
from ratefleet.schemas import ErrorCode, Job

# -- a late delivery on a removed tier ---------------------------------------------------------


def removed_normal() -> Run:
    run = Run(machine())
    run.at(T0, only_vip())
    return run


def test_a_late_delivery_on_a_removed_tier_is_handed_back_at_once_until_its_last():
    run = removed_normal()
    for delivered in range(1, MAX_DELIVER):
        late = delivery(1, delivered)
        assert run.at(T0 + 0.1, late) == [cmd.HandBack(1, late.ack, 0.0)], delivered
    assert not run.m.held


def test_the_last_delivery_on_a_removed_tier_ends_the_job_as_an_unknown_tier():
    run = removed_normal()
    last = ev.JobDelivered("normal", 1, MAX_DELIVER, ack(1, MAX_DELIVER), incoming(1, MAX_DELIVER))
    assert run.at(T0 + 0.1, last) == [cmd.EndJob(last.verdict, ErrorCode.UNKNOWN_TIER,  # type: ignore[arg-type]
                                                 "tier 'normal' is no longer configured")]
    refused = delivery(2, MAX_DELIVER)  # intake refused it (poison): ended as that
    assert run.at(T0 + 0.2, refused) == [cmd.EndRefused(refused.verdict)]  # type: ignore[arg-type]
    unread = ev.JobDelivered("normal", 3, MAX_DELIVER, ack(3, MAX_DELIVER), None)
    assert run.at(T0 + 0.3, unread) == []  # nothing to end it with


def test_a_delivery_on_a_tier_the_leader_never_knew_is_handed_back_whatever_its_count():
    run = Run(machine())
    stray = ev.JobDelivered("gold", 1, 50, "a1", incoming(1, 50, tier="gold"))
    assert run.at(T0 + 0.1, stray) == [cmd.HandBack(1, "a1", 0.0)]


def test_a_late_delivery_on_a_removed_tier_is_left_alone_without_the_lease():
    run = Run(machine(lease_until=T0 + 1))
    run.at(T0, only_vip())
    assert run.at(T0 + 2, delivery(1, 2)) == []
    assert run.at(T0 + 2, delivery(2, MAX_DELIVER)) == []


# -- pull statuses -----------------------------------------------------------------------------


def pulled() -> Run:
    """Ready; each tier's whole window asked for and nothing arrived yet."""
    run = Run(machine(start=False))
    out = run.at(T0, ev.SessionStarted())
    assert sorted((p.tier, p.batch) for p in pulls(out)) == [("normal", WINDOW), ("vip", WINDOW)]
    return run


@pytest.mark.parametrize("status", ["408", "409", "404"])
def test_a_pull_request_that_ended_empty_is_asked_again_at_once(status):
    run = pulled()
    out = run.at(T0 + 0.3, ev.PullStatus("vip", status))  # before the first housekeeping tops up
    assert pulls(out) == [cmd.Pull("vip", WINDOW, PULL_EXPIRES_S)]
    assert run.m.pulls.tiers["normal"].outstanding == WINDOW  # the other tier's request is still open


@pytest.mark.parametrize("status", ["100", "503", "400"])
def test_other_statuses_on_a_pull_inbox_change_nothing(status):
    run = pulled()
    assert acts(run.at(T0 + 1.1, ev.PullStatus("vip", status))) == []
    assert run.m.pulls.tiers["vip"].outstanding == WINDOW


def test_a_status_on_a_removed_tier_s_inbox_is_ignored():
    run = pulled()
    run.at(T0 + 0.5, only_vip())
    assert acts(run.at(T0 + 1.1, ev.PullStatus("normal", "408"))) == []


def test_a_partly_filled_request_frees_only_what_will_not_come():
    run = pulled()
    # 3 of the 8 asked for will not come: 5 are still on their way, 3 free are less than half
    assert acts(run.at(T0 + 1.1, ev.PullStatus("vip", "408", unfilled=3))) == []
    assert run.m.pulls.tiers["vip"].outstanding == WINDOW - 3
    # the 5 never come (a request lost to a reconnect): forgotten once stale, counted from the status
    stale_at = T0 + 1.1 + STALE_AFTER_S
    assert [p for p in pulls(run.at(stale_at - 0.05, ev.Tick())) if p.tier == "vip"] == []
    assert run.m.pulls.tiers["vip"].outstanding == WINDOW - 3
    assert cmd.Pull("vip", WINDOW, PULL_EXPIRES_S) in run.at(stale_at + 0.5, ev.Tick())


def test_a_request_ended_by_the_server_is_logged_with_its_reason():
    run = pulled()
    run.at(T0 + 1.1, ev.PullStatus("vip", "409", description="Leadership Change"))
    assert [c for c in run.log if isinstance(c, cmd.Log)] == [
        cmd.Log("warning", "pull request ended by the server", {"tier": "vip", "reason": "Leadership Change"})]
    run.at(T0 + 1.2, ev.PullStatus("normal", "408", description="Request Timeout"))
    assert len([c for c in run.log if isinstance(c, cmd.Log)]) == 1  # an expiry is routine: not logged


# -- intake ------------------------------------------------------------------------------------


def test_a_refused_delivery_that_is_not_the_last_is_left_alone_without_the_lease():
    run = Run(machine(lease_until=T0 + 1))
    refused = ev.JobDelivered("normal", 1, 2, ack(1, 2), poison(1, 2))
    assert run.at(T0 + 2, refused) == []  # the next delivery (the new leader's) ends it
    run.at(T0 + 2.1, ev.LeaseRenewed(T0 + 10))
    assert run.at(T0 + 2.2, refused) == [cmd.EndRefused(refused.verdict)]  # type: ignore[arg-type]


def test_a_stored_result_is_sent_to_the_job_s_reply_subject_and_logged_with_the_job():
    run = Run(machine())
    verdict = replace(incoming(1, 3), reply_to="_INBOX.client.7")
    stored = ev.JobDelivered("normal", 1, 3, verdict.ack, verdict, b'{"job_id": "j1"}')
    out = run.m.handle(stored, T0 + 0.1)
    assert out == [cmd.Log("info", "redelivered job already has its result; acked without a second call",
                           {"job_id": "j1", "tier": "normal", "attempt": 3}),
                   cmd.AnswerStored(b'{"job_id": "j1"}', verdict.ack, "_INBOX.client.7")]


def test_a_redelivery_whose_result_lookup_got_no_answer_is_handed_back_not_called():
    """Its worker may have stored the Result and died before the ack: called on a lookup that
    timed out (NATS restarting), the job was paid twice."""
    run = Run(machine())
    verdict = incoming(1, 3)
    unknown = ev.JobDelivered("normal", 1, 3, verdict.ack, verdict, unknown=True)
    out = run.m.handle(unknown, T0 + 0.1)
    assert out[:2] == [cmd.Log("warning", "redelivered job's Result could not be looked up; handed back, not called",
                               {"job_id": "j1", "tier": "normal", "attempt": 3}),
                       cmd.HandBack(1, verdict.ack, LOOKUP_RETRY_S)]
    assert all(not isinstance(c, cmd.Assign) for c in out) and not run.m.held and not run.m.scheduler.pending("normal")
    assert run.at(T0 + 0.2, replace(unknown, unknown=False, delivered=4)) == []  # looked up again: held, called
    assert 1 in run.m.held


def copy_of(seq: int, job_seq: int, delivered: int = 1) -> ev.JobDelivered:
    """A message at `seq` carrying the job of `incoming(job_seq)` (its id sent again)."""
    verdict = replace(incoming(seq, delivered), job_id=f"j{job_seq}", job=incoming(job_seq).job)
    return ev.JobDelivered("normal", seq, delivered, verdict.ack, verdict)


def test_a_second_message_of_a_held_job_is_ended_without_a_call():
    """Its id was sent again past the dedup window (a batch run again): one call, one Result."""
    run = Run(machine())  # no worker: j1 stays held
    run.at(T0 + 0.1, delivery(1))
    copy = copy_of(9, 1)
    assert kinds(run.at(T0 + 0.2, copy)) == ["EndCopy"] and cmd.EndCopy(copy.verdict) in run.log  # type: ignore[arg-type]
    assert list(run.m.held) == [1] and run.m.held.seq_of("j1") == 1
    assert run.log[-2] == cmd.Log("info", "a second message of a job held or being called; ended without a call",
                                  {"job_id": "j1", "tier": "normal", "first_seq": 1, "seq": 9})


def test_a_second_message_of_a_job_being_called_is_ended_and_one_after_the_call_is_taken():
    run = Run(machine())
    run.at(T0, beat("w1", 1))
    [first] = assigned(run.at(T0 + 0.1, delivery(1)))
    copy = copy_of(9, 1)
    assert kinds(run.at(T0 + 0.2, copy)) == ["EndCopy"]
    run.at(T0 + 0.3, outcome(first.assignment))  # the call ended (its Result stored)
    late = copy_of(10, 1)
    assert not any(isinstance(c, cmd.EndCopy) for c in run.at(T0 + 0.4, late))  # taken: its Result is looked up
    assert run.m.fleet.calling_seq("j1") == 10 or run.m.held.seq_of("j1") == 10


def test_a_copy_looked_up_before_its_first_call_ended_is_handed_back_not_called():
    """The lookup runs beside intake (puller.py): sent while the first call ran, it may have
    missed the Result that call stored before its report came in."""
    run = Run(machine())
    run.at(T0, beat("w1", 2))
    [first] = assigned(run.at(T0 + 0.1, delivery(1)))
    run.at(T0 + 0.3, outcome(first.assignment))  # the call ended (its Result stored)
    stale = replace(copy_of(10, 1), looked_up_at=T0 + 0.2)
    out = run.at(T0 + 0.4, stale)
    assert cmd.HandBack(10, stale.ack, LOOKUP_RETRY_S) in out and not assigned(out) and not run.m.held
    fresh = replace(copy_of(11, 1), looked_up_at=T0 + 0.35)  # sent after the end: it saw what was stored
    assert assigned(run.at(T0 + 0.5, fresh))
    last = replace(copy_of(12, 3, MAX_DELIVER), looked_up_at=T0 + 0.5)
    run.at(T0 + 0.6, beat("w1", 2))
    [call] = assigned(run.at(T0 + 0.6, delivery(3)))
    run.at(T0 + 0.7, outcome(call.assignment))
    assert not any(isinstance(c, cmd.HandBack) for c in run.at(T0 + 0.8, last))  # the last delivery is taken


def test_a_copy_looked_up_before_an_adopted_call_of_its_id_ended_is_handed_back_not_called():
    """The same after a failover: the first message's call, adopted from a heartbeat, is
    known by its job id only."""
    run = Run(machine())
    run.at(T0, beat("w1", 2, (("old.1", "k1"),)))  # a call of job x-old.1 from an earlier leadership
    assert run.m.fleet.calling(99, "x-old.1")
    run.at(T0 + 0.3, outcome("old.1"))
    stale = replace(copy_of(10, 1), verdict=replace(copy_of(10, 1).verdict, job_id="x-old.1"),
                    looked_up_at=T0 + 0.2)
    out = run.at(T0 + 0.4, stale)
    assert cmd.HandBack(10, stale.ack, LOOKUP_RETRY_S) in out and not assigned(out)


def test_an_id_reused_by_another_batch_is_that_batchs_own_job():
    """Ended as a copy, the other batch would never get a Result under its name (its
    `submit --wait` waits for ever): it is taken and called."""
    run = Run(machine())
    run.at(T0 + 0.1, delivery(1))  # j1, no batch, held
    other = copy_of(9, 1)
    other = replace(other, verdict=replace(other.verdict, job=other.verdict.job.model_copy(update={"batch": "b2"})))
    assert kinds(run.at(T0 + 0.2, other)) == [] and run.m.held.seq_of("j1", "b2") == 9 and run.m.held.seq_of("j1") == 1


def test_the_held_jobs_index_follows_every_change():
    run = Run(machine())
    for seq in (1, 2, 3):
        run.at(T0 + 0.1, delivery(seq))
    held = run.m.held
    assert [held.seq_of(f"j{s}") for s in (1, 2, 3)] == [1, 2, 3]
    assert held.pop(2).incoming.job_id == "j2" and held.seq_of("j2") is None
    assert held.pop(7, None) is None and held.seq_of("j1") == 1
    held.clear()
    assert held.seq_of("j1") is None and held.seq_of("j3") is None


def test_the_last_delivery_is_called_even_when_its_result_lookup_got_no_answer():
    run = Run(machine())
    verdict = incoming(1, MAX_DELIVER)
    last = ev.JobDelivered("normal", 1, MAX_DELIVER, verdict.ack, verdict, unknown=True)
    assert run.at(T0 + 0.1, last) == [] and 1 in run.m.held  # handed back, it would be lost


def test_an_a_b_split_routes_each_job_by_its_id():
    split = SplitSpec(("alt",), 0.5)
    pools = (PoolSpec("main", "u", (KeySpec("m1", "main", "u", 1e6, 1e6),)),
             PoolSpec("alt", "u", (KeySpec("a1", "alt", "u", 1e6, 1e6),)))
    tiers = tuple(TierSpec(t, 1, ("main",), split) for t in ("vip", "normal"))
    m = LeaderMachine(settings(), SchedulerSpec(pools=pools, tiers=tiers), T0, conservative=False)
    run = Run(m)
    run.at(T0, ev.SessionStarted())
    run.at(T0, beat("w1", 20))
    for seq in range(1, 11):
        run.at(T0 + 0.01 * seq, delivery(seq))
    sent = assigned(run.log)
    want = {f"j{seq}": variant_of(f"j{seq}", split) for seq in range(1, 11)}
    assert {"split", "control"} <= set(want.values())
    assert {a.incoming.job_id: a.pool for a in sent} == {j: "alt" if v == "split" else "main" for j, v in want.items()}


def test_a_job_spends_its_cost_on_the_key_s_cost_budget():
    keys = (KeySpec("k1", "p", "u", 100.0, 10.0, cost_per_minute=60.0),)
    tiers = tuple(TierSpec(t, 1, ("p",)) for t in ("vip", "normal"))
    m = LeaderMachine(settings(), SchedulerSpec(pools=(PoolSpec("p", "u", keys),), tiers=tiers), T0,
                      conservative=False)
    run = Run(m)
    run.at(T0, ev.SessionStarted())
    run.at(T0, beat("w1", 4))
    before = m.scheduler.snapshot(T0)["keys"]["k1"]["cost_tokens"]
    assert assigned(run.at(T0, delivery(1, cost=7.0)))
    assert m.scheduler.snapshot(T0)["keys"]["k1"]["cost_tokens"] == pytest.approx(before - 7.0)


def test_a_run_of_refused_jobs_is_followed_by_the_next_pull_at_once():
    """Jobs intake ends (a cancelled batch's, poison ones) free the window as they come: once
    half of it is free the tier asks for more on that delivery, not at the next housekeeping
    tick (a cancelled 150,000-job batch drained at ~128 jobs/s and held up its tier)."""
    run = pulled()
    asked = []
    for seq in range(1, WINDOW // 2 + 1):
        asked += pulls(run.at(T0 + 0.001 * seq, delivery(seq, MAX_DELIVER, tier="vip")))
    assert asked == [cmd.Pull("vip", WINDOW // 2, PULL_EXPIRES_S)]


@pytest.mark.parametrize(("request_", "model"), [
    ({"path": "/v1/chat/completions", "json": {"model": "gpt-4o", "messages": []}}, "gpt-4o"),
    ({"path": "/v1beta/models/gemini-1.5-pro:generateContent", "json": {"contents": []}}, "gemini-1.5-pro"),
    ({"path": "/openai/deployments/prod-4o/chat/completions", "json": {"messages": []}}, "prod-4o"),
    ({"path": "/v1/embeddings", "json": {"input": "x"}}, None),
])
def test_a_queued_job_carries_the_model_it_asks_for(request_, model):
    """The scheduler learns which keys lack a model (a denial saying so) and sends that model's
    next jobs elsewhere; for that the queued job must know its model, from the body or the path."""
    m = machine()  # no worker: the job waits in the scheduler
    verdict = replace(incoming(1), job=Job.model_validate({"id": "j1", "request": request_}))
    m.handle(ev.JobDelivered("normal", 1, 1, ack(1, 1), verdict), T0)
    assert [job.model for job in m.scheduler.discard_pending()] == [model]


def test_the_leader_keeps_the_last_worker_slot_for_a_top_tier_job():
    """Normal jobs fill the worker's slots but one (`priority_slots`); a vip job then gets it at once."""
    m = LeaderMachine(settings(), replace(spec_with_keys(), priority_slots=1), T0, conservative=False,
                      lease_until=T0 + 1_000)
    m.handle(ev.SessionStarted(), T0)
    run = Run(m)
    run.at(T0, beat("w1", 8))
    handed = []
    for seq in range(1, 9):
        handed += assigned(run.at(T0 + 0.01 * seq, delivery(seq)))
    assert len(handed) == 7  # 8 slots: the last one stays free
    urgent = assigned(run.at(T0 + 0.2, delivery(20, tier="vip")))
    assert [a.incoming.job_id for a in urgent] == ["j20"]


def spec_with_keys() -> SchedulerSpec:
    return SchedulerSpec(pools=(PoolSpec("p", "u", (KeySpec("k1", "p", "u", 1000.0, 100.0),)),),
                         tiers=(TierSpec("vip", 2, ("p",)), TierSpec("normal", 2, ("p",))))
