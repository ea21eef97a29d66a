"""After `ratefleet config push`: does the fleet run the pushed revision, and which of its keys
can no worker call with?

Read from the leader's status (`<prefix>.admin.status`, the answer `ratefleet status` renders):
its `config_revision`, each worker's `config_revision`, and each key's `secret_missing` (set
by the leader from the workers' heartbeats: the reason no live worker holds the key's secret).
"""

from __future__ import annotations

import json
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import anyio
from nats.aio.client import Client as NATS
from nats.errors import NoRespondersError

from ratefleet.runtime.config_kv import document_for, read_toml
from ratefleet.runtime.logs import redact_text
from ratefleet.schemas import Subjects
from ratefleet.schemas.config_store import StoredConfig
from ratefleet.schemas.errors import ConfigError

POLL_S = 0.5  # between two status reads while the fleet catches up


@dataclass
class Applied:
    """What the fleet runs, seen from the leader's last status answer.

    `leader`: the leader's id (None: no dispatcher answered, or one is still taking over);
    `leader_revision`: the config revision it runs (None: its local file); `workers`: how many
    workers it knows; `behind`: (worker id, revision) of those not yet at the pushed revision;
    `secret_missing`: key id -> why no worker can call with it (the key is out of rotation);
    `absent`: no dispatcher runs at all."""

    revision: int
    leader: str | None = None
    leader_revision: int | None = None
    workers: int = 0
    behind: list[tuple[str, int | None]] = field(default_factory=list)
    secret_missing: dict[str, str] = field(default_factory=dict)
    absent: bool = False  # no dispatcher is subscribed to the status subject at all

    @property
    def everywhere(self) -> bool:
        """The leader and every worker it knows run the revision (or a later one)."""
        return (self.leader is not None and self.leader_revision is not None
                and self.leader_revision >= self.revision and not self.behind)

    @classmethod
    def of(cls, revision: int, answer: dict | None) -> Applied:
        """Read a status answer (None: none came)."""
        seen = cls(revision)
        if not answer or not answer.get("leader") or answer.get("starting"):
            return seen
        seen.leader, seen.leader_revision = answer["leader"], answer.get("config_revision")
        workers = answer.get("workers") or []
        seen.workers = len(workers)
        seen.behind = [(w.get("id", "?"), w.get("config_revision")) for w in workers
                       if w.get("config_revision") is None or w["config_revision"] < revision]
        seen.secret_missing = {key_id: k["secret_missing"] for key_id, k in (answer.get("keys") or {}).items()
                               if k.get("secret_missing")}
        return seen


async def fleet_applied(nc: NATS, subjects: Subjects, revision: int, wait_s: float, settle_s: float) -> Applied:
    """Ask the leader's status every POLL_S seconds, for at most `wait_s` seconds, until the
    leader and every worker run `revision`; then once more after `settle_s` seconds (a
    worker heartbeat or two: the leader learns from them which of the new keys' secrets the
    workers hold). With no dispatcher subscribed at all (NATS says no responders) it returns at
    once: none is there to apply it now. Returns the last view; never raises for an absent or
    silent leader."""
    deadline = time.monotonic() + wait_s
    settled = False
    while True:
        answer = None
        try:
            reply = await nc.request(subjects.admin_status, b"", timeout=max(0.2, min(1.0, deadline - time.monotonic())))
            answer = json.loads(reply.data)
        except NoRespondersError:
            return Applied(revision, absent=True)
        except (TimeoutError, ValueError):  # a dispatcher busy or taking over, or a garbled answer
            pass
        seen = Applied.of(revision, answer)
        if seen.everywhere and settled:
            return seen
        if time.monotonic() >= deadline:
            return seen
        if seen.everywhere:
            settled = True
            await anyio.sleep(min(settle_s, max(0.0, deadline - time.monotonic())))
        else:
            await anyio.sleep(POLL_S)


def describe(seen: Applied, wait_s: float) -> list[str]:
    """Lines for the operator: where the revision runs, and what to do where it does not."""
    if seen.absent:
        return [f"no dispatcher is running: the fleet applies revision {seen.revision} when it starts"]
    if seen.leader is None:
        return [f"no dispatcher answered within {wait_s:g}s: the fleet applies revision {seen.revision} when it "
                "starts (`ratefleet status` shows the revision each process runs)"]
    lines = []
    if seen.leader_revision is None or seen.leader_revision < seen.revision:
        running = "its local file" if seen.leader_revision is None else f"revision {seen.leader_revision}"
        lines.append(f"the leader ({seen.leader}) still runs {running} after {wait_s:g}s: its log says why (a config "
                     "it cannot apply is logged there and the running one stays)")
    for worker, revision in seen.behind:
        running = "its local file" if revision is None else f"revision {revision}"
        lines.append(f"worker {worker} still runs {running} after {wait_s:g}s: its log says why")
    if not lines:
        workers = {0: "no worker is up", 1: "its 1 worker runs it too"}.get(seen.workers,
                                                                           f"its {seen.workers} workers run it too")
        lines.append(f"applied: the leader ({seen.leader}) runs it; {workers}")
    for key_id, why in sorted(seen.secret_missing.items()):
        if why.startswith("no active version"):  # the config's own versions, not a worker's secret
            lines.append(f"warning: key {key_id} is out of rotation: {why} in this config; give it an active version "
                         "(status \"active\", not_before passed, not_after ahead) and push again")
            continue
        lines.append(f"warning: key {key_id} is out of rotation: no worker can call with it ({why}); give the "
                     "workers its secret (`ratefleet status` shows when one has it)")
    return lines


def config_drift(path: Path, running: int | None, stored: StoredConfig | None) -> str | None:
    """A note for `ratefleet status` when `path`, a fleet config (it has [pools]), is not what
    the fleet runs: it has errors (so `up --config`'s watch did not push it; before, only
    `up`'s log said so) or it differs from the stored revision. None when it is the same, when
    the fleet runs its local files (`running` None), or when `path` is not a fleet config."""
    if running is None or stored is None:
        return None
    try:
        if "pools" not in read_toml(path):
            return None
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            document = document_for(path)
    except ConfigError as exc:
        return (f"note: {path} has errors, so the fleet does not run it (it runs revision {running}): "
                f"{redact_text(str(exc))[:400]}; `ratefleet config check {path}` shows them")
    if document.sha256 != stored.sha256:
        return (f"note: {path} differs from the config the fleet runs (revision {running}); "
                f"`ratefleet config push {path}` applies it")
    return None
