"""Builders for the leader state machine's tests: a one-pool spec, settings, deliveries,
heartbeats, and a small driver that keeps the commands of each step."""

from __future__ import annotations

from dataclasses import dataclass, field

from ratefleet.dispatcher.core import KeySpec, Outcome, PoolSpec, SchedulerSpec, TierSpec
from ratefleet.dispatcher.core import commands as cmd
from ratefleet.dispatcher.core import events as ev
from ratefleet.dispatcher.core.delivery import Incoming, Refused
from ratefleet.dispatcher.core.leader import LeaderMachine, LeaderSettings
from ratefleet.schemas import ErrorCode, Job
from ratefleet.schemas.internal import Heartbeat, InFlight

T0 = 10_000.0
MAX_DELIVER = 5
TIERS = ("vip", "normal")


def spec(*, rps: float = 100.0, burst: float = 10.0, concurrency: int | None = None, keys: int = 1) -> SchedulerSpec:
    pool = PoolSpec("p", "u", tuple(KeySpec(f"k{i + 1}", "p", "u", rps, burst, concurrency) for i in range(keys)))
    return SchedulerSpec(pools=(pool,), tiers=tuple(TierSpec(t, 2, ("p",)) for t in TIERS))


def settings(**overrides: object) -> LeaderSettings:
    values: dict[str, object] = dict(
        leader_id="d1", epoch=(1, 7), windows={t: 8 for t in TIERS}, max_deliver={t: MAX_DELIVER for t in TIERS},
        ready_after_s=0.0, housekeeping_s=0.5, keep_alive_after_s=10.0, worker_timeout_s=3.0,
        max_payload=1 << 20)
    values.update(overrides)
    return LeaderSettings(**values)  # type: ignore[arg-type]


def machine(*, lease_until: float = T0 + 1_000, start: bool = True, **spec_args: object) -> LeaderMachine:
    m = LeaderMachine(settings(), spec(**spec_args), T0, conservative=False, lease_until=lease_until)  # type: ignore[arg-type]
    if start:
        m.handle(ev.SessionStarted(), T0)
    return m


def ack(seq: int, delivered: int) -> str:
    return f"$JS.ACK.RATEFLEET_JOBS.c.1.{seq}.{delivered}.0.0"


def incoming(seq: int, delivered: int = 1, tier: str = "normal", cost: float = 1.0) -> Incoming:
    job = Job(id=f"j{seq}", request={"path": "/v1/x"}, cost=cost)  # type: ignore[arg-type]
    return Incoming(job=job, job_id=f"j{seq}", tier=tier, upstream="u", ack=ack(seq, delivered), reply_to=None,
                    attempt=delivered, max_attempts=MAX_DELIVER, submitted_at=0.0, stream_seq=seq)


def poison(seq: int, delivered: int, tier: str = "normal") -> Refused:
    return Refused("failed", ErrorCode.POISON_MESSAGE, "delivered too often", f"j{seq}", None, tier,
                   ack(seq, delivered), None, delivered, b"{}")


def delivery(seq: int, delivered: int = 1, *, tier: str = "normal", stored: bytes | None = None,
             cost: float = 1.0) -> ev.JobDelivered:
    verdict = poison(seq, delivered, tier) if delivered >= MAX_DELIVER else incoming(seq, delivered, tier, cost)
    return ev.JobDelivered(tier, seq, delivered, ack(seq, delivered), verdict, stored)


def beat(worker: str = "w1", slots: int = 2, in_flight: tuple[tuple[str, str], ...] = ()) -> ev.HeartbeatReceived:
    items = [InFlight(assignment=a, key_id=k, job_id=f"x-{a}") for a, k in in_flight]
    return ev.HeartbeatReceived(Heartbeat(worker=worker, slots=slots, in_flight=items))


def outcome(assignment: str, kind: str = "ok", key_id: str = "k1") -> ev.OutcomeReported:
    return ev.OutcomeReported(assignment, key_id, Outcome(kind=kind, status=200 if kind == "ok" else None))  # type: ignore[arg-type]


@dataclass
class Run:
    """Feeds events at given times and keeps every command."""

    m: LeaderMachine
    log: list[cmd.Command] = field(default_factory=list)

    def at(self, now: float, event: ev.Event) -> list[cmd.Command]:
        out = self.m.handle(event, now)
        self.log += out
        return [c for c in out if not isinstance(c, cmd.Log)]


def kinds(commands: list[cmd.Command]) -> list[str]:
    """Command class names, without logs, announces and pulls (they are not about jobs)."""
    return [type(c).__name__ for c in commands if not isinstance(c, cmd.Log | cmd.Announce | cmd.Pull)]


def assigned(commands: list[cmd.Command]) -> list[cmd.Assign]:
    return [c for c in commands if isinstance(c, cmd.Assign)]


WINDOW = 8  # settings(): every tier keeps 8 jobs in memory


def only_vip() -> ev.ConfigChanged:
    """A revision that removes the tier "normal" (its last delivery, 5, stays known)."""
    spec = SchedulerSpec(pools=(PoolSpec("p", "u", (KeySpec("k1", "p", "u", 100.0, 10.0),)),),
                         tiers=(TierSpec("vip", 2, ("p",)),))
    return ev.ConfigChanged(2, spec, {"vip": WINDOW}, {"vip": MAX_DELIVER})


def acts(out: list[cmd.Command]) -> list[cmd.Command]:
    """The commands of a step without the epoch announce housekeeping repeats."""
    return [c for c in out if not isinstance(c, cmd.Announce)]


def pulls(out: list[cmd.Command]) -> list[cmd.Pull]:
    return [c for c in out if isinstance(c, cmd.Pull)]
