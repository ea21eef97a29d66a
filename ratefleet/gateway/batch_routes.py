"""`/v1/files` and `/v1/batches` of the OpenAI API, served by the gateway itself.

OpenAI API reference, "Files" (upload with purpose `batch` as multipart/form-data fields
`file` and `purpose`, retrieve, content, list, delete) and "Batch" (create, retrieve, list,
cancel). Each caller (its ratefleet key, as for every gateway path) sees only its own files
and batches; another's id is a 404, as OpenAI answers for an unknown one. Refusals are
OpenAI-style error bodies (errors.py): 400 for a bad request, 404 `No such File object` /
`No such Batch object`, 409 cancelling a finished batch, 413 a file over MAX_FILE_BYTES.
503 `service_unavailable` with Retry-After while NATS is away (as the other gateway paths
answer). A 409 says `x-should-retry: false`: the OpenAI SDKs retry 409s twice on their own, and a
finished batch or a running one's input file is no different a second later.
"""

from __future__ import annotations

import json
import os
import tempfile
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, BinaryIO

import anyio
from starlette.datastructures import UploadFile
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from ratefleet.gateway import batch_book, files
from ratefleet.gateway.app import read_body
from ratefleet.gateway.batch_book import TERMINAL, WINDOW_S, BatchBook, new_batch, set_status
from ratefleet.gateway.batch_lines import ENDPOINTS
from ratefleet.gateway.batch_runner import BatchRunner
from ratefleet.gateway.callers import Caller, CallerTable, single_field
from ratefleet.gateway.errors import GatewayRefusal, bad_request, unauthorized
from ratefleet.gateway.files import FileStore
from ratefleet.gateway.translate import check_path, choose_upstream
from ratefleet.runtime.edge import translate
from ratefleet.runtime.logs import get_logger
from ratefleet.runtime.streams import STORE_NOT_CREATED, stream_gone
from ratefleet.schemas.errors import NatsUnavailable

log = get_logger("ratefleet.gateway")
MAX_FILE_BYTES = 200 * 1024 * 1024  # OpenAI's limit for a batch input file
CANCELLABLE = frozenset({"validating", "in_progress"})
MAX_REQUEST_BYTES = 1 << 20  # a create-batch request body (a few hundred bytes in practice)
METADATA_PAIRS, METADATA_KEY_CHARS, METADATA_VALUE_CHARS = 16, 64, 512  # OpenAI's metadata limits


def unavailable(message: str) -> GatewayRefusal:
    """503 with Retry-After (an SDK retries it): `message` says which NATS failure, and ends in
    what to do."""
    return GatewayRefusal(503, message, type="server_error", code="service_unavailable", retry_after_s=2.0)


def nats_unreachable(why: str) -> GatewayRefusal:
    """503 when NATS, where files and batches live, is away, rather than a 500 after a 5 s timeout."""
    return unavailable(f"The ratefleet gateway cannot reach NATS, where files and batches are kept ({why}); "
                       "retry shortly.")


def not_found(kind: str, object_id: str) -> GatewayRefusal:
    return GatewayRefusal(404, f"No such {kind} object: {object_id}", type="invalid_request_error", code=None,
                          param="id")


