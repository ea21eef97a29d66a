"""Large response bodies: kept in the fleet's NATS Object Store, referenced from the Result.

A Result travels whole only while its JSON stays under `inline_limit(max_payload)`: a
JetStream message, a core-NATS reply to an rpc caller and a dead letter must all fit in the
server's `max_payload` (1 MiB by default). A larger Result has its body moved to the bucket
`Subjects.bodies_bucket` (created with the streams, kept as long as results) BEFORE the
Result is stored, and `response.body_ref` says where it is (see `schemas.result.BodyRef`).

The object holds the body field's value as UTF-8 (`BodyRef.encoding`: json, text, or
base64 text for binary answers). The object name is `<job id>.<sha256 of the body>`: a retried store of the same Result
finds its object already there (no second upload), and two Results racing for one job
(only one of which the stream keeps) can never overwrite each other's body.

`BodyStore.resolve` is what readers call (Client.results/stored_result/request): it
fetches the object, checks size and sha256, and fills the field the ref names.
"""

from __future__ import annotations

import hashlib
import io
import json
from collections.abc import Awaitable, Callable
from typing import Any

import pydantic_core
from nats.js import JetStreamContext
from nats.js.errors import BucketNotFoundError, DigestMismatchError, NotFoundError
from nats.js.object_store import ObjectStore

from ratefleet.runtime.store import retrying
from ratefleet.schemas import BodyRef, ResponseInfo, Result
from ratefleet.schemas.errors import BodyUnavailable

INLINE_CEILING = 1 << 20  # a Result is never larger than this, whatever max_payload the server allows
HEADROOM = 64 << 10  # for message headers and the reply/ack framing around the Result
LETTER_BODY_BYTES = 16 << 10  # a dead letter keeps a body up to this size; the Result has it whole


def inline_limit(max_payload: int) -> int:
    """The largest Result JSON (bytes) stored and sent as it is, for a server whose
    `max_payload` (bytes, from its INFO) is given: min(1 MiB, max_payload) - 64 KiB."""
    return max(4096, min(INLINE_CEILING, max_payload) - HEADROOM)


def body_bytes(response: ResponseInfo | None) -> tuple[bytes, str] | None:
    """The inline body as (bytes, encoding), or None when there is none: the value of the
    field as UTF-8 (json: compact JSON, text: the text, base64: the base64 text), i.e. what
    the object holds. Keeping base64 as base64 costs a third more bytes but no decode on the
    worker and no re-encode in the client, each a stall of the event loop on a large body.
    """
    if response is None:
        return None
    if response.body_b64 is not None:
        return response.body_b64.encode("ascii"), "base64"
    if response.body is not None:
        return response.body.encode("utf-8"), "text"
    if response.json_body is not None:
        return pydantic_core.to_json(response.json_body), "json"  # compact UTF-8, Rust-fast
    return None


def without_body(response: ResponseInfo, ref: BodyRef) -> ResponseInfo:
    """The response with its inline body replaced by a reference."""
    return response.model_copy(update={"json_body": None, "body": None, "body_b64": None, "body_ref": ref})


def with_body(response: ResponseInfo, data: bytes) -> ResponseInfo:
    """The response with the referenced body filled in from the object's bytes.

    Raises BodyUnavailable when `data` does not have the reference's size and sha256.
    """
    ref = response.body_ref
    assert ref is not None
    if len(data) != ref.size or hashlib.sha256(data).hexdigest() != ref.sha256:
        raise BodyUnavailable(f"object {ref.name!r} in bucket {ref.bucket!r} does not match its reference "
                              f"({len(data)} bytes, expected {ref.size} with sha256 {ref.sha256[:12]}...)")
    if ref.encoding == "json":
        return response.model_copy(update={"json_body": json.loads(data)})
    if ref.encoding == "text":
        return response.model_copy(update={"body": data.decode("utf-8")})
    return response.model_copy(update={"body_b64": data.decode("ascii")})


def letter_response(response: ResponseInfo | None) -> dict | None:
    """The response as a dead letter keeps it: a body over LETTER_BODY_BYTES is left out
    (the job's stored Result has it whole), so a dead letter stays far below max_payload."""
    if response is None:
        return None
    data = response.model_dump(by_alias=True)
    inline = body_bytes(response)
    if inline is not None and len(inline[0]) > LETTER_BODY_BYTES:
        data.update(json=None, body=None, body_b64=None,
                    body_omitted=f"{len(inline[0])} bytes; the job's Result holds the whole answer")
    return data


def object_name(job_id: str, sha256_hex: str) -> str:
    return f"{job_id}.{sha256_hex}"


class BodyStore:
    """Moves bodies into the Object Store bucket `bucket` and fetches them back."""

    def __init__(self, js: JetStreamContext, bucket: str):
        self._js, self._bucket = js, bucket
        self._opened: dict[str, ObjectStore] = {}

    async def _open(self, bucket: str) -> ObjectStore:
        store = self._opened.get(bucket)
        if store is None:
            store = self._opened[bucket] = await self._js.object_store(bucket)
        return store

    async def offload(self, result: Result, inline: tuple[bytes, str] | None = None, *,
                      retry_for: float = 120.0, gone: Callable[[], Awaitable[Any]] | None = None) -> Result:
        """`result` with its body (`inline`: `body_bytes(result.response)` when the caller has
        it already) moved into the bucket, uploaded and confirmed by the server before this
        returns; unchanged when it has no inline body. Rides out a NATS restart for
        `retry_for` seconds, then raises the last error; `gone()` is awaited when the bucket
        is missing (runtime/store.py `retrying`)."""
        inline = inline or body_bytes(result.response)
        if inline is None:
            return result
        data, encoding = inline
        digest = hashlib.sha256(data).hexdigest()
        name = object_name(result.job_id, digest)
        await retrying(lambda: self._put(name, data), for_s=retry_for, gone=gone)
        ref = BodyRef(bucket=self._bucket, name=name, size=len(data), sha256=digest, encoding=encoding)
        return result.model_copy(update={"response": without_body(result.response, ref)})

    async def _put(self, name: str, data: bytes) -> None:
        store = await self._open(self._bucket)
        try:
            if (await store.get_info(name)).size == len(data):
                return  # the name carries the digest: this very body is stored already
        except NotFoundError:
            pass
        await store.put(name, data)

    async def resolve(self, result: Result) -> Result:
        """`result` with a referenced body fetched and filled in (a no-op without `body_ref`
        or when the body is there already). Raises BodyUnavailable naming the job and why."""
        response = result.response
        if response is None or response.body_ref is None or body_bytes(response) is not None:
            return result
        ref = response.body_ref
        sink = io.BytesIO()
        try:
            store = await self._open(ref.bucket)
            await store.get(ref.name, writeinto=sink)
        except (BucketNotFoundError, NotFoundError, DigestMismatchError) as exc:
            raise BodyUnavailable(f"the body of job {result.job_id} ({ref.size} bytes, object {ref.name!r} in bucket "
                                  f"{ref.bucket!r}) cannot be fetched: {type(exc).__name__} (objects are kept as "
                                  "long as results, streams.results_max_age_s)") from None
        return result.model_copy(update={"response": with_body(response, sink.getvalue())})
