"""A hypothesis property of the leader's state machine over random interleavings of events:
every delivered job ends exactly once, and no key goes over its limits.

A small model of JetStream and the workers drives the REAL machine: deliveries (first ones,
redeliveries of what was returned, last deliveries, some with their Result stored already),
heartbeats of two workers (one may vanish), outcome reports in any order (ok, retryable,
no call made), lease lapses and renewals (a paused leader), and time passing. Each delivery
has its own ack subject; its ends are counted: an Assign leads to exactly one of an outcome
report or a nak; EndJob, EndRefused, AnswerStored, HandBack and Nak end it directly. A
delivery the machine neither holds nor ends is allowed only when it was dropped while the
lease may have lapsed (the server then redelivers it after ack_wait) or was a duplicate.
"""

from __future__ import annotations

from collections import Counter

from fleet_sim import max_window_excess
from hypothesis import HealthCheck, event, example, given, settings
from hypothesis import strategies as st
from leader_helpers import MAX_DELIVER, T0, beat, delivery, machine, outcome

from ratefleet.dispatcher.core import commands as cmd
from ratefleet.dispatcher.core import events as ev

RPS, BURST, CONCURRENCY = 5.0, 2.0, 2
ENDS = (cmd.EndJob, cmd.EndRefused, cmd.AnswerStored, cmd.HandBack, cmd.Nak)
deliver = st.tuples(st.just("deliver"), st.booleans())  # (stored Result for a redelivery?)
report = st.tuples(st.just("report"), st.integers(0, 5), st.sampled_from(["ok", "upstream_error", "lost"]))
actions = st.lists(st.one_of(
    deliver, deliver, deliver, report, report,
    st.tuples(st.just("beat"), st.sampled_from(["w1", "w2"])),
    st.tuples(st.just("tick"), st.floats(0, 2.5)),
    st.tuples(st.just("lapse"), st.just(0)),
    st.tuples(st.just("renew"), st.just(0)),
    st.tuples(st.just("vanish"), st.sampled_from(["w1", "w2"])),
), min_size=20, max_size=100)


