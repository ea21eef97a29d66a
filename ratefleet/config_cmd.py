"""`ratefleet config check|push|show`: the fleet config, validated, stored and read back.

* `check [FILE]`: validate FILE (default: $RATEFLEET_CONFIG, else ./ratefleet.toml); exit 0 (with a
  summary), or exit 2 with the file, the field and why. A caller whose key cannot be resolved on
  this machine is a warning, not an error: the gateway may run elsewhere.
* `push FILE [--nats URL] [--config C]`: validate, refuse literal secrets, store a new revision in the KV
  bucket `ratefleet_config` (key `current`) that every dispatcher and worker follows; a file
  that fails changes nothing (exit 2). Pushing the content of the current revision again
  makes no new revision. Then, for up to `--wait-s` (10 s), it says whether the leader and
  every worker run the revision, and which keys no worker can call with (config_applied.py).
* `show [--revision N] [--json]`: the stored config as TOML (secret references only).
* `watch FILE [--nats URL] [--config C]`: push FILE now and whenever it changes (`ratefleet up --config
  FILE` runs it); a bad edit is reported and not pushed (config_watch.py).

Exit codes: 0 done, 1 NATS unreachable or nothing stored, 2 bad file or usage.
"""

from __future__ import annotations

import json
import warnings
from datetime import UTC, datetime
from pathlib import Path

import tomli_w
import typer

from ratefleet.cli_support import EXIT_FAILED, client_target, fail, require_file
from ratefleet.config_applied import describe, fleet_applied
from ratefleet.gateway.callers import unusable_callers
from ratefleet.runtime.config_kv import HISTORY, document_for, push_config, read_config, read_toml
from ratefleet.runtime.connect import connect
from ratefleet.runtime.streams import tier_consumer
from ratefleet.schemas import Subjects
from ratefleet.schemas.config import Config, config_path, parse_config
from ratefleet.schemas.config_store import LIVE_DISPATCHER_FIELDS, LIVE_SECTIONS, LIVE_SETTINGS, LOCAL_SECTIONS, literal_secrets
from ratefleet.schemas.errors import ConfigError, NatsUnavailable
from ratefleet.schemas.key_versions import current_version, version_state

config_app = typer.Typer(no_args_is_help=True, help="Check, push and show the fleet config (live reload).")

FileArg = typer.Argument(..., help="TOML config file")
NatsOpt = typer.Option(None, "--nats", envvar="RATEFLEET_NATS_URL", help="NATS URL (default nats://127.0.0.1:4222)")
ConfigOpt = typer.Option(None, "--config", "-c", help="TOML config for the NATS URL and prefix")
ConnectOpt = typer.Option(None, "--config", "-c", help="TOML config whose [nats] (URL, prefix, user) to connect "
                          "with, e.g. the operator's (default: FILE's own [nats])")
PrefixOpt = typer.Option(None, "--prefix", help="subject prefix (default from the config, else ratefleet)")


