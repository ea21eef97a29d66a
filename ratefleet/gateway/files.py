"""Files of the OpenAI Files API (`/v1/files`), kept in the NATS Object Store.

Bucket `ratefleet_files` (suffixed like the streams for another prefix), objects kept as
long as Results (`streams.results_max_age_s`). One object per file, named by its id
(`file-<24 hex>`); its description holds the OpenAI File object plus its owner, as JSON:

    {"id": "file-...", "object": "file", "bytes": 1234, "created_at": 1764400000,
     "expires_at": 1764486400, "filename": "batchinput.jsonl", "purpose": "batch" | "batch_output",
     "status": "processed", "owner": "<caller name>"}

`expires_at` is when the bucket drops it (`created_at` + the bucket's max age, seconds). The
id carries the creation time in nanoseconds, which orders files made within one second.

(OpenAI API reference, "Files" -> "The file object"). A caller sees only its own files: any
other id is "not found", as OpenAI answers for another organisation's file.
"""

from __future__ import annotations

import json
import time
import uuid
from typing import Any, BinaryIO

import anyio
from nats.js import JetStreamContext
from nats.js.api import ObjectMeta
from nats.js.errors import BadObjectMetaError, NotFoundError, ObjectDeletedError, ObjectNotFoundError

from ratefleet.runtime.streams import Remake, open_object_store, stream_gone
from ratefleet.schemas import Subjects

OWNER = "owner"


def files_bucket(subjects: Subjects) -> str:
    """The Object Store bucket of gateway files for this prefix."""
    return "ratefleet_files" + subjects.stream_suffix.lower()


def new_file_id(now_ns: int | None = None) -> str:
    """`file-` + 24 hex digits: the creation time (ns since the epoch, 16 digits) and 8 random
    ones, so an id says where it stood in the list even once its file is gone (`cursor_key`)."""
    stamp = time.time_ns() if now_ns is None else now_ns
    return f"file-{stamp:016x}{uuid.uuid4().hex[:8]}"


def cursor_key(file_id: str) -> tuple[int, int, str] | None:
    """The `newest_first` sort key a file with this id had (also a deleted or expired one), from
    the time in its id; None for an id without one (made before ids carried it)."""
    digits = file_id.removeprefix("file-")
    if len(digits) != 24 or not file_id.startswith("file-"):
        return None
    try:
        stamp = int(digits[:16], 16)
    except ValueError:
        return None
    return stamp // 1_000_000_000, stamp, file_id


def public(meta: dict[str, Any]) -> dict[str, Any]:
    """The OpenAI File object (without the owner)."""
    return {name: value for name, value in meta.items() if name != OWNER}


def newest_first(meta: dict[str, Any]) -> tuple[int, int, str]:
    """The sort key of a file, newest first with `reverse=True` (also within one second): the
    time in its id (`cursor_key`), or its `created_at` for an id without one."""
    return cursor_key(meta["id"]) or (meta["created_at"], 0, meta["id"])


class FileStore:
    """Upload, describe, read, list and delete files in the bucket; every call names the owner."""

    def __init__(self, js: JetStreamContext, subjects: Subjects, *, ttl_s: float, replicas: int = 1) -> None:
        self.js = js
        self.bucket = files_bucket(subjects)
        self.ttl_s = ttl_s
        self.replicas = replicas
        self._store = None
        self._remake = Remake()

    async def _open(self):
        if self._store is None:
            await anyio.sleep(self._remake.wait_s())  # a bucket found gone: its deletion ends first
            self._store = await open_object_store(self.js, self.bucket, ttl=self.ttl_s, replicas=self.replicas,
                                                own_age=True)  # the gateway's own bucket
            self._remake.made()
        return self._store

    async def put(self, owner: str, filename: str, purpose: str, data: bytes | BinaryIO, size: int) -> dict[str, Any]:
        """Store a file (`data`: bytes or a seekable binary file object read to its end, `size`
        bytes); returns its metadata (the File object plus the owner). A bucket NATS has lost
        (a restart without its store, or deleted) is made anew and the file stored again, once,
        `streams.REBUILD_SETTLE_S` after it was found gone (`streams.Remake`)."""
        now_ns = time.time_ns()
        created = now_ns // 1_000_000_000
        meta = {"id": new_file_id(now_ns), "object": "file", "bytes": size, "created_at": created,
                "expires_at": created + int(self.ttl_s) if self.ttl_s else None,
                "filename": filename, "purpose": purpose, "status": "processed", OWNER: owner}
        object_meta = ObjectMeta(name=meta["id"], description=json.dumps(meta))
        start = None if isinstance(data, bytes) else data.tell()
        try:
            await (await self._open()).put(meta["id"], data, meta=object_meta)
        except Exception as exc:
            if not stream_gone(exc):
                raise
            self._store = None  # NATS lost the bucket (a restart without its store): made anew, once
            self._remake.lost()
            if start is not None:
                data.seek(start)
            await (await self._open()).put(meta["id"], data, meta=object_meta)
        return meta

    async def info(self, owner: str, file_id: str) -> dict[str, Any] | None:
        """The metadata of `owner`'s file `file_id`, or None (absent, deleted, another's)."""
        store = await self._open()
        try:
            info = await store.get_info(file_id)
        except (ObjectNotFoundError, ObjectDeletedError, NotFoundError):
            return None
        except (UnicodeError, ValueError, BadObjectMetaError):  # a made-up id (not UTF-8, not ours): no such file
            return None
        # NATS not answering raises: taken for "no such file", it failed a batch resumed at a gateway's
        # start for good ("the input file is gone") and answered 404 where the gateway answers 503
        meta = _meta_of(info.description)
        return meta if meta is not None and meta.get(OWNER) == owner else None

    async def read_into(self, owner: str, file_id: str, handle: BinaryIO) -> dict[str, Any] | None:
        """Write the file's bytes to `handle` (constant memory); its metadata, or None."""
        meta = await self.info(owner, file_id)
        if meta is None:
            return None
        await (await self._open()).get(file_id, writeinto=handle)
        return meta

    async def list(self, owner: str, purpose: str | None = None) -> list[dict[str, Any]]:
        """`owner`'s files, newest first (optionally of one purpose)."""
        store = await self._open()
        try:
            infos = await store.list(ignore_deletes=True)
        except NotFoundError:
            return []
        metas = [_meta_of(info.description) for info in infos if not info.deleted]
        mine = [m for m in metas if m is not None and m.get(OWNER) == owner
                and (purpose is None or m.get("purpose") == purpose)]
        return sorted(mine, key=newest_first, reverse=True)

    async def delete(self, owner: str, file_id: str) -> bool:
        """Delete `owner`'s file; False when there was none."""
        if await self.info(owner, file_id) is None:
            return False
        await (await self._open()).delete(file_id)
        return True


def _meta_of(description: str | None) -> dict[str, Any] | None:
    try:
        meta = json.loads(description or "")
    except ValueError:
        return None
    return meta if isinstance(meta, dict) and "id" in meta else None
