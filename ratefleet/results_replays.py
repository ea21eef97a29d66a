"""Replayed jobs in `ratefleet results`: a replay supersedes the job it replays.

`ratefleet dlq replay` resubmits a dead-lettered job under a new id `<original>-r<hex>` whose
metadata carries `replay_of: <original id>`, in the same batch. Both Results are stored under
the batch, so a batch of N lines would count N + replays. `Replays` maps every replay to the
line it stands for (its root: the first id of a replay chain), so `results` counts one Result
per line and writes the latest replay in place of the Result it supersedes.
"""

from __future__ import annotations

import json
import shlex
from dataclasses import dataclass, field

from nats.js.api import DeliverPolicy

from ratefleet.client import Client
from ratefleet.schemas import Result

# error codes of jobs the fleet gave up on (not the request's fault): each left a dead letter
# holding its job, which `ratefleet dlq replay` sends again
GAVE_UP = frozenset({"attempts_exhausted", "rate_limited", "poison_message", "no_key_available"})


def gave_up(result: Result) -> bool:
    """True when `result` ended with one of the GAVE_UP codes."""
    return result.error is not None and str(result.error.code) in GAVE_UP


def replay_hint(batch: str, count: int, nats_args: list[str]) -> str:
    """The line saying how to run again the `count` jobs of `batch` the fleet gave up on."""
    replay = shlex.join(["ratefleet", "dlq", "replay", "--batch", batch, "--given-up", *nats_args])
    noun = "job" if count == 1 else "jobs"
    return (f"{count:,} {noun} of batch {batch} the fleet gave up on ({', '.join(sorted(GAVE_UP))}; not the "
            f"request's fault); run them again with: {replay}, then `ratefleet results --batch {batch}` "
            "writes their new Results in place of these")


@dataclass
class Replays:
    """root id -> latest replay id, and replay id -> root id (only replays are kept: a few per batch)."""

    latest: dict[str, str] = field(default_factory=dict)
    roots: dict[str, str] = field(default_factory=dict)

    def add(self, job_id: str, replay_of: str | None) -> str | None:
        """Note one stored Result; returns its root when it is a replay, else None. Stream order:
        a later replay of the same line wins."""
        if not replay_of or not job_id.startswith(replay_of[:100] + "-r"):
            return None
        root = self.roots.get(replay_of, replay_of)
        self.roots[job_id] = root
        self.latest[root] = job_id
        return root


def replay_of(metadata: dict | None) -> str | None:
    """The `replay_of` a replayed job's metadata carries, else None."""
    value = (metadata or {}).get("replay_of")
    return value if isinstance(value, str) else None


async def scan_replays(client: Client, batch: str, idle_timeout: float = 1.0) -> Replays:
    """Read the batch's stored Results once (only job id and metadata are parsed, no body is
    fetched) and return its replays."""
    found = Replays()
    sub = await client.js.subscribe(client.subjects.batch_results(batch), stream=client.subjects.results_stream,
                                    ordered_consumer=True,
                                    deliver_policy=DeliverPolicy.ALL)
    try:
        while True:
            try:
                msg = await sub.next_msg(timeout=idle_timeout)
            except TimeoutError:
                return found
            try:
                data = json.loads(msg.data)
                found.add(str(data.get("job_id")), replay_of(data.get("metadata")))
            except (ValueError, AttributeError):
                pass  # not a Result: `results` itself reports it
            if msg.metadata.num_pending == 0:
                return found
    finally:
        try:
            await sub.unsubscribe()
        except Exception:  # noqa: BLE001 - the connection is already closing
            pass