class Model:
    """JetStream and two workers around the machine; checks as it goes (module docstring)."""

    def __init__(self, jobs: int) -> None:
        self.m = machine(concurrency=CONCURRENCY, rps=RPS, burst=BURST, keys=2)
        self.now = T0
        self.queue = list(range(1, jobs + 1))  # stream sequences the server will deliver next
        self.deliveries: Counter[int] = Counter()
        self.ends: Counter[str] = Counter()
        self.dropped: set[str] = set()
        self.assigned: dict[str, tuple[str, str, str, int]] = {}  # assignment -> (ack, key, worker, seq)
        self.calls: dict[str, list[float]] = {}
        self.silent: set[str] = set()
        self.done: set[int] = set()
        self.feed(beat("w1", 2))
        self.feed(beat("w2", 2))

    def feed(self, event: ev.Event) -> None:
        out = self.m.handle(event, self.now)
        for command in out:
            self.apply(command)
        assert self.m.wake_at() > self.now, "the machine would wake at once, again and again"
        self.forget_returned()

    def apply(self, command: cmd.Command) -> None:
        if isinstance(command, cmd.Assign | cmd.HandBack | cmd.Nak | cmd.EndJob | cmd.AnswerStored):
            assert self.m.owns(self.now), f"{type(command).__name__} while the lease may be another's"
        if isinstance(command, cmd.Assign):
            key = self.m.fleet.by_assignment[command.assignment].key_id
            busy = sum(1 for _, k, _, _ in self.assigned.values() if k == key)
            assert busy < CONCURRENCY, f"{key} over its concurrency"
            self.calls.setdefault(key, []).append(self.now)
            self.assigned[command.assignment] = (command.incoming.ack, key, command.worker,
                                                 command.incoming.stream_seq)
        elif isinstance(command, ENDS):
            ack = command.refused.ack if isinstance(command, cmd.EndRefused) else (
                command.incoming.ack if isinstance(command, cmd.EndJob) else command.ack)
            self.end(ack, requeue=isinstance(command, cmd.HandBack | cmd.Nak))
            if isinstance(command, cmd.Nak):  # a returned assignment
                for assignment, (a, *_rest) in list(self.assigned.items()):
                    if a == ack:
                        del self.assigned[assignment]

    def end(self, ack: str, *, requeue: bool) -> None:
        self.ends[ack] += 1
        assert self.ends[ack] == 1, f"delivery {ack} ended twice"
        seq = int(ack.split(".")[5])
        if requeue:
            self.queue.append(seq)
        else:
            self.done.add(seq)

    def forget_returned(self) -> None:
        """Assignments the machine gave up without a nak (a fenced leader naks nothing)."""
        for assignment, (ack, _, _, seq) in list(self.assigned.items()):
            if assignment not in self.m.fleet.by_assignment:
                del self.assigned[assignment]
                if self.ends[ack] == 0:
                    assert not self.m.owns(self.now), "an assignment vanished without a nak while the lease was ours"
                    self.dropped.add(ack)
                    self.queue.append(seq)

    def deliver(self, stored: bool) -> None:
        if not self.queue:
            return
        seq = self.queue.pop(0)
        self.deliveries[seq] += 1
        n = self.deliveries[seq]
        event = delivery(seq, n, stored=b"{}" if stored and n > 1 and n < MAX_DELIVER else None)
        self.feed(event)
        taken = seq in self.m.held or any(a == event.ack for a, *_ in self.assigned.values())
        if not taken and self.ends[event.ack] == 0:
            assert n < MAX_DELIVER, "the last delivery was neither run nor ended"
            assert not self.m.owns(self.now), "a delivery was dropped while the lease was ours"
            self.dropped.add(event.ack)
            self.queue.append(seq)  # ack_wait runs out; the server delivers it again

    def report(self, index: int, kind: str) -> None:
        if not self.assigned:
            return
        assignment = sorted(self.assigned)[index % len(self.assigned)]
        ack, key, _, seq = self.assigned.pop(assignment)
        self.end(ack, requeue=kind != "ok")  # the worker stores the Result, or naks / hands back
        self.feed(outcome(assignment, kind, key))

    def step(self, action: tuple) -> None:
        name, arg = action[0], action[1]
        if name == "deliver":
            self.deliver(arg)
        elif name == "beat" and arg not in self.silent:
            mine = tuple((a, k) for a, (_, k, w, _) in self.assigned.items() if w == arg)
            self.feed(beat(arg, 2, mine))
        elif name == "report":
            self.report(arg, action[2])
        elif name == "tick":
            self.now += arg
            self.feed(ev.Tick())
        elif name == "lapse":
            self.feed(ev.LeaseLost())
        elif name == "renew":
            self.feed(ev.LeaseRenewed(self.now + 1_000))
        elif name == "vanish":
            self.silent.add(arg)

    def finish(self) -> None:
        """The lease is ours again, the live workers report, and the leader steps down."""
        self.feed(ev.LeaseRenewed(self.now + 1_000))
        while self.assigned:
            self.report(0, "ok")
        self.now += 0.01
        self.feed(ev.StepDown())


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(jobs=st.integers(1, 8), steps=actions)
@example(jobs=2, steps=[("beat", "w1"), ("deliver", False), ("vanish", "w1"), ("tick", 2.0), ("tick", 2.0),
                        ("beat", "w2"), ("deliver", False), ("deliver", False)])
def test_every_delivery_ends_exactly_once_and_no_key_goes_over_its_limit(jobs, steps):
    model = Model(jobs)
    for action in steps:
        model.step(action)
    model.finish()
    event(f"dropped while fenced: {'some' if model.dropped else 'none'}")
    event(f"deliveries: {'redelivered' if any(n > 1 for n in model.deliveries.values()) else 'first only'}")
    for ack, count in model.ends.items():
        assert count == 1, ack
    ended = set(model.ends)
    for seq, n in model.deliveries.items():
        for d in range(1, n + 1):
            ack = delivery(seq, d).ack
            assert (ack in ended) != (ack in model.dropped), f"delivery {ack}: ended {ack in ended}, dropped"
    for calls in model.calls.values():
        assert max_window_excess([(at, 1.0) for at in calls], RPS) <= BURST + 1e-6
