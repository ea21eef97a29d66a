"""Reading an upstream body as bytes (capped) and turning it into `ResponseInfo` fields.

Sizes are bytes, never characters. The body lands in exactly one field:

    JSON content type (`*/json`, `*+json`) whose text parses strictly  -> `json`
    textual content type whose charset (default UTF-8) decodes cleanly   -> `body`
    anything else (audio/mpeg, image/png, octet-stream, bad charset)     -> `body_b64`

"Strictly" means RFC 8259 JSON: `NaN`/`Infinity` (which Python's json accepts) make the
body text, so a stored Result never rewrites a value. The key's secret is masked wherever
the upstream echoes it: in the bytes (any content type), in the decoded text (charsets
in which the secret's bytes differ from UTF-8) and in every string and object key of parsed
JSON (an upstream may escape it: PHP's json_encode writes `/` as `\\/`, .NET writes `+` as
`\\u002B`; RFC 8259 section 7 lets any character be escaped).
"""

from __future__ import annotations

import base64
import codecs
import json
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from email.message import Message
from functools import lru_cache
from typing import Any, Protocol

from ratefleet.schemas.wire import json_problem, loads_finite, text_problem

# subtypes that are text whatever the main type says (RFC 6838 structured suffixes included)
TEXT_SUBTYPES = frozenset({"json", "xml", "javascript", "ecmascript", "x-www-form-urlencoded", "x-ndjson",
                           "ndjson", "csv", "yaml", "x-yaml", "html", "sql", "graphql"})
MASK = "***"
MASK_BYTES = MASK.encode()


class Streamed(Protocol):
    """A response whose body is still to read: `httpx.Response`, or workers/direct.py's
    `AiohttpAnswer` (its `headers` a dict of lower-case names)."""

    @property
    def headers(self) -> Mapping[str, str]: ...

    def aiter_bytes(self) -> AsyncIterator[bytes]: ...


async def read_capped(response: Streamed, cap: int,
                      on_chunk: Callable[[bytes], Awaitable[None]] | None = None) -> bytes | None:
    """The whole body of a streamed response, or None once it passes `cap` bytes (a declared
    Content-Length past it stops before any read).

    Reading stops at the first chunk past the cap, so at most `cap` plus one chunk is ever
    held in memory; the caller closes the response (dropping the rest of the body).
    `on_chunk`, when given, is awaited with each chunk (within the cap) as it is read.
    """
    declared = response.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > cap:
        return None
    parts: list[bytes] = []
    size = 0
    async for chunk in response.aiter_bytes():
        size += len(chunk)
        if size > cap:
            return None
        parts.append(chunk)
        if on_chunk is not None:
            await on_chunk(chunk)
    return b"".join(parts)


@lru_cache(maxsize=256)
def media_type(content_type: str | None) -> tuple[str, str | None]:
    """(`type/subtype` in lower case, charset or None) of a Content-Type value (RFC 9110 8.3).
    Cached: an upstream sends the same few values, and email.message parsing costs ~20 µs."""
    if not content_type:
        return "", None
    message = Message()
    message["content-type"] = content_type
    charset = message.get_param("charset")
    return message.get_content_type(), charset if isinstance(charset, str) and charset else None


def is_textual(kind: str, charset: str | None) -> bool:
    """True when a body of this media type is meant to be read as text."""
    if not kind or charset is not None:
        return True  # no type at all: text if it decodes; a declared charset means text
    main, _, sub = kind.partition("/")
    return main == "text" or sub in TEXT_SUBTYPES or sub.endswith(("+json", "+xml"))


def _decode(raw: bytes, charset: str) -> str | None:
    try:
        codecs.lookup(charset)
        return raw.decode(charset)
    except (LookupError, UnicodeDecodeError, ValueError):
        return None


def body_fields(raw: bytes, content_type: str | None, secret: str) -> dict[str, Any]:
    """The `ResponseInfo` body field for `raw`: {"json": v}, {"body": s}, {"body_b64": s} or {}."""
    if secret:
        raw = raw.replace(secret.encode("utf-8"), MASK_BYTES)
    if not raw:
        return {}
    kind, charset = media_type(content_type)
    text = _decode(raw, charset or "utf-8") if is_textual(kind, charset) else None
    if text is None:
        return {"body_b64": base64.b64encode(raw).decode("ascii")}
    if text_problem(text):  # a codec such as unicode_escape can make lone surrogates: not storable text
        return {"body_b64": base64.b64encode(raw).decode("ascii")}
    if secret:
        text = _mask_text(text, secret)
    if "json" in kind.partition("/")[2]:
        try:
            # NaN, Infinity and numbers past a float's range raise (then the body is text); a
            # surrogate escape (maybe a lone one) is rare in answers, so only then is the parsed
            # value walked (a walk of a 3 MB answer costs a few hundred ms)
            value, strict = loads_finite(text)
            if secret and "\\" in text:  # without an escape every parsed string is a piece of `text`
                value = mask_parsed(value, secret)
            if strict or json_problem(value) is None:
                return {"json": value}
        except (ValueError, RecursionError):
            pass
    return {"body": text}


