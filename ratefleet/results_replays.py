"""Replayed jobs in `ratefleet results`: a replay supersedes the job it replays.

`ratefleet dlq replay` resubmits a dead-lettered job under a new id `<original>-r<hex>` whose
metadata carries `replay_of: <original id>`, in the same batch. Both Results are stored under
the batch, so a batch of N lines would count N + replays. `Replays` maps every replay to the
line it stands for (its root: the first id of a replay chain), so `results` counts one Result
per line and writes the latest replay in place of the Result it supersedes.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field

from nats.js.api import DeliverPolicy

from ratefleet.client import Client


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
