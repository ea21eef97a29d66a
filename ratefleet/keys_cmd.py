"""`ratefleet keys disable KEY [--reason R]`, `ratefleet keys enable KEY` and
`ratefleet keys rotate KEY --secret env:NEW [--at TIME]` (a config file edit, see keys_rotate.py).

The command asks the leader dispatcher over core NATS request/reply on
`<prefix>.admin.keys` (see dispatcher/shell/keycontrol.py). The leader applies it at once,
persists it in the KV bucket `ratefleet_keys` (so it survives a failover) and answers with
the key's state. An operator-disabled key is never probed; it stays out until enabled.
Exit codes: 0 done, 1 the leader refused (unknown key) or nobody answered, 2 bad usage or input
(`keys rotate` of a key id the config file does not have).
"""

from __future__ import annotations

import json
import time
import warnings
from datetime import UTC, datetime, timedelta
from pathlib import Path

import anyio
import typer
from nats.errors import NoRespondersError

from ratefleet.cli_support import EXIT_FAILED, EXIT_USAGE, LOOKED_AT, client_target, fail
from ratefleet.key_watch import pools_left_without_keys
from ratefleet.keys_rotate import RotateError, rotate_file
from ratefleet.runtime.connect import connect, refused
from ratefleet.schemas import Subjects
from ratefleet.schemas.config import config_path, load_config
from ratefleet.schemas.config_nats import NatsAuthConfig
from ratefleet.schemas.errors import NatsUnavailable

keys_app = typer.Typer(no_args_is_help=True, help="Take keys out of rotation or put them back (operator).")

ConfigOpt = typer.Option(None, "--config", "-c", help="TOML config for the NATS URL and prefix")
NatsOpt = typer.Option(None, "--nats", envvar="RATEFLEET_NATS_URL", help="NATS URL (default nats://127.0.0.1:4222)")
PrefixOpt = typer.Option(None, "--prefix", help="subject prefix (default from the config, else ratefleet)")
NO_LEADER_RETRY_S = 0.25  # while no leader listens, the command is sent again this often (seconds)
TimeoutOpt = typer.Option(5.0, "--timeout", help="seconds to wait for the leader's answer")


async def send_key_command(url: str, prefix: str, request: dict, timeout: float,
                           auth: NatsAuthConfig | None = None) -> dict:
    """Send one command to the leader; returns its JSON answer. NatsUnavailable when NATS
    cannot be reached, TimeoutError when no leader answers within `timeout` seconds.

    While no leader listens (NATS answers "no responders" at once: none runs, or a failover is
    under way) the command is sent again every NO_LEADER_RETRY_S until `timeout`: nothing
    received it, so nothing is done twice. An operator's trial: `keys disable` right after the
    leader's SIGKILL said no dispatcher was running while the standby took over 3 s later."""
    nc = await connect(url, name="ratefleet-keys", forever=False, auth=auth)
    subject = Subjects(prefix).admin_keys
    deadline = time.monotonic() + timeout
    try:
        while True:
            try:
                reply = await nc.request(subject, json.dumps(request).encode(),
                                         timeout=max(0.1, deadline - time.monotonic()))
                return json.loads(reply.data)
            except NoRespondersError:
                if refused(subject) or time.monotonic() + NO_LEADER_RETRY_S >= deadline:
                    raise
                await anyio.sleep(NO_LEADER_RETRY_S)
    except Exception as exc:  # noqa: BLE001 - nats: no responders / timeout
        if refused(subject):  # the CLI names the refusal first; no dispatcher is to blame
            raise TimeoutError(f"this user may not send {subject}") from None
        raise TimeoutError(f"no leader dispatcher answered {subject} within {timeout:g}s ({type(exc).__name__}): "
                           "is `ratefleet up` or `ratefleet dispatcher` running? A failover takes up to "
                           "dispatcher.lease_ttl_s and a moment: try again, or give a longer --timeout") from None
    finally:
        await nc.close()