class BatchApi:
    """The handlers; every one identifies the caller first (401 without a known key)."""

    def __init__(self, callers: CallerTable, files_store: FileStore, book: BatchBook, runner: BatchRunner) -> None:
        self.callers, self.files, self.book, self.runner = callers, files_store, book, runner

    def routes(self) -> list[Route]:
        return [Route("/v1/files", self._guard(self.upload), methods=["POST"]),
                Route("/v1/files", self._guard(self.list_files), methods=["GET"]),
                Route("/v1/files/{file_id}", self._guard(self.retrieve_file), methods=["GET"]),
                Route("/v1/files/{file_id}", self._guard(self.delete_file), methods=["DELETE"]),
                Route("/v1/files/{file_id}/content", self._guard(self.file_content), methods=["GET"]),
                Route("/v1/batches", self._guard(self.create_batch), methods=["POST"]),
                Route("/v1/batches", self._guard(self.list_batches), methods=["GET"]),
                Route("/v1/batches/{batch_id}", self._guard(self.retrieve_batch), methods=["GET"]),
                Route("/v1/batches/{batch_id}/cancel", self._guard(self.cancel_batch), methods=["POST"])]

    def _guard(self, handler: Callable[[Request, Caller], Awaitable[Response]]) -> Callable[[Request], Awaitable[Response]]:
        async def endpoint(request: Request) -> Response:
            caller = None
            try:
                caller = self.callers.identify(single_field(request.headers.getlist("authorization")))
                if caller is None:
                    raise unauthorized()
                if self.runner is not None and not self.runner.client.nc.is_connected:
                    raise nats_unreachable("the connection is lost and reconnecting")  # at once, not after a timeout
                try:
                    response = await handler(request, caller)
                except Exception as exc:
                    raise self._refusal_for(exc) from None
            except GatewayRefusal as refusal:
                response = Response(refusal.body(), status_code=refusal.status, headers=refusal.headers(),
                                     media_type="application/json")
            log.info("gateway request", caller=caller.name if caller else None, method=request.method,
                     path=request.url.path, status=response.status_code)
            return response
        return endpoint

    def _refusal_for(self, exc: Exception) -> Exception:
        """The 503 (with Retry-After: an SDK retries it) for a NATS failure a retry can get past;
        `exc` itself otherwise (an OpenAI-style 500: app._internal_error). A bucket NATS lost
        (deleted, or a restart without its store) or could not make yet (err_code 10049) was a 500
        naming only the exception class (a reviewer's finding); it is made anew on a later
        request. A timeout while connected is not "cannot reach NATS": the server did not answer."""
        if stream_gone(exc) or getattr(exc, "err_code", None) == STORE_NOT_CREATED:
            return unavailable("NATS has lost the bucket where files and batches are kept (deleted, or a restart "
                               f"without its store) or is still removing it ({type(exc).__name__}); it is made anew "
                               "on a later request: retry shortly.")
        if not isinstance(translate(exc), NatsUnavailable):
            return exc
        if self.runner is not None and self.runner.client.nc.is_connected:
            return unavailable(f"NATS did not answer in time ({type(exc).__name__}) although connected: overloaded, "
                               "or unable to store into the files or batches bucket (the NATS server's log then says "
                               "why); retry shortly.")
        return nats_unreachable(type(exc).__name__)

    # -- files -----------------------------------------------------------------------------

    async def upload(self, request: Request, caller: Caller) -> Response:
        declared = request.headers.get("content-length")
        if declared and declared.isdigit() and int(declared) > MAX_FILE_BYTES + 65536:
            raise _too_large()
        if "multipart/form-data" not in request.headers.get("content-type", ""):
            raise bad_request("Upload the file as multipart/form-data with fields 'file' and 'purpose'.",
                              code="invalid_content_type")
        async with _capped(request, MAX_FILE_BYTES + 65536).form(max_files=1, max_fields=8) as form:
            purpose, upload = form.get("purpose"), form.get("file")
            if purpose != "batch":
                raise bad_request(f"purpose must be 'batch' (got {purpose!r}); the ratefleet gateway keeps batch "
                                  "input files only.", code="invalid_purpose", param="purpose")
            if not isinstance(upload, UploadFile):
                raise bad_request("The 'file' field is missing or is not a file.", param="file")
            size = upload.size if upload.size is not None else len(await upload.read())
            if size > MAX_FILE_BYTES:
                raise _too_large()
            if size == 0:
                raise bad_request("The file is empty.", code="empty_file", param="file")
            await upload.seek(0)
            meta = await self.files.put(caller.name, upload.filename or "upload.jsonl", "batch", upload.file, size)
        return JSONResponse(files.public(meta))

    async def list_files(self, request: Request, caller: Caller) -> Response:
        """OpenAI's files list: `purpose`, `limit` (1-10000, default 10000), `order` (`desc`, the
        default, newest first, or `asc`) and `after` (a file id of the list)."""
        order = request.query_params.get("order", "desc")
        if order not in ("asc", "desc"):
            raise bad_request("order must be asc or desc.", param="order")
        found = await self.files.list(caller.name, request.query_params.get("purpose"))
        if order == "asc":
            found.reverse()

        def after_gone(cursor: str) -> list[dict[str, Any]] | None:
            # a cursor file deleted since (the SDK's list-and-delete loop) or expired: its id
            # still says where it stood in the list
            key = files.cursor_key(cursor)
            if key is None:
                return None
            later = (lambda m: files.newest_first(m) > key) if order == "asc" else (lambda m: files.newest_first(m) < key)
            return [m for m in found if later(m)]

        return JSONResponse(_page(found, request, default=10000, most=10000, public=files.public, after_gone=after_gone))

    async def retrieve_file(self, request: Request, caller: Caller) -> Response:
        file_id = request.path_params["file_id"]
        meta = await self.files.info(caller.name, file_id)
        if meta is None:
            raise not_found("File", file_id)
        return JSONResponse(files.public(meta))

    async def file_content(self, request: Request, caller: Caller) -> Response:
        file_id = request.path_params["file_id"]
        handle = tempfile.TemporaryFile()  # noqa: SIM115 - closed by the response's last chunk
        try:
            meta = await self.files.read_into(caller.name, file_id, handle)
        except BaseException:
            handle.close()
            raise
        if meta is None:
            handle.close()
            raise not_found("File", file_id)
        size = handle.seek(0, os.SEEK_END)
        handle.seek(0)
        return StreamingResponse(_chunks(handle), media_type="application/octet-stream",
                                 headers={"content-length": str(size)})

    async def delete_file(self, request: Request, caller: Caller) -> Response:
        """409 while an unfinished batch reads the file: the batch goes on from it after a gateway
        restart (batch_runner.py), and without it a batch whose calls are paid would end `failed`."""
        file_id = request.path_params["file_id"]
        if await self.files.info(caller.name, file_id) is None:  # another caller's file: not even its batch's id
            raise not_found("File", file_id)
        using = [record["id"] for record in await self.book.all()
                 if record.get("input_file_id") == file_id and record.get("status") not in TERMINAL]
        if using:
            raise GatewayRefusal(409, f"File {file_id} is the input of batch {using[0]}, which has not ended; delete "
                                 "it once the batch is completed, failed, expired or cancelled.",
                                 type="invalid_request_error", code="file_in_use", sdk_retry=False)
        if not await self.files.delete(caller.name, file_id):
            raise not_found("File", file_id)
        return JSONResponse({"id": file_id, "object": "file", "deleted": True})

    # -- batches ---------------------------------------------------------------------------

    async def create_batch(self, request: Request, caller: Caller) -> Response:
        body = await _json_object(request)
        input_file_id, endpoint = body.get("input_file_id"), body.get("endpoint")
        window, metadata = body.get("completion_window"), body.get("metadata")
        if not isinstance(input_file_id, str) or not input_file_id:
            raise bad_request("input_file_id is required.", param="input_file_id")
        if endpoint not in ENDPOINTS:
            raise bad_request(f"endpoint must be one of {', '.join(sorted(ENDPOINTS))}.", param="endpoint")
        check_path(caller, "POST", endpoint)  # callers.<name>.paths hold for its batches too (a review)
        if window not in WINDOW_S:
            raise bad_request("completion_window must be '24h'.", param="completion_window")
        _check_metadata(metadata)
        meta = await self.files.info(caller.name, input_file_id)
        if meta is None:
            raise not_found("File", input_file_id)
        if meta["purpose"] != "batch":
            raise bad_request(f"File {input_file_id} has purpose {meta['purpose']!r}, not 'batch'.",
                              param="input_file_id")
        record = new_batch(caller=caller.name, tier=caller.batch_tier or caller.tier,
                           upstream=choose_upstream(caller, None), input_file_id=input_file_id,
                           endpoint=endpoint, completion_window=window, metadata=metadata, now=time.time())
        await self.book.create(record)
        self.runner.start(record["id"])
        return JSONResponse(batch_book.public(record))

    async def _mine(self, caller: Caller, batch_id: str) -> dict[str, Any]:
        record = await self.book.get(batch_id)
        if record is None or record[batch_book.PRIVATE]["caller"] != caller.name:
            raise not_found("Batch", batch_id)
        return record

    async def retrieve_batch(self, request: Request, caller: Caller) -> Response:
        return JSONResponse(batch_book.public(await self._mine(caller, request.path_params["batch_id"])))

    async def list_batches(self, request: Request, caller: Caller) -> Response:
        mine = [r for r in await self.book.all() if r[batch_book.PRIVATE]["caller"] == caller.name]
        return JSONResponse(_page(mine, request, default=20, most=100, public=batch_book.public))

    async def cancel_batch(self, request: Request, caller: Caller) -> Response:
        batch_id = request.path_params["batch_id"]
        await self._mine(caller, batch_id)

        def change(record: dict[str, Any]) -> dict[str, Any] | None:
            return set_status(record, "cancelling") if record["status"] in CANCELLABLE else None

        record = await self.book.update(batch_id, change)
        if record["status"] not in {"cancelling", "cancelled"}:
            raise GatewayRefusal(409, f"Cannot cancel a batch with status {record['status']}.",
                                 type="invalid_request_error", code="batch_not_cancellable", sdk_retry=False)
        if record["status"] == "cancelling":
            # the fleet stops calling the batch's jobs now, not when its runner next looks (a
            # gateway killed in between left them called, and paid, until another took it over)
            await self.runner.stop_calls(batch_id, "cancelled")
        return JSONResponse(batch_book.public(record))