@config_app.command("check")
def check(file: Path | None = typer.Argument(None, help="TOML config file (default: $RATEFLEET_CONFIG, "
                                                      "else ./ratefleet.toml)")) -> None:
    """Validate FILE: exit 0, or exit 2 naming the file, the field and why."""
    file = config_path(file)
    if file is None:
        fail(f"no config file to check (looked at FILE, $RATEFLEET_CONFIG, ./ratefleet.toml in {Path.cwd()})")
    require_file(file, "config file")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            config = parse_config(read_toml(file), source=str(file))
    except ConfigError as exc:
        fail(str(exc))
    keys = config.keys()
    typer.echo(f"{file}: valid ({len(config.upstreams)} upstream(s), {len(config.pools)} pool(s), {len(keys)} key(s), "
               f"tiers {', '.join(config.tiers)})")
    if not keys:
        typer.echo("warning: no API keys: fine for a producer's or an operator's config (submit, status, ...), but "
                   "`ratefleet up` / `dispatcher` / `worker` refuse it and `config push` refuses to push it; a fleet "
                   "config needs [pools.NAME] with keys = [...]", err=True)
    for where in literal_secrets(config):
        typer.echo(f"note: literal secret at {where}: `config push` refuses it (use env:NAME or file:PATH)")
    for name in config.nats.literal_secrets():  # (never pushed; each process that reads the file warns of it)
        typer.echo(f"note: literal secret at nats.{name}: every process reading this file warns of it; use "
                   "env:NAME or file:PATH outside local tests")
    now = datetime.now(UTC)
    for key_id, key in keys.items():
        if current_version(key.secret_versions(), now) is None:
            states = ", ".join(f"{v.id} {version_state(v, now)}" for v in key.secret_versions())
            typer.echo(f"warning: key {key_id} has no active version now ({states}): it stays out of rotation until "
                       "one is active", err=True)
    for name, reason in unusable_callers(config).items():
        typer.echo(f"warning: callers.{name}.key: {reason} on this machine: a gateway started here leaves caller "
                   f"{name!r} out (its requests get 401)", err=True)
    for line in fleet_notes(config, read_toml(file)):
        typer.echo(line, err=line.startswith("warning"))
    if len(config.upstreams) > 1:
        for name, caller in config.callers.items():
            if not caller.upstreams:
                typer.echo(f"note: callers.{name} names no upstreams while {len(config.upstreams)} are configured: "
                           "each of its requests must say which in the x-ratefleet-upstream header (else 400 "
                           f"upstream_required); set callers.{name}.upstreams (the first is its default)")
    for name, caller in config.callers.items():
        unserved = config.unserved(config.batch_tier(name), name)
        if unserved:
            typer.echo(f"warning: callers.{name}'s Batch API batches run on tier {config.batch_tier(name)!r}, which has "
                       f"no pool for {', '.join(unserved)}: their lines would end no_key_available; set "
                       f"callers.{name}.batch_tier to a tier whose pools call it", err=True)
        if config.batch_tier(name) == caller.tier:
            typer.echo(f"note: callers.{name}'s Batch API batches run on its own tier ({caller.tier}): its online "
                       "requests queue behind a batch's lines until the batch ends; set callers."
                       f"{name}.batch_tier to a lower tier (or add one below {caller.tier!r})")


def fleet_notes(config: Config, data: dict) -> list[str]:
    """What `config check` and `config push` say about a valid config beyond "valid", from an
    operator's trial: two keys that are one provider key (the same secret reference: its limit
    is spent twice over, 13 x 429 in 400 jobs); jobs naming no upstream once several are
    configured (each is refused `unknown_upstream`: a push that adds a second upstream breaks
    every producer that names none); and the settings of the file that a push does not apply
    live (each process takes them from its own file or environment when it starts: `push`
    said "applied" while two workers kept their 8 slots, even after a restart)."""
    lines = []
    owners: dict[str, list[str]] = {}
    for key_id, key in config.keys().items():
        for version in key.secret_versions():
            owners.setdefault(version.secret_ref, []).append(key_id)
    for ref, key_ids in owners.items():
        if len(set(key_ids)) > 1:
            where = ref if ref.startswith(("env:", "file:")) else "the same literal"
            lines.append(f"warning: keys {', '.join(sorted(set(key_ids)))} have the same secret ({where}): one provider "
                         "key sent at the sum of their limits draws 429s; give each key its own secret")
    if len(config.upstreams) > 1 and not config.default_upstream:
        lines.append(f"note: {len(config.upstreams)} upstreams and none is the default: a job that names no `upstream` "
                     "is refused (invalid, unknown_upstream); producers must name one (`--upstream` for submit), or "
                     f"set `default_upstream = \"{next(iter(config.upstreams))}\"` at the top of the file")
    not_live = [f"[{section}]" for section in data
                if section not in (*LIVE_SECTIONS, *LIVE_SETTINGS, "dispatcher", *LOCAL_SECTIONS)]
    dispatcher = data.get("dispatcher")
    if isinstance(dispatcher, dict):
        not_live += [f"dispatcher.{name}" for name in dispatcher if name not in LIVE_DISPATCHER_FIELDS]
    if not_live:
        lines.append(f"note: {', '.join(not_live)} {'is' if len(not_live) == 1 else 'are'} not applied live: each "
                     "process takes these from its own file or environment when it starts (live: [upstreams], "
                     "[pools], [tiers], dispatcher.policy / priority_reserve / priority_slots)")
    return lines