@lru_cache(maxsize=64)
def _escaped_forms(secret: str) -> tuple[str, ...]:
    """`secret` as JSON-escaping upstreams write it inside a string: plain, `\\/` for `/`,
    and every non-alphanumeric character as `\\uXXXX` (upper- and lower-case hex); each also
    all in lower and all in upper case (an operations trial's upstream echoed the auth header
    lower-cased, `bearer sk-secretone-...`, and the Result kept it); and its base64 forms
    (`_base64_forms`). Cached per secret (a worker holds its keys' secrets anyway): built once,
    not once per answer."""
    cases = {secret, secret.lower(), secret.upper()}
    forms: set[str] = set()
    for case in cases:
        forms |= {case, json.dumps(case)[1:-1], json.dumps(case, ensure_ascii=False)[1:-1]}
    forms |= _base64_forms(secret)
    forms |= {form.replace("/", "\\/") for form in forms}
    for case in cases:
        for hex_format in ("\\u%04X", "\\u%04x"):
            forms.add("".join(c if c.isascii() and c.isalnum() else hex_format % ord(c) for c in case))
    return tuple(sorted(forms, key=len, reverse=True))


class StreamMask:
    """Masks a key's secret in an answer read in chunks cut anywhere (a relayed stream), as
    `body_fields` masks a whole body's bytes: the secret and its escaped forms (`_escaped_forms`,
    UTF-8) become MASK. A chunk's end that could begin a form is held back (`feed` returns the
    rest) until the next chunk shows whether it does; `end()` returns what is held when the answer
    ends. Without a secret, chunks pass as they are. Cost: one `bytes.replace` per form present and
    a scan of the chunk's last (longest form - 1) bytes."""

    def __init__(self, secret: str) -> None:
        self.forms = tuple(form.encode("utf-8") for form in _escaped_forms(secret)) if secret else ()
        self._reach = max((len(form) for form in self.forms), default=1) - 1  # the longest proper prefix
        self._starts = frozenset(form[0] for form in self.forms)
        self._held = b""

    def feed(self, chunk: bytes) -> bytes:
        """The bytes of `chunk` (after what was held) that can go out now, masked."""
        if not self.forms:
            return chunk
        data = self._held + chunk if self._held else chunk
        for form in self.forms:  # longest first: a form inside a longer one is masked with it
            if form in data:
                data = data.replace(form, MASK_BYTES)
        keep = 0
        for at in range(max(0, len(data) - self._reach), len(data)):
            if data[at] in self._starts and any(form.startswith(data[at:]) for form in self.forms):
                keep = len(data) - at
                break
        self._held = data[len(data) - keep:] if keep else b""
        return data[:len(data) - keep] if keep else data

    def end(self) -> bytes:
        """What is held back at the answer's end (a proper prefix of a form: not the secret)."""
        held, self._held = self._held, b""
        return held


def _base64_forms(secret: str) -> set[str]:
    """The base64 characters (standard and URL-safe alphabets) that only `secret`'s bytes
    determine, at each of the three byte offsets it can have inside longer encoded data (an
    upstream echoing `Basic <base64>` or an encoded request): base64 char i holds bits
    6i..6i+6, so the core runs from ceil(4*offset/3) to floor(4*(offset+n)/3). At most two
    partial characters at each end stay visible; cores under 8 characters are left out (too
    short to mask without hitting ordinary text)."""
    raw = secret.encode()
    forms: set[str] = set()
    for offset in range(3):
        start, end = -(-4 * offset // 3), 4 * (offset + len(raw)) // 3
        for encode in (base64.b64encode, base64.urlsafe_b64encode):
            core = encode(b"\0" * offset + raw).decode("ascii")[start:end]
            if len(core) >= 8:
                forms.add(core)
    return forms


def _mask_text(text: str, secret: str) -> str:
    """`text` with `secret` masked, also in the escaped forms of a JSON-ish body that does not
    parse (its `body` field still shows the secret to anyone who unescapes it)."""
    for form in _escaped_forms(secret):
        if form in text:
            text = text.replace(form, MASK)
    return text


def mask_parsed(value: Any, secret: str) -> Any:
    """`value` (parsed JSON) with `secret` replaced by MASK in every string and object key.

    Changes containers in place (they are freshly parsed) and walks them with a stack, so
    nesting as deep as json.loads accepts is fine; returns the value (a new one when `value`
    itself is a string)."""
    if isinstance(value, str):
        return value.replace(secret, MASK)
    stack = [value]
    while stack:
        node = stack.pop()
        if isinstance(node, dict):
            if any(secret in key for key in node):
                items = list(node.items())
                node.clear()
                node.update((key.replace(secret, MASK), item) for key, item in items)
            pairs = node.items()
        elif isinstance(node, list):
            pairs = enumerate(node)
        else:
            continue
        for where, item in list(pairs):
            if isinstance(item, str):
                if secret in item:
                    node[where] = item.replace(secret, MASK)
            elif isinstance(item, (dict, list)):
                stack.append(item)
    return value

