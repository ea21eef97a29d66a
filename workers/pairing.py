"""Defence in depth: a worker calls an upstream only with a key of that upstream's pools.

The leader pairs each job with a key of a pool of the job's upstream. An assignment that
pairs them otherwise (forged by someone who can publish on the internal subjects, or sent by
a leader with another config) would send the key's secret to another host; the worker
refuses it before resolving the secret (workers/service.py hands the job back unrun).
"""

from __future__ import annotations

from typing import Any

from ratefleet.schemas import Config


def pairing_problem(config: Config, key_id: str, upstream: str, job: dict[str, Any]) -> str | None:
    """Why this worker must not call `upstream` with key `key_id` for `job` (the assignment's
    raw job JSON), or None. A key this worker does not know at all is left to the secret
    resolver (it hands the job back as "key not in this worker's config"), and so is an upstream
    this worker does not know: a worker one config revision behind the leader hands such a job
    back unrun and uncounted (workers/service.py), and without the upstream's base URL it could
    not send the secret anywhere. Never names a secret."""
    if upstream not in config.upstreams:
        return None
    named = job.get("upstream") if isinstance(job, dict) else None
    expected = named if isinstance(named, str) else config.implicit_upstream()
    if expected is not None and expected != upstream:
        return f"the job is for upstream {expected!r} but the assignment sends it to {upstream!r}"
    serving = {config.pool_upstream(name) for name, pool in config.pools.items()
               if any(key.id == key_id for key in pool.keys)}
    if serving and upstream not in serving:
        return f"key {key_id!r} belongs to pools of {sorted(u for u in serving if u)}, not of {upstream!r}"
    return None