def _page(items: list[dict[str, Any]], request: Request, *, default: int, most: int,
          public: Callable[[dict[str, Any]], dict[str, Any]],
          after_gone: Callable[[str], list[dict[str, Any]] | None] | None = None) -> dict[str, Any]:
    """One cursor page of `items` (in list order) as OpenAI lists answer: `data`, `first_id`,
    `last_id`, `has_more`; query `limit` (1..`most`, default `default`) and `after` (the id
    after which the page starts). `after_gone(after)`: the items after a cursor that is no
    longer in the list, when its id says where it stood (else None). GatewayRefusal 400 for a
    bad limit, and for an `after` that is nowhere (an empty page would read as the end)."""
    limit_text = request.query_params.get("limit", str(default))
    if not limit_text.isdigit() or not 1 <= int(limit_text) <= most:
        raise bad_request(f"limit must be a whole number from 1 to {most}.", param="limit")
    after = request.query_params.get("after")
    if after is not None:
        ids = [item["id"] for item in items]
        if after in ids:
            items = items[ids.index(after) + 1:]
        elif (rest := after_gone(after) if after_gone is not None else None) is not None:
            items = rest
        else:
            raise bad_request(f"after: {after!r} is not in this list (deleted, expired or another caller's); "
                              "list again from the start, without after.", param="after")
    page = items[: int(limit_text)]
    return {"object": "list", "data": [public(item) for item in page], "first_id": page[0]["id"] if page else None,
            "last_id": page[-1]["id"] if page else None, "has_more": len(items) > len(page)}