@config_app.command("push")
def push(file: Path = FileArg, nats: str | None = NatsOpt, prefix: str | None = PrefixOpt,
         config: Path | None = ConnectOpt,
         wait_s: float = typer.Option(10.0, "--wait-s", min=0, help="seconds to wait for the fleet to run it "
                                      "(0: store it and return)")) -> None:
    """Validate FILE and store it as the fleet's next config revision (applied live); then say
    whether the leader and the workers run it, and which keys no worker can call with."""
    require_file(file, "config file")
    try:
        with warnings.catch_warnings():  # a literal secret is refused below, in one line, not also warned of
            warnings.simplefilter("ignore")
            document = document_for(file)
    except ConfigError as exc:
        fail(str(exc))
    target = client_target(config or file, nats, prefix)
    with warnings.catch_warnings():  # validated once above: said then
        warnings.simplefilter("ignore")
        settle_s = 2 * document.validated().workers.heartbeat_s
    try:
        revision, changed, seen = _run(_push, target.url, target.prefix, document, target.nats, wait_s, settle_s)
    except NatsUnavailable as exc:
        fail(str(exc), EXIT_FAILED)
    except ConfigError as exc:  # refused against the running revision (runtime/config_kv.py push_config)
        fail(str(exc))
    if changed:
        typer.echo(f"pushed {file} as config revision {revision}"
                   + ("; dispatchers and workers apply it now" if seen is None else ""))
    else:
        typer.echo(f"unchanged: config revision {revision} already holds this config")
    for line in describe(seen, wait_s) if seen is not None else []:
        typer.echo(line)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for line in fleet_notes(document.validated(), read_toml(file)):
            typer.echo(line, err=line.startswith("warning"))


@config_app.command("show")
def show(revision: int | None = typer.Option(None, "--revision", min=1, help="an earlier revision (default: current)"),
         as_json: bool = typer.Option(False, "--json", help="the stored document as JSON"),
         config: Path | None = ConfigOpt, nats: str | None = NatsOpt, prefix: str | None = PrefixOpt) -> None:
    """Print the stored fleet config (secret references only)."""
    target = client_target(config, nats, prefix)
    try:
        found = _run(_read, target.url, target.prefix, revision, target.nats)
    except NatsUnavailable as exc:
        fail(str(exc), EXIT_FAILED)
    if found is None:
        if revision:  # pushing a file would not bring an old revision back
            fail(f"revision {revision} is not in the config bucket (it keeps the last {HISTORY} revisions); "
                 "`ratefleet config show` prints the current one, with its number", EXIT_FAILED)
        fail("no config was pushed yet (`ratefleet config push FILE` stores one)", EXIT_FAILED)
    number, document = found
    if as_json:
        typer.echo(json.dumps({"revision": number, **document.model_dump(mode="json")}, indent=2))
        return
    when = datetime.fromtimestamp(document.pushed_at, UTC).isoformat(timespec="seconds")
    typer.echo(f"# config revision {number}, pushed {when} from {document.source}"
               f"{' on ' + document.pushed_by if document.pushed_by else ''}; sha256 {document.sha256[:16]}")
    typer.echo(tomli_w.dumps(document.config), nl=False)


