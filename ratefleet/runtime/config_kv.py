"""The fleet config in NATS KV: push, read, and follow revisions (schemas/config_store.py).

Bucket `ratefleet_config` (history 64: `config show --revision N` reaches the last 64
pushes), key `current`; the KV revision of a push is the config revision. A follower
(`ConfigFollower`) watches the key and also re-reads it every `poll_s` seconds, so a watch
lost to a reconnect delays a change by at most that long, never loses it.
"""

from __future__ import annotations

import contextlib
import socket
import time
import tomllib
import warnings
from collections.abc import Awaitable, Callable
from pathlib import Path

import anyio
import nats.errors
from nats.js import JetStreamContext
from nats.js.errors import BadRequestError, BucketNotFoundError, KeyNotFoundError, NotFoundError
from nats.js.kv import KeyValue

from ratefleet.runtime.logs import get_logger
from ratefleet.schemas import Config, Subjects
from ratefleet.schemas.config_store import CURRENT_KEY, StoredConfig, fleet_view, storable
from ratefleet.schemas.errors import ConfigError

log = get_logger("ratefleet.config")
HISTORY = 64  # the server's most per key


async def open_config_bucket(js: JetStreamContext, subjects: Subjects) -> KeyValue:
    """The config bucket, created (history 64, no expiry) when missing."""
    try:
        return await js.key_value(subjects.config_bucket)
    except (BucketNotFoundError, NotFoundError):
        try:
            return await js.create_key_value(bucket=subjects.config_bucket, history=HISTORY)
        except BadRequestError:  # created concurrently by another process
            return await js.key_value(subjects.config_bucket)


def read_toml(path: Path) -> dict:
    """The file's tables; ConfigError naming the file when it is missing or not TOML."""
    try:
        return tomllib.loads(path.read_text())
    except FileNotFoundError:
        raise ConfigError(f"{path}: no such config file") from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path}: not valid TOML: {exc}") from None


def document_for(path: Path) -> StoredConfig:
    """Validate `path` for a push (ConfigError with the file, the field and why; refused
    when it holds a literal secret)."""
    return storable(read_toml(path), source=str(path), pushed_at=time.time(), pushed_by=socket.gethostname())


async def push_config(js: JetStreamContext, subjects: Subjects, document: StoredConfig) -> tuple[int, bool]:
    """Store `document` as the current revision unless it equals it: (revision, changed).
    Raises UpstreamNoLongerImplicit (a ConfigError, nothing stored) for a document that would
    strand the jobs naming no upstream (`implicit_upstream_lost`)."""
    kv = await open_config_bucket(js, subjects)
    current = await read_config(js, subjects)
    if current is not None and current[1].sha256 == document.sha256:
        return current[0], False
    if current is not None and (problem := implicit_upstream_lost(current[1], document)) is not None:
        raise UpstreamNoLongerImplicit(problem)
    revision = await kv.put(CURRENT_KEY, document.model_dump_json().encode())
    return revision, True


async def read_config(js: JetStreamContext, subjects: Subjects,
                      revision: int | None = None) -> tuple[int, StoredConfig] | None:
    """(revision, document) of the current revision, or of `revision`; None when nothing
    was pushed (or that revision is not in the bucket's history). A missing bucket is not
    created: reading (`config show`, a role's start) leaves a server as it found it."""
    try:
        kv = await js.key_value(subjects.config_bucket)
    except (BucketNotFoundError, NotFoundError):
        return None
    try:
        entry = await kv.get(CURRENT_KEY, revision=revision)
    except (KeyNotFoundError, NotFoundError):
        return None
    if entry.value is None or entry.revision is None or entry.key != CURRENT_KEY:
        return None
    return entry.revision, StoredConfig.model_validate_json(entry.value)


async def startup_config(js: JetStreamContext, subjects: Subjects, local: Config) -> tuple[Config, int | None]:
    """The config a dispatcher or worker starts with: `local` with the live sections of the
    current stored revision (schemas/config_store.py `fleet_view`), and that revision; `local`
    and None when nothing was pushed, or when the stored revision is unreadable or invalid
    (logged; the follower reports it again)."""
    try:
        found = await read_config(js, subjects)
        if found is None:
            return local, None
        revision, document = found
        return fleet_view(local, document.validated(revision)), revision
    except (ConfigError, ValueError) as exc:
        log.error("stored config revision is invalid; starting with the local file", error=str(exc)[:500])
    except Exception as exc:  # noqa: BLE001 - NATS trouble: the follower catches up
        log.warning("stored config not read; starting with the local file", error=type(exc).__name__)
    return local, None


Apply = Callable[[int, Config], Awaitable[None]]


