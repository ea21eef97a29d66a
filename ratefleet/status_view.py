"""Rendering `ratefleet status` as tables."""

from __future__ import annotations

from rich.console import Console
from rich.table import Column, Table

NARROW = 150  # columns below which the keys table becomes one block per key


def _cell(value) -> str:
    """A table cell: "-" for a missing value (None), else the value as text."""
    return "-" if value is None else str(value)


def _columns(first: str, *rest: str) -> list[Column]:
    """The first column (an id people copy) is never cut; long cells fold onto more lines
    instead of ending in "…". (Not a terminal: the console is 200 wide, see make_console.)"""
    return [Column(first, no_wrap=True), *(Column(name, overflow="fold") for name in rest)]


def render_status(answer: dict, console: Console | None = None) -> None:
    console = console or Console()
    silent = answer.get("silent_lease_holder")
    leader = answer.get("leader") or (
        f"none answering (the lease is held by {silent}, which did not answer within 1 s; a standby takes over "
        "once the lease expires, [dispatcher] lease_ttl_s)" if silent else "none (no dispatcher holds the lease)")
    if answer.get("starting"):
        leader += " (taking over: loading key states; ask again in a moment)"
    console.print(f"[bold]leader[/bold]: {leader}   answered by: {_cell(answer.get('dispatcher'))}")
    leader_revision = _revision(answer.get("config_revision")) if answer.get("leader") else "-"
    console.print(f"[bold]config revision[/bold]: leader {leader_revision}, "
                  f"answering dispatcher {_revision(answer.get('dispatcher_config_revision'))}")
    tiers = Table("tier", "queued", "pending (window)", "in flight", "dispatched", "unacked", title="tiers")
    for name, t in (answer.get("tiers") or {}).items():
        tiers.add_row(name, str(t.get("queued", "?")), _cell(t.get("pending")), _cell(t.get("in_flight")),
                      _cell(t.get("dispatched")), _cell(t.get("unacked")))
    console.print(tiers)
    for name, t in (answer.get("tiers") or {}).items():
        if t.get("configured") is False:
            console.print(f"tier {name}: {t.get('queued', 0)} jobs wait in JetStream, but the live config has no tier "
                          f"{name} (removed by a config push): nothing runs them until [tiers.{name}] is pushed again",
                          markup=False, highlight=False, soft_wrap=True)
    headers = ("key", "pool", "req/s effective / configured", "req tokens", "token budget left / per min", "in flight",
               "breaker",
               "cooldown s", "calls", "ok", "429s", "errors", "state")
    rows = [_key_row(key_id, k) for key_id, k in (answer.get("keys") or {}).items()]
    if console.width < NARROW:  # 13 columns do not fit: one block per key, every value whole
        console.print("keys", markup=False)
        for row in rows:
            console.print(f"  {row[0]}: " + ", ".join(f"{h} {v}" for h, v in zip(headers[1:], row[1:])),
                          markup=False, highlight=False, soft_wrap=True)
    else:
        keys = Table(*_columns(*headers), title="keys")
        for row in rows:
            keys.add_row(*row)
        console.print(keys)
    workers = Table(*_columns("worker", "slots", "in flight", "calls", "host", "pid", "seen s ago", "state", "config"),
                    title="workers")
    for w in answer.get("workers") or []:
        workers.add_row(w["id"], str(w["slots"]), str(w["in_flight"]), _cell(w.get("calls")), _cell(w.get("host")),
                        _cell(w.get("pid")), _cell(w.get("last_seen_s")), "draining" if w.get("draining") else "up",
                        _revision(w.get("config_revision")))
    console.print(workers)
    for w in answer.get("workers") or []:  # a worker "up" that cannot call with some keys says which and why
        unusable = w.get("unusable_keys") or {}
        if unusable:
            why = "; ".join(f"{key_id}: {reason}" for key_id, reason in sorted(unusable.items()))
            console.print(f"worker {w['id']} cannot call with {len(unusable)} key{'s' if len(unusable) != 1 else ''} "
                          f"({why})", markup=False, highlight=False, soft_wrap=True)
    standby = [d for d in answer.get("dispatchers") or [] if not d.get("leader")]
    if standby:
        console.print("standby dispatchers: " + ", ".join(f"{d['id']} (seen {_cell(d.get('last_seen_s'))} s ago)"
                                                          for d in standby), markup=False, highlight=False,
                      soft_wrap=True)


