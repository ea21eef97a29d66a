"""`ratefleet config watch FILE` (and `ratefleet up --config FILE`, which runs it as a child):
push the file at start and each time it changes (watchfiles), so an edit on this machine
reaches every dispatcher and worker of the fleet. A bad edit is reported (the file, the
field and why) and not pushed: the fleet keeps the running revision. A pushed edit with a
caller whose key cannot be resolved here is logged as a warning (pushed all the same).

The file's folder is watched, not the file: editors save by writing a new file and
renaming it over the old one.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import anyio
import watchfiles

from ratefleet.gateway.callers import unusable_callers
from ratefleet.runtime.config_kv import UpstreamNoLongerImplicit, document_for, push_config
from ratefleet.runtime.connect import connect, redact_url
from ratefleet.runtime.logs import get_logger
from ratefleet.schemas import Subjects
from ratefleet.schemas.config_store import LiteralSecretRefused, StoredConfig
from ratefleet.schemas.errors import ConfigError

log = get_logger("ratefleet.config")
RETRY_S = 2.0  # NATS away: the push is tried again this often until it goes through


async def push_file(js, subjects: Subjects, path: Path) -> int | None:
    """Validate and push `path` once: the revision, or None when the file is refused (logged)."""
    try:
        document = document_for(path)
    except LiteralSecretRefused as exc:  # a valid file for local use: each process runs it as read at start
        log.warning("config file not pushed: it holds a literal secret, and a pushed config (live for every "
                    "process) carries secret references only; each process runs this file as it read it at "
                    "start, and edits apply on a restart (use env:NAME or file:PATH to have them applied live)",
                    file=str(path), error=str(exc))
        return None
    except ConfigError as exc:
        log.error("config file not pushed: it has errors; the fleet keeps its running revision",
                  file=str(path), error=str(exc))
        return None
    try:
        revision, changed = await push_config(js, subjects, document)
    except UpstreamNoLongerImplicit as exc:
        log.error("config file not pushed: it would strand the jobs that name no upstream; the fleet keeps its "
                  "running revision", file=str(path), error=str(exc))
        return None
    if changed:
        log.info("config pushed", file=str(path), revision=revision)
    else:
        log.info("config unchanged", file=str(path), revision=revision)
    _warn_unusable_callers(document, path)
    return revision


def _warn_unusable_callers(document: StoredConfig, path: Path) -> None:
    """A caller whose key cannot be resolved here is only a warning: the gateway may run on
    another machine. Callers are not live: a gateway here leaves it out when next started."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            config = document.validated()
    except ConfigError:  # validated once already by document_for; the push stands either way
        return
    for name, reason in unusable_callers(config).items():
        log.warning("caller key not usable on this machine: a gateway started here leaves the caller out "
                    "(its requests get 401)", file=str(path), caller=name, reason=reason)


async def _push_until_done(js, subjects: Subjects, path: Path) -> None:
    while True:
        try:
            await push_file(js, subjects, path)
            return
        except Exception as exc:  # noqa: BLE001 - NATS away: try again
            log.warning("config push failed; retrying", file=str(path), error=type(exc).__name__)
            await anyio.sleep(RETRY_S)


async def watch_and_push(path: Path, url: str, prefix: str, stop: anyio.Event | None = None, auth=None) -> None:
    """Push `path` now and after every change of it, until `stop` is set (or forever)."""
    path = path.resolve()
    nc = await connect(url, name="ratefleet-config-watch", auth=auth)
    js, subjects = nc.jetstream(), Subjects(prefix)
    log.info("watching config file", file=str(path), nats=redact_url(url))
    try:
        await _push_until_done(js, subjects, path)
        async for _changes in watchfiles.awatch(path.parent, stop_event=stop,
                                                watch_filter=lambda _change, name: Path(name) == path):
            if path.exists():
                await _push_until_done(js, subjects, path)
    finally:
        with anyio.CancelScope(shield=True):
            await nc.close()