async def earlier_reason(url: str, prefix: str, key: str, timeout: float,
                         auth: NatsAuthConfig | None = None) -> str | None:
    """The reason `key` is operator-disabled with now (from the leader's status), else None."""
    nc = await connect(url, name="ratefleet-keys", forever=False, auth=auth)
    try:
        reply = await nc.request(Subjects(prefix).admin_status, b"", timeout=timeout)
        state = (json.loads(reply.data).get("keys") or {}).get(key) or {}
    except Exception:  # noqa: BLE001 - no answer: the leader's default reason is used
        return None
    finally:
        await nc.close()
    return state.get("disabled_reason") if state.get("disabled_by") == "operator" else None


async def leader_keys(url: str, prefix: str, timeout: float, auth: NatsAuthConfig | None = None) -> dict:
    """The leader's view of every key (its status answer), {} when it cannot be read."""
    nc = await connect(url, name="ratefleet-keys", forever=False, auth=auth)
    try:
        reply = await nc.request(Subjects(prefix).admin_status, b"", timeout=timeout)
        return json.loads(reply.data).get("keys") or {}
    except Exception:  # noqa: BLE001 - only for a warning
        return {}
    finally:
        await nc.close()


def _run(request: dict, config, nats, prefix, timeout: float) -> None:
    target = client_target(config, nats, prefix)
    try:
        if request["action"] == "disable" and not request.get("reason"):  # disabling again keeps the reason
            request["reason"] = (anyio.run(earlier_reason, target.url, target.prefix, request["key"], timeout, target.nats)
                                 or "disabled by an operator")
        answer = anyio.run(send_key_command, target.url, target.prefix, request, timeout, target.nats)
    except (NatsUnavailable, TimeoutError) as exc:
        fail(str(exc), EXIT_FAILED)
    if not answer.get("ok"):
        fail(str(answer.get("error")), EXIT_FAILED)
    state = answer.get("state") or {}
    key = answer.get("key")
    if request["action"] == "enable" and state.get("state") != "enabled":
        why = (f"no worker has its secret ({state.get('secret_missing')})" if state.get("disabled_by") == "secret"
               else f"it is disabled ({state.get('disabled_reason')})")
        fail(f"key {key} stays out of rotation: {why}; give the workers its secret (see `ratefleet status`); it "
             "comes back by itself once a worker reports it", EXIT_FAILED)
    what = "enabled" if state.get("state") == "enabled" else f"disabled ({state.get('disabled_reason')})"
    note = "" if answer.get("changed") else " (no change)"
    saved = "" if answer.get("persisted", True) else "; NOT persisted (KV unavailable): a new leader will not know"
    typer.echo(f"key {key}: {what}{note}{saved}")
    if request["action"] == "disable":
        empty = pools_left_without_keys(anyio.run(leader_keys, target.url, target.prefix, timeout, target.nats))
        if empty:
            typer.echo(f"warning: pool(s) {', '.join(empty)} now have no key in rotation: jobs of a tier with no other "
                       "pool end `failed` / `no_key_available` without a call, the queued ones included, until a key "
                       "is back (`ratefleet keys enable KEY`)", err=True)


@keys_app.command("disable")
def disable(key: str = typer.Argument(..., help="key id from the config"),
            reason: str | None = typer.Option(None, "--reason", "-r",
                                          help="shown in `ratefleet status` (default: the earlier reason when disabled again)"),
            config: Path | None = ConfigOpt, nats: str | None = NatsOpt, prefix: str | None = PrefixOpt,
            timeout: float = TimeoutOpt):
    """Take KEY out of rotation until `ratefleet keys enable KEY` (never probed automatically)."""
    _run({"action": "disable", "key": key, "reason": reason}, config, nats, prefix, timeout)


@keys_app.command("enable")
def enable(key: str = typer.Argument(..., help="key id from the config"),
           config: Path | None = ConfigOpt, nats: str | None = NatsOpt, prefix: str | None = PrefixOpt,
           timeout: float = TimeoutOpt):
    """Put KEY back in rotation (whoever disabled it: provider evidence or an operator)."""
    _run({"action": "enable", "key": key}, config, nats, prefix, timeout)