@config_app.command("watch")
def watch(file: Path = FileArg, nats: str | None = NatsOpt, prefix: str | None = PrefixOpt,
          config: Path | None = ConnectOpt) -> None:
    """Push FILE now and each time it changes; a bad edit is reported and not pushed."""
    from ratefleet.config_watch import watch_and_push
    from ratefleet.roles import log_and_ignore_sighup
    from ratefleet.runtime.logs import configure_logging

    log_and_ignore_sighup()
    require_file(file, "config file")
    configure_logging()
    target = client_target(config or file, nats, prefix)
    try:
        _run(watch_and_push, file, target.url, target.prefix, None, target.nats)
    except KeyboardInterrupt:
        raise typer.Exit(0) from None


def _run(fn, *args):
    import anyio

    return anyio.run(fn, *args)


async def _push(url: str, prefix: str, document, auth=None, wait_s: float = 0.0, settle_s: float = 2.0):
    """(revision, changed, what the fleet runs after at most `wait_s` seconds; None when 0).
    `settle_s`: how long to let the workers report their secrets once they run it; skipped
    when no key's secret reference changed."""
    nc = await connect(url, name="ratefleet-config", forever=False, auth=auth)
    try:
        subjects = Subjects(prefix)
        before = await read_config(nc.jetstream(), subjects)
        if before is not None and _secret_refs(before[1]) == _secret_refs(document):
            settle_s = 0.0  # no key's secret to learn about: done once the fleet runs it
        stranded = await _queued_in_removed_tiers(nc.jetstream(), subjects, before, document)
        revision, changed = await push_config(nc.jetstream(), subjects, document)
        for tier, queued in stranded.items():
            typer.echo(f"warning: tier {tier!r} is not in this revision and {queued:,} of its jobs are queued: nothing "
                       f"runs them until [tiers.{tier}] is pushed again (they wait in {subjects.jobs_stream})", err=True)
        gone = _removed_upstreams(before, document)
        if gone:
            typer.echo(f"warning: upstream(s) {', '.join(gone)} are not in this revision: queued jobs naming them end "
                       "`invalid` / `unknown_upstream` without a call when the leader reaches them; once the upstream "
                       "is pushed again, `ratefleet dlq replay --code unknown_upstream` sends them again", err=True)
        seen = await fleet_applied(nc, subjects, revision, wait_s, settle_s) if wait_s > 0 else None
        return revision, changed, seen
    finally:
        await nc.close()


async def _queued_in_removed_tiers(js, subjects: Subjects, before, document) -> dict[str, int]:
    """Tier -> jobs queued in it (its consumer's pending count), for the tiers of the running
    revision (`before`: (revision, document), None when nothing was pushed) that `document`
    leaves out. An operator's trial: a push dropping a tier with 2,360 queued jobs printed only
    "applied" (status and submit said so later). Best effort: {} when NATS cannot say."""
    if before is None:
        return {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            removed = set(before[1].validated().tiers) - set(document.validated().tiers)
        except (ConfigError, ValueError):
            return {}
    found = {}
    for tier in sorted(removed):
        try:
            info = await js.consumer_info(subjects.jobs_stream, tier_consumer(tier))
        except Exception:  # noqa: BLE001 - no consumer (never used) or NATS busy: nothing to say
            continue
        if info.num_pending:
            found[tier] = info.num_pending
    return found


def _removed_upstreams(before, document) -> list[str]:
    """The upstreams of the running revision (`before`: (revision, document), or None) that
    `document` leaves out, sorted; [] when either cannot be read."""
    if before is None:
        return []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            return sorted(set(before[1].validated().upstreams) - set(document.validated().upstreams))
        except (ConfigError, ValueError):
            return []


def _secret_refs(document) -> dict:
    """Each key's id -> its secret reference and versions (what decides whether a worker can
    call with it), from a stored document's raw config; limits left out."""
    keys = (key for pool in (document.config.get("pools") or {}).values() for key in pool.get("keys") or [])
    return {key.get("id"): (key.get("secret"), key.get("versions")) for key in keys if isinstance(key, dict)}


async def _read(url: str, prefix: str, revision: int | None, auth=None):
    nc = await connect(url, name="ratefleet-config", forever=False, auth=auth)
    try:
        return await read_config(nc.jetstream(), Subjects(prefix), revision)
    finally:
        await nc.close()