def _revision(revision: int | None) -> str:
    """A process's config revision; None: it runs its local file (nothing pushed yet)."""
    return "local file" if revision is None else str(revision)


def _key_row(key_id: str, k: dict) -> list[str]:
    return [key_id, _cell(k.get("pool")), _rate(k), _cell(k.get("tokens")), token_budget(k),
            f"{_cell(k.get('in_flight'))}/{k.get('concurrency') or '∞'}", _cell(k.get("breaker")),
            _cell(k.get("cooldown_s")), _cell(k.get("calls")), _cell(k.get("ok")), _cell(k.get("rate_limited")),
            _cell(k.get("errors")), key_state(k, key_id)]


def token_budget(key: dict) -> str:
    """A key's cost bucket for people: "51,833 / 100,000" (tokens it may spend now / its
    cost_per_minute; negative: overdrawn by answers that used more than estimated), "-"
    without cost_per_minute. Before, the column read "cost tokens 51832.76" beside "tokens
    1.69", the request bucket, which a tokens-per-minute user took for the model tokens left."""
    left, per_minute = key.get("cost_tokens"), key.get("cost_per_minute")
    if not isinstance(left, (int, float)) or not isinstance(per_minute, (int, float)):
        return "-"
    return f"{left:,.0f} / {per_minute:,.0f}"


def _rate(key: dict) -> str:
    """"2.1 / 20" (requests per second the key is run at / configured); a cost budget that
    adapted too is added as "; 900 / 90000 cost/min"."""
    text = f"{key.get('effective_rps', '?')} / {key.get('rps', '?')}"
    cpm, effective_cpm = key.get("cost_per_minute"), key.get("effective_cost_per_minute")
    if cpm is not None and effective_cpm is not None and effective_cpm < cpm:
        text += f"; {effective_cpm:g} / {cpm:g} cost/min"
    return text


def key_state(k: dict, key_id: str = "KEY") -> str:
    """One key's state for people: "ok", "DISABLED by provider evidence: <reason>; probe in
    42 s; once its secret or account is fixed: `ratefleet keys enable k1`" (`key_id`: the key's id,
    so the command can be run as printed), "DISABLED by an
    operator: <reason>", "no worker has its secret (<reason>)", "rate limited: ..." (its last
    fresh answer was a 429, `throttled`); an
    enabled key whose token budget is overdrawn (answers reported more usage than was
    reserved) says so, and for about how long it gets no call."""
    if not k.get("disabled"):
        debt, per_minute = k.get("cost_tokens"), k.get("effective_cost_per_minute") or k.get("cost_per_minute")
        if isinstance(debt, (int, float)) and debt < 0 and per_minute:
            return (f"ok; token budget overdrawn by {-debt:,.0f} (usage above the estimates): "
                    f"no call for about {-debt / (per_minute / 60):.0f} s")
        if k.get("breaker") == "open":  # it read "ok" while the key took no call (upstream unreachable)
            return ("no calls: breaker open after consecutive upstream errors (5xx, timeouts, connection errors); "
                    "one probe call after breaker_reset_s; check the upstream (base_url) and its answers")
        if k.get("breaker") in ("half_open", "half-open"):  # (BreakerState.HALF_OPEN is half_open)
            return "probing: breaker half-open, one call at a time until one succeeds"
        if k.get("throttled"):  # between two cooldowns it read "ok" (a timeout's no_key_ready sends people here)
            return "rate limited: its last answer was a 429; called again after each cooldown"
        return "ok"
    by = k.get("disabled_by")
    if by == "secret":
        return f"no worker has its secret ({k.get('secret_missing')})"
    if by == "operator":
        return f"DISABLED by an operator: {k.get('disabled_reason')}"
    text = f"DISABLED by provider evidence: {k.get('disabled_reason')}"
    probe = k.get("probe_in_s")
    if probe is not None:
        if k.get("probe_in_flight"):
            text += "; probe job in flight"
        elif probe == 0:  # (it read "in flight" while no job was there to send: an operator's finding)
            text += "; probe due: the next job that can run on it is sent as the probe"
        else:
            text += f"; probe in {probe:.0f} s"
    if k.get("secret_missing"):
        text += f"; no worker has its secret ({k.get('secret_missing')})"
    # what the operator can do besides waiting (an operator's trial found only the probe time)
    return text + f"; once its secret or account is fixed: `ratefleet keys enable {key_id}`"