class ConfigFollower:
    """Follows the config bucket for one process: each new valid revision goes to `apply`
    (revision, the stored config validated), in order, once. An invalid document is logged
    and skipped (the running revision stays)."""

    def __init__(self, js: JetStreamContext, subjects: Subjects, apply: Apply, *, poll_s: float = 5.0,
                 role: str = "process", revision: int | None = None) -> None:
        """`revision`: the one the process started with (`startup_config`), not applied again."""
        self.js, self.subjects, self.apply, self.poll_s, self.role = js, subjects, apply, poll_s, role
        self.revision = revision  # the revision applied last
        self._seen = revision or 0  # the highest revision looked at (applied or refused)
        self._created: object = None  # when the bucket followed was created (its stream's `created`)

    async def run(self) -> None:
        """Follow until cancelled; NATS trouble is retried every second."""
        while True:
            try:
                await self._watch()
            except Exception as exc:  # noqa: BLE001 - NATS away or the bucket deleted: try again
                log.debug("config watch interrupted", role=self.role, error=type(exc).__name__)
                await anyio.sleep(1.0)

    async def _watch(self) -> None:
        kv = await open_config_bucket(self.js, self.subjects)
        if await self._bucket_is_new():  # made anew while this follower was away (a failed poll)
            self._forget_revisions()
        watcher = await kv.watch(CURRENT_KEY)
        try:
            while True:
                try:
                    entry = await watcher.updates(timeout=self.poll_s)
                except (nats.errors.TimeoutError, TimeoutError):
                    await self._poll(kv)
                    continue
                if entry is not None and entry.value:
                    await self._offer(entry.revision, entry.value)
        finally:
            with contextlib.suppress(Exception):
                await watcher.stop()

    async def _poll(self, kv: KeyValue) -> None:
        try:
            entry = await kv.get(CURRENT_KEY)
        except (KeyNotFoundError, NotFoundError):
            return
        if entry.value:
            await self._offer(entry.revision, entry.value)

    def _forget_revisions(self) -> None:
        log.warning("the config bucket was created anew (NATS lost its store); following its revisions from 1",
                    role=self.role, seen=self._seen)
        self._seen = 0

    async def _bucket_is_new(self) -> bool:
        """Whether the bucket was created anew since last asked (NATS lost its store and the
        fleet made it again): its revisions then start over at 1. False when it cannot tell."""
        try:
            created = (await self.js.stream_info(f"KV_{self.subjects.config_bucket}")).created
        except Exception:  # noqa: BLE001 - NATS away: cannot tell
            return False
        new = created is not None and self._created is not None and created != self._created
        self._created = created or self._created
        return new

    async def _offer(self, revision: int | None, value: bytes) -> None:
        if revision is None:
            return
        # not above the last seen: the same revision, or the first ones of a bucket made anew (NATS
        # lost its store; its revisions start over at 1), told apart by the bucket's creation time
        if revision <= self._seen and await self._bucket_is_new():
            self._forget_revisions()
        if revision <= self._seen:
            return
        self._seen = revision
        try:
            config = StoredConfig.model_validate_json(value).validated(revision)
        except (ConfigError, ValueError) as exc:
            log.error("stored config revision is invalid; the running one stays", role=self.role,
                      revision=revision, running=self.revision, error=str(exc)[:500])
            return
        try:
            await self.apply(revision, config)
        except Exception:  # noqa: BLE001 - e.g. NATS away while creating a new tier's consumer
            log.exception("config revision could not be applied; the running one stays, retried in "
                          f"{self.poll_s:g} s", role=self.role, revision=revision, running=self.revision)
            self._seen = self.revision or 0  # the next poll offers it again
            return
        self.revision = revision


class UpstreamNoLongerImplicit(ConfigError):
    """A push refused by `implicit_upstream_lost`."""


def implicit_upstream_lost(running: StoredConfig, document: StoredConfig) -> str | None:
    """Why `document` may not replace `running`, or None: the running revision sends the jobs (and
    pools) that name no upstream to its only one, U; `document` has several upstreams and says
    nothing of `default_upstream`, so every such job queued now, and every one its producers send,
    would end `invalid` / `unknown_upstream` without a call (a break-it trial: about 100 of 200
    queued jobs). `default_upstream = "U"` keeps them going to U; `default_upstream = ""` says on
    purpose that a job must name one."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            before, after = running.validated(), document.validated()
        except (ConfigError, ValueError):
            return None
    implicit = before.implicit_upstream()
    if implicit is None or len(after.upstreams) < 2 or "default_upstream" in document.config:
        return None
    keep = f'default_upstream = "{implicit}"' if implicit in after.upstreams else 'default_upstream = "<one of them>"'
    return (f"{document.source}: refused: the running config sends the jobs that name no upstream to {implicit!r}, its "
            f"only one; this one has {len(after.upstreams)} ({', '.join(sorted(after.upstreams))}) and no "
            f"default_upstream, so such jobs queued now, and every one producers send, would end invalid / "
            f"unknown_upstream without a call. Add `{keep}` at the top of the file to keep them going there, or "
            "`default_upstream = \"\"` if every job must name its upstream; the fleet keeps its running revision")