def parse_at(text: str | None, now: datetime) -> datetime:
    """--at as an aware datetime (RFC 3339, e.g. 2026-12-01T00:00:00Z), `now` when absent;
    exits 2 naming the expected form otherwise, or when it is more than a minute in the past."""
    if text is None:
        return now.replace(microsecond=0)
    try:
        at = datetime.fromisoformat(text)
    except ValueError:
        fail(f"--at {text!r} is not an RFC 3339 time; e.g. 2026-12-01T00:00:00Z")
    if at.utcoffset() is None:
        fail(f"--at {text!r} needs a UTC offset (RFC 3339), e.g. 2026-12-01T00:00:00Z")
    if at < now - timedelta(seconds=60):  # the switch would be at once, and the printed revoke time long gone
        fail(f"--at {text!r} is in the past (now {now.replace(microsecond=0).isoformat()}); leave --at out to switch "
             "now, or give a later time")
    return at


@keys_app.command("rotate")
def rotate(key: str = typer.Argument(..., help="key id from the config"),
           secret: str = typer.Option(..., "--secret", "-s", help="the new secret's reference: env:NAME or file:PATH"),
           at: str | None = typer.Option(None, "--at", help="switch time, RFC 3339 (default: now)"),
           config: Path | None = typer.Option(None, "--config", "-c", help="TOML config file to edit in place"),
           force: bool = typer.Option(False, "--force", help="switch now even if --secret cannot be used on this "
                                                          "machine (the workers run elsewhere and have it)")):
    """Add a new version of KEY with the secret --secret, used for new calls from --at on; the
    version in use until then turns draining at --at (calls in flight finish). Edits the file.
    With the switch now (no --at) and a --secret this machine cannot use, refused (exit 2,
    nothing written) unless --force: an operations trial rotated to an unset variable under
    `ratefleet up`, whose file watch pushed it at once, and 263 of 300 queued jobs ended
    failed / no_key_available within 4 s (no worker had the new version)."""
    from ratefleet.workers.secrets import secret_problem

    found = config_path(config)
    if found is None:
        fail(f"no config file to edit (looked at {LOOKED_AT})")
    when = parse_at(at, datetime.now(UTC))
    problem = secret_problem(secret)

    def refuse_unusable_now() -> None:  # (after the file and the arguments are checked: those errors first)
        if problem is not None and at is None and not force:
            fail(f"{secret} cannot be used on this machine ({problem}), and the switch is now: a worker without it "
                 f"stops using key {key} at once, and queued jobs that no other usable key can take end failed / "
                 f"no_key_available. Nothing was written to {found}. Set it on every worker first, or rotate with "
                 "--at a later time to leave room for that, or pass --force if the workers run elsewhere and have it")

    try:
        version = rotate_file(found, key, secret, when, before_write=refuse_unusable_now)
    except RotateError as exc:
        fail(str(exc), EXIT_USAGE)  # the file's content or the arguments: an input error, as an unknown tier
    timeout = _upstream_timeout(found, key)
    typer.echo(f"key {key}: version {version} ({secret}) takes new calls from {when.isoformat()}; "
               f"the earlier version turns draining then. Written to {found}.")
    typer.echo(f"  1. every worker needs {secret} before that time (workers re-read file: secrets by themselves)")
    if problem is not None:
        soon = " The switch is now (no --at, --force):" if at is None else ""
        typer.echo(f"warning: {secret} cannot be used on this machine ({problem}).{soon} a worker that runs this "
                   f"config without it stops using key {key} at the switch (the leader then sends that key's jobs to "
                   "workers that have it, or none runs them); set it on every worker first"
                   + (", or rotate with --at a later time to leave room for that" if at is None else ""), err=True)
    typer.echo("  2. workers use the switch once they run this config (restart them, or push the config)")
    typer.echo(f"  3. revoke the old secret at the provider only after {(when + timedelta(seconds=timeout)).isoformat()}"
               f" (the switch + the upstream's timeout_s = {timeout:g} s, for calls picked just before it)")


def _upstream_timeout(path: Path, key: str) -> float:
    """The timeout_s of the upstream of `key`'s pool in the config at `path` (60 s default)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # a literal secret elsewhere in the file is not this command's business
        loaded = load_config(path)
    for pool_name, pool in loaded.pools.items():
        if any(k.id == key for k in pool.keys):
            upstream = loaded.pool_upstream(pool_name)
            return loaded.upstreams[upstream].timeout_s if upstream else 60.0
    return 60.0