def _check_metadata(metadata: Any) -> None:
    """OpenAI's rule for `metadata` (API reference, "Batch" -> "Create batch"): at most 16
    pairs, keys up to 64 characters, values strings up to 512. GatewayRefusal 400 otherwise
    (a larger record would not fit in a KV message)."""
    if metadata is None:
        return
    if not isinstance(metadata, dict) or len(metadata) > METADATA_PAIRS:
        raise bad_request(f"metadata must be an object of at most {METADATA_PAIRS} pairs.", param="metadata")
    for key, value in metadata.items():
        if len(key) > METADATA_KEY_CHARS or not isinstance(value, str) or len(value) > METADATA_VALUE_CHARS:
            raise bad_request(f"metadata keys are at most {METADATA_KEY_CHARS} characters and values strings of "
                              f"at most {METADATA_VALUE_CHARS}.", param="metadata")


async def _json_object(request: Request) -> dict[str, Any]:
    try:
        body = json.loads(await read_body(request, MAX_REQUEST_BYTES, "a create-batch request"))
    except (ValueError, RecursionError) as exc:
        raise bad_request(f"The request body is not valid JSON ({exc}).", code="invalid_json") from None
    if not isinstance(body, dict):
        raise bad_request("The request body must be a JSON object.", code="invalid_json")
    return body


def _capped(request: Request, limit: int) -> Request:
    """`request` whose body stops with GatewayRefusal 413 once past `limit` bytes, so an upload
    sent chunked (no Content-Length) is not spooled to disk whole before its size is known."""
    received = 0

    async def receive() -> dict[str, Any]:
        nonlocal received
        message = await request.receive()
        received += len(message.get("body", b""))
        if received > limit:
            raise _too_large()
        return message

    return Request(request.scope, receive)


async def _chunks(handle: BinaryIO) -> AsyncIterator[bytes]:
    """A file's bytes 1 MiB at a time (constant memory); closes it at the end."""
    try:
        while chunk := await anyio.to_thread.run_sync(handle.read, 1 << 20):
            yield chunk
    finally:
        handle.close()


def _too_large() -> GatewayRefusal:
    return GatewayRefusal(413, f"The file is larger than {MAX_FILE_BYTES} bytes.", type="invalid_request_error",
                          code="file_too_large", param="file")
