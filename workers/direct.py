"""One upstream exchange straight on aiohttp, byte for byte as httpx over httpx-aiohttp makes it.

httpx's object model costs more than the HTTP client under it: against a local nginx, a call
through `httpx.AsyncClient` over the httpx-aiohttp transport took 290-310 µs of CPU where the
same request on httpx-aiohttp's own aiohttp session took 80-95 (16 in flight; 390-550 against
160-220 one at a time). So while no span records (the HTTP client span needs httpx's
instrumentation), the executor hands the worker's calls to the aiohttp session under its httpx
client itself, and keeps httpx's rules:

- the request (`RequestBuilder.build`): httpx's `Request` header list (`Host` first, then
  `Content-Length: 0` for a POST, PUT or PATCH without a body, the client's default headers
  with the job's over them, the content headers, the key, `traceparent`), lower-case names as
  httpx hands them to aiohttp (`Headers.items()`), the URL as httpx writes it, and the
  session call httpx-aiohttp makes (`DirectRequest.send`: no redirects, no decompression by
  aiohttp, the timeouts of `httpx.Timeout(timeout_s)`);
- the answer (`AiohttpAnswer`): the headers as `httpx.Headers.items()` gives them (lower-case
  names, repeats joined by ", ", one encoding for the whole block: ASCII, else UTF-8, else
  latin-1), the body decoded by httpx's own decoders for its Content-Encoding, and aiohttp's
  errors turned into httpx's by httpx-aiohttp's own mapping (`map_aiohttp_exceptions`).

tests/unit/test_direct_wire.py compares both paths' bytes on a socket for every kind of job.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass
from functools import lru_cache
from typing import Any, Protocol

import aiohttp
import anyio
import httpx
import yarl
from httpx._decoders import SUPPORTED_DECODERS, ContentDecoder, IdentityDecoder, MultiDecoder
from httpx_aiohttp.transport import AiohttpTransport, map_aiohttp_exceptions

from ratefleet.workers.body import read_capped

ChunkSink = Callable[[bytes], Awaitable[None]]
CHUNK_BYTES = 16 * 1024  # as httpx-aiohttp's AiohttpResponseStream reads


class Answer(Protocol):
    """An upstream answer whose head has come: `status`, `headers` (lower-case names, as
    `httpx.Headers.items()` gives them), the body still to read."""

    status: int
    headers: dict[str, str]

    async def read(self, cap: int, on_chunk: ChunkSink | None) -> bytes | None:
        """The decoded body, or None once it passes `cap` bytes (workers/body.py `read_capped`)."""

    async def close(self) -> None:
        """Give the connection back (closed when the body was not read to its end)."""


class HttpxAnswer:
    """An answer read through httpx (`client.send(..., stream=True)`)."""

    def __init__(self, response: httpx.Response) -> None:
        self.response = response
        self.status = response.status_code
        # read once: each lookup on httpx.Headers decodes and scans every header again
        # (lower-case names; a repeated header's values joined by ", ", as httpx's get does)
        self.headers = dict(response.headers.items())

    async def read(self, cap: int, on_chunk: ChunkSink | None) -> bytes | None:
        return await read_capped(self.response, cap, on_chunk)

    async def close(self) -> None:
        response = self.response
        # also when call()'s deadline cancels the read: the connection is closed, not leaked
        # (a body read to its end closed the response already: nothing to wait for)
        if not response.is_closed:
            with anyio.CancelScope(shield=True), anyio.move_on_after(1.0):
                await response.aclose()
        _unlink(response)


def _unlink(response: httpx.Response) -> None:
    """Break the reference cycle httpx leaves between a sent response and its stream
    (`Response.stream` is a BoundAsyncStream pointing back at the response), once the body
    is read or the response closed: reference counting then frees the ~45 objects of the
    call at once, instead of the cyclic collector finding them later (measured: ~160-230 µs
    of collector time per call over httpx-aiohttp). Status and headers stay readable."""
    if response.is_closed:
        response.stream = httpx.ByteStream(b"")


class AiohttpAnswer:
    """An answer read straight from aiohttp, as httpx over httpx-aiohttp would read it."""

    def __init__(self, response: aiohttp.ClientResponse) -> None:
        self.response = response
        self.status = response.status
        self.headers = received_headers(response.raw_headers)
        self._closed = False

    async def read(self, cap: int, on_chunk: ChunkSink | None) -> bytes | None:
        """`read_capped` over `aiter_bytes`; a body read to its end gives the connection back at
        once, as httpx's `aiter_raw` closes the response."""
        raw = await read_capped(self, cap, on_chunk)
        if raw is not None:
            self._closed = True
            with map_aiohttp_exceptions():
                await self.response.__aexit__(None, None, None)
        return raw

    async def aiter_bytes(self) -> AsyncIterator[bytes]:
        """The body as httpx's `Response.aiter_bytes` gives it: decoded by httpx's decoders for
        its Content-Encoding, chunk by chunk as aiohttp reads them, empty chunks skipped, the
        decoder's flush last; aiohttp's errors as httpx's."""
        decoder = content_decoder(self.headers.get("content-encoding"))
        with map_aiohttp_exceptions():
            async for raw in self.response.content.iter_chunked(CHUNK_BYTES):
                chunk = decoder.decode(raw) if decoder is not None else raw
                if chunk:
                    yield chunk
        tail = decoder.flush() if decoder is not None else b""
        if tail:
            yield tail

    async def close(self) -> None:
        if not self._closed:  # as AiohttpResponseStream.aclose, bounded as HttpxAnswer.close
            self._closed = True
            with anyio.CancelScope(shield=True), anyio.move_on_after(1.0), map_aiohttp_exceptions():
                await self.response.__aexit__(None, None, None)


