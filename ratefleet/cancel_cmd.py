"""`ratefleet cancel --batch B`: stop paying for a batch. Its jobs still queued end `failed` /
`cancelled` without a call, each with its one Result (so `submit --wait` and `results --wait`
end as usual, with the count), those the leader holds in its window included; jobs already
handed to a worker finish. The mechanism is a marker every dispatcher follows (ratefleet/runtime/cancels.py).

Exit codes: 0 cancelled (or already), 1 NATS unreachable, 2 usage or an unknown batch.
"""

from __future__ import annotations

import getpass
import shlex
import socket
import time
from pathlib import Path

import typer

from ratefleet.batches import load_record
from ratefleet.cli_support import batch_value, client_target, connection_args, fail, run_async
from ratefleet.client import Client
from ratefleet.runtime.cancels import is_cancelled, mark_cancelled
from ratefleet.runtime.connect import redact_url
from ratefleet.schemas.subjects import NO_BATCH, is_token
from ratefleet.submit_report import count_results

ConfigOpt = typer.Option(None, "--config", "-c", help="TOML config (else $RATEFLEET_CONFIG, else ./ratefleet.toml)")
NatsOpt = typer.Option(None, "--nats", envvar="RATEFLEET_NATS_URL",
                       help="NATS URL, over the config's [nats].url (default nats://127.0.0.1:4222)")
PrefixOpt = typer.Option(None, "--prefix", help="subject prefix, over the config's [nats].prefix (default ratefleet)")


def cancel(batch: str = typer.Option(..., "--batch", "-b", metavar="NAME", callback=batch_value,
                                   help="the batch name `submit` printed first"),
           force: bool = typer.Option(False, "--force",
                                      help="cancel a batch this fleet has no record or Result of (jobs the Python "
                                           "client sent with batch=NAME)"),
           config: Path | None = ConfigOpt, nats: str | None = NatsOpt, prefix: str | None = PrefixOpt):
    """Cancel a batch: its queued jobs end `cancelled` without a call; those under way finish."""
    if not is_token(batch) or batch == NO_BATCH:
        fail(f"--batch {batch!r} must be a batch name (1-128 of A-Z a-z 0-9 _ -)")
    target = client_target(config, nats, prefix)
    lines = run_async(_cancel, batch, force, target.url, target.prefix, target.nats, target.config_args)
    for line in lines[1:]:
        typer.echo(line)
    if lines[0]:
        fail(lines[0])


async def _cancel(batch: str, force: bool, url: str, prefix: str, auth, config_args: tuple[str, ...] = ()) -> list[str]:
    """(an error or "", then the lines to print)."""
    async with await Client.connect(url, prefix=prefix, auth=auth, reconnect_forever=False) as client:
        js, subjects = client.js, client.subjects
        record = await load_record(js, subjects, batch)
        stored = await count_results(client, batch)
        if record is None and stored == 0 and not force:
            where = redact_url(url) + ("" if prefix == "ratefleet" else f" (prefix {prefix})")
            return [f"no batch {batch} is known at {where}: no record of its submit and no Result; check the name "
                    "(`ratefleet submit` printed it first); jobs the Python client sent with this batch have no "
                    "record: pass --force to cancel them"]
        if await is_cancelled(js, subjects, batch):
            return ["", f"batch {batch} was already cancelled; {stored:,} Results stored"
                    + (f" of {record.jobs:,}" if record else "")]
        await mark_cancelled(js, subjects, batch, by=_who())
        absent = await client.no_dispatcher()
    total = f" of {record.jobs:,}" if record and record.state != "submitting" else ""
    out = ["", f"batch {batch} cancelled: its jobs still queued end `failed` / `cancelled` without a call; those "
               "already handed to a worker finish. "
               f"{stored:,} Results stored so far{total}"]
    if absent:
        out.append("no dispatcher is running: the fleet ends the queued jobs when one starts")
    if record is not None and record.state == "submitting" and not record.stale(time.time()):
        out.append(f"a `ratefleet submit` is still sending batch {batch}: what it sends now is cancelled too; stop it "
                   "with Ctrl-C")
    args = ["ratefleet", "results", "--batch", batch, "--wait", *connection_args(url, prefix, config_args)]
    out.append(f"see how each job ended with: {shlex.join(args)}; a cancelled batch stays cancelled (submit again "
               "under another --batch name)")
    return out


def _who() -> str:
    """user@host, for the marker (who cancelled)."""
    try:
        return f"{getpass.getuser()}@{socket.gethostname()}"
    except Exception:  # noqa: BLE001 - no user name in this environment
        return socket.gethostname()


def register(app: typer.Typer) -> None:
    """Add `cancel` to the `ratefleet` command line."""
    app.command("cancel")(cancel)
