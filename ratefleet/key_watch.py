"""While `submit --wait` or `results --wait` waits: say when a key goes out of use or comes back.

A batch user saw nothing when a key was disabled mid-batch (credits run out, a key revoked): the
Results just came slower, or stopped, and only `ratefleet status` said why. The wait now asks the
leader for the fleet's status every KEY_POLL_S seconds (the same answer `ratefleet status` prints,
one NATS request) and prints one line per change: a key disabled (with its reason and what to do,
`status_view.key_state`), a key enabled again, and a pool with no key left in use (its jobs wait
for a probe, or fail `no_key_available` when every key is operator-disabled or has no secret on
any worker: README "Reliability"), and a key's breaker opening or closing. Keys already out of
use when the wait starts are named once.
The status answer holds no secret (key ids, pools and reasons only).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import anyio

from ratefleet.client import Client
from ratefleet.runtime.connect import denial_expected, optional_read_refused
from ratefleet.status_view import key_state

KEY_POLL_S = 5.0  # seconds between two status requests while a wait runs


def out_of_use(keys: dict[str, dict[str, Any]]) -> dict[str, str]:
    """The keys the leader does not call now for good reason, `{key id: state text}`: disabled
    (by provider evidence, an operator, or no worker having its secret). A key cooling after a
    429 or with an open breaker is still in use (it comes back by itself)."""
    return {key_id: key_state(key, key_id) for key_id, key in keys.items() if key.get("disabled")}


def pools_left_without_keys(keys: dict[str, dict[str, Any]]) -> list[str]:
    """The pools of a status answer's `keys` in which no key is in rotation (each disabled), sorted."""
    pools: dict[str, bool] = {}
    for state in keys.values():
        pool = state.get("pool")
        if pool is not None:
            pools[pool] = pools.get(pool, False) or not state.get("disabled")
    return sorted(pool for pool, usable in pools.items() if not usable)


def key_changes(before: dict[str, str] | None, keys: dict[str, dict[str, Any]]) -> tuple[dict[str, str], list[str]]:
    """Compare a status answer's `keys` with the keys out of use at the last look (`before`;
    None: the first look). Returns the keys out of use now and the lines to print, in key order:
    `key k1 (pool p) is out of use: DISABLED by provider evidence: ...`, `key k1 is back in
    use`, and `no key of pool p is in use: ...` when a pool has just lost its last key."""
    now = out_of_use(keys)
    lines: list[str] = []
    before_ids = set(before or {})
    for key_id in sorted(now.keys() - before_ids):
        pool = keys[key_id].get("pool")
        lines.append(f"key {key_id}{f' (pool {pool})' if pool else ''} is out of use: {now[key_id]}")
    if before is not None:
        lines += [f"key {key_id} is back in use" for key_id in sorted(before_ids - now.keys())
                  if key_id in keys]
    for pool in pools_left_without_keys(keys):
        if not all(key_id in before_ids for key_id, key in keys.items() if key.get("pool") == pool):
            lines.append(f"no key of pool {pool} is in use: its jobs wait for a key's probe to succeed, or fail "
                         "`no_key_available` when every key is disabled by an operator or has no secret on any worker; "
                         "fix a key, then `ratefleet keys enable KEY`")
    return now, lines


def breaker_changes(before: set[str] | None, keys: dict[str, dict[str, Any]]) -> tuple[set[str], list[str]]:
    """The keys in use whose breaker is open or half-open now, and a line for each that opened or
    closed since the last look (`before`; None: the first look). A trial's batch stalled 151 s on
    breakers opened by jobs the upstream always answered 500, and the wait said only "nothing new
    for 29s"."""
    now = {key_id for key_id, key in keys.items()
           if not key.get("disabled") and key.get("breaker") in ("open", "half_open")}
    lines = [f"key {key_id}'s breaker is open after consecutive upstream errors (5xx, timeouts, connection "
             "errors): it gets one probe call every `dispatcher.breaker_reset_s` seconds (default 30) until one succeeds"
             for key_id in sorted(now - (before or set()))]
    if before is not None:
        lines += [f"key {key_id}'s breaker has closed: it takes calls again" for key_id in sorted(before - now)
                  if key_id in keys and not keys[key_id].get("disabled")]  # (disabled: key_changes says so)
    return now, lines


async def watch_keys(client: Client, say: Callable[[str], None], poll_s: float = KEY_POLL_S) -> None:
    """Run until cancelled: every `poll_s` seconds ask the leader for the fleet's status
    (`Client.status`) and `say` each line `key_changes` gives. A status that cannot be had (no
    leader yet, a leader still loading the key states, NATS reconnecting) is skipped: the wait's
    own messages cover those. A user NATS does not allow to ask (the producer of
    examples/nats-accounts.conf) is not warned about it: the watch just ends."""
    subject = client.subjects.admin_status
    before: dict[str, str] | None = None
    opened: set[str] | None = None
    while True:
        try:
            with denial_expected(subject):
                answer = await client.status()
        except Exception:  # noqa: BLE001 - see docstring
            if optional_read_refused(subject):
                return
            answer = None
        keys = answer.get("keys") if isinstance(answer, dict) else None
        if isinstance(keys, dict) and answer.get("leader") and not answer.get("starting"):
            before, lines = key_changes(before, keys)
            opened, more = breaker_changes(opened, keys)
            for line in lines + more:
                say(line)
        await anyio.sleep(poll_s)