def received_headers(raw: Iterable[tuple[bytes, bytes]]) -> dict[str, str]:
    """`dict(httpx.Headers(raw).items())`: lower-case names, a repeated header's values joined
    by ", " at its first place, all decoded with one encoding (ASCII if every name and value
    is, else UTF-8 if every one is, else latin-1: httpx `Headers.encoding`)."""
    raw = list(raw)
    encoding = "iso-8859-1"
    for candidate in ("ascii", "utf-8"):
        try:
            for name, value in raw:
                name.decode(candidate)
                value.decode(candidate)
        except UnicodeDecodeError:
            continue
        encoding = candidate
        break
    out: dict[str, str] = {}
    for name, value in raw:
        key, text = name.lower().decode(encoding), value.decode(encoding)
        out[key] = f"{out[key]}, {text}" if key in out else text
    return out


def content_decoder(content_encoding: str | None) -> ContentDecoder | None:
    """httpx's decoder for a Content-Encoding value (`Response._get_content_decoder`: each coding
    it knows, in order; unknown ones are left as they are), or None for no decoding at all."""
    if not content_encoding:
        return None
    decoders = [SUPPORTED_DECODERS[coding]() for coding in (part.strip().lower() for part in content_encoding.split(","))
                if coding in SUPPORTED_DECODERS]
    if not decoders:
        return None
    decoder = decoders[0] if len(decoders) == 1 else MultiDecoder(children=decoders)
    return None if isinstance(decoder, IdentityDecoder) else decoder


@dataclass(frozen=True)
class DirectRequest:
    """A request as httpx over httpx-aiohttp puts it on the wire: `url` (as aiohttp parses the
    string httpx-aiohttp gives it), `headers` (lower-case names, in httpx's order), `body`
    (bytes, None for none), `timeout` (aiohttp's form of `httpx.Timeout(timeout_s)`)."""

    method: str
    url: yarl.URL
    headers: list[tuple[str, str]]
    body: bytes | None
    timeout: aiohttp.ClientTimeout

    async def send(self, transport: AiohttpTransport) -> AiohttpAnswer:
        """The exchange up to the answer's head, with httpx-aiohttp's own arguments and error
        mapping (so an error is the httpx exception the httpx path raises). Raises httpx.HTTPError
        subclasses, aiohttp's parse errors httpx-aiohttp leaves as they are."""
        if not isinstance(transport.client, aiohttp.ClientSession):
            transport.client = transport.get_client()  # (made once, as the transport itself does)
        with map_aiohttp_exceptions():
            response = await transport.client.request(
                self.method, self.url, headers=self.headers, data=self.body, allow_redirects=False,
                auto_decompress=False, compress=False, timeout=self.timeout, server_hostname=None, proxy=None,
                proxy_auth=None, proxy_headers=None).__aenter__()
        return AiohttpAnswer(response)


