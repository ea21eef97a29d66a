"""Reading an upstream body as bytes (capped) and turning it into `ResponseInfo` fields.

Sizes are bytes, never characters. The body lands in exactly one field:

    JSON content type (`*/json`, `*+json`) whose text parses strictly  -> `json`
    textual content type whose charset (default UTF-8) decodes cleanly   -> `body`
    anything else (audio/mpeg, image/png, octet-stream, bad charset)     -> `body_b64`

"Strictly" means RFC 8259 JSON: `NaN`/`Infinity` (which Python's json accepts) make the
body text, so a stored Result never rewrites a value. The key's secret is masked wherever
the upstream echoes it: in the bytes (any content type) and in the decoded text (charsets
in which the secret's bytes differ from UTF-8).
"""

from __future__ import annotations

import base64
import codecs
import json
import re
from email.message import Message
from typing import Any

import httpx

from schemas.wire import json_problem, text_problem

# subtypes that are text whatever the main type says (RFC 6838 structured suffixes included)
TEXT_SUBTYPES = frozenset({"json", "xml", "javascript", "ecmascript", "x-www-form-urlencoded", "x-ndjson",
                           "ndjson", "csv", "yaml", "x-yaml", "html", "sql", "graphql"})
MASK = "***"


async def read_capped(response: httpx.Response, cap: int) -> bytes | None:
    """The whole body of a streamed response, or None once it passes `cap` bytes.

    Reading stops at the first chunk past the cap, so at most `cap` plus one chunk is ever
    held in memory; the caller closes the response (dropping the rest of the body).
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
    return b"".join(parts)


def media_type(content_type: str | None) -> tuple[str, str | None]:
    """(`type/subtype` in lower case, charset or None) of a Content-Type value (RFC 9110 8.3)."""
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


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def _decode(raw: bytes, charset: str) -> str | None:
    try:
        codecs.lookup(charset)
        return raw.decode(charset)
    except (LookupError, UnicodeDecodeError, ValueError):
        return None


def body_fields(raw: bytes, content_type: str | None, secret: str) -> dict[str, Any]:
    """The `ResponseInfo` body field for `raw`: {"json": v}, {"body": s}, {"body_b64": s} or {}."""
    if secret:
        raw = raw.replace(secret.encode("utf-8"), MASK.encode())
    if not raw:
        return {}
    kind, charset = media_type(content_type)
    text = _decode(raw, charset or "utf-8") if is_textual(kind, charset) else None
    if text is None:
        return {"body_b64": base64.b64encode(raw).decode("ascii")}
    if text_problem(text):  # a codec such as unicode_escape can make lone surrogates: not storable text
        return {"body_b64": base64.b64encode(raw).decode("ascii")}
    if secret and secret in text:
        text = text.replace(secret, MASK)
    if "json" in kind.partition("/")[2]:
        try:
            value = json.loads(text, parse_constant=_reject_constant)
            if not _suspect(text) or json_problem(value) is None:
                return {"json": value}
        except (ValueError, RecursionError):
            pass
    return {"body": text}


# a \uD800-\uDFFF escape (maybe a lone surrogate) or an exponent past a float's range (1e309
# parses as inf): rare in answers, so only then is the parsed value walked (a walk of a 3 MB
# answer costs a few hundred ms; these scans a few)
_SUSPECT = re.compile(r"\\u[dD][89a-fA-F]|[0-9.][eE]\+?0*(?:[4-9][0-9]{2}|3[1-9][0-9]|30[89]|[0-9]{4})")


def _suspect(text: str) -> bool:
    """True when parsed JSON text may hold what cannot be stored as JSON again (see _SUSPECT)."""
    return _SUSPECT.search(text) is not None