class RequestBuilder:
    """Builds `DirectRequest`s for one httpx client, over its default headers (read once)."""

    def __init__(self, client: httpx.AsyncClient) -> None:
        self._defaults = list(client.headers.items())

    def build(self, method: str, url: str, params: Mapping[str, Any] | None, headers: list[tuple[str, str]],
              auth: tuple[str, str], trace: dict[str, str], *, content: bytes | None = None,
              json_body: Any = None, timeout: float) -> DirectRequest:
        """`url`: the upstream's base URL and the job's path; `params`: the job's query (merged into
        a query the path has, as httpx's `copy_merge_params`); `headers`: the job's (already
        checked, latin-1 encodable) then any the executor adds (Content-Type); `auth`: (header,
        value), its value checked by the caller (httpx writes it as latin-1); `trace`:
        `traceparent`/`tracestate` to set; `timeout`: seconds, per phase.
        `json_body` (not None): written as httpx's `json=` writes it (httpx/_content.py
        `encode_json`: compact, UTF-8, no NaN). Raises httpx.InvalidURL, ValueError, TypeError
        (a body that is not JSON). The client's own `base_url`, `params`, `auth` and event hooks
        are not applied: the clients `build_client` makes have none."""
        if params:
            merged_url = httpx_url(url).copy_merge_params(params)
            target, netloc = yarl.URL(str(merged_url)), merged_url.netloc.decode("ascii")
        else:
            target, netloc = _target(url)
        extra: list[tuple[str, str]] = []
        if json_body is not None:
            content = json.dumps(json_body, ensure_ascii=False, separators=(",", ":"), allow_nan=False).encode()
            extra = [("content-type", "application/json")]
        if content:
            extra = [("content-length", str(len(content))), *extra]
        else:
            content = None
        own: dict[str, str] = {}
        for name, value in headers:
            key = name.lower()
            own[key] = f"{own[key]}, {value}" if key in own else value
        merged = {key: value for key, value in self._defaults if key not in own}
        merged.update(own)  # httpx's Headers.update: the job's replace the defaults, at the end
        for key, value in extra:
            merged.setdefault(key, value)
        front = [("host", netloc)]
        if content is None and method in ("POST", "PUT", "PATCH"):
            front.append(("content-length", "0"))
        for key, value in (auth, *trace.items()):
            merged[key.lower()] = value
        return DirectRequest(method, target, [*front, *merged.items()], content, _client_timeout(timeout))


@lru_cache(maxsize=1024)
def _target(url: str) -> tuple[yarl.URL, str]:
    """`url` as httpx writes it, parsed by yarl as aiohttp parses that string, and its Host
    value (httpx's netloc). Cached: the upstreams' URLs repeat (httpx parses one in ~60 µs)."""
    parsed = httpx_url(url)
    return yarl.URL(str(parsed)), parsed.netloc.decode("ascii")


@lru_cache(maxsize=1024)
def httpx_url(url: str) -> httpx.URL:
    """`httpx.URL(url)`, parsed once per URL (the httpx path uses it too; ~60 µs a parse).
    Raises httpx.InvalidURL."""
    return httpx.URL(url)


@lru_cache(maxsize=64)
def _client_timeout(seconds: float) -> aiohttp.ClientTimeout:
    """httpx-aiohttp's ClientTimeout of `httpx.Timeout(seconds)`: sock_connect=connect,
    sock_read=read, connect=pool."""
    return aiohttp.ClientTimeout(sock_connect=seconds, sock_read=seconds, connect=seconds)
