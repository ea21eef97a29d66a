"""What can go on the wire: HTTP field syntax (RFC 9110) and JSON values (RFC 8259).

Every check returns a readable reason (or None) instead of raising, so the Job model can
name the field path and the caller can choose the error code. The rules:

- A header name is a `token` (RFC 9110 section 5.1 field-name = token; 5.6.2 tchar):
  letters, digits and ``!#$%&'*+-.^_`|~``; no space, no ':'.
- A header value is a `field-value` (RFC 9110 section 5.5): visible ASCII, SP and HTAB
  inside, obs-text (U+0080..U+00FF, sent as one latin-1 byte each); no CR, LF, NUL or
  other controls, no leading or trailing whitespace. Anything above U+00FF cannot be
  sent in a header at all (percent-encode it, or put it in the body).
- A JSON value is null, a boolean, a finite number, a string, an array or an object with
  string keys (RFC 8259 section 6: NaN and Infinity are not permitted). Strings must be
  encodable as UTF-8 (RFC 8259 section 8.1), so no lone UTF-16 surrogates (U+D800..U+DFFF).
  Nesting is capped at `MAX_JSON_DEPTH`; integers at what Python writes (4300 digits by
  default, `sys.get_int_max_str_digits`).
"""

from __future__ import annotations

import json
import math
import re
from itertools import chain
from typing import Any

MAX_JSON_DEPTH = 100  # arrays/objects inside each other; pydantic-core stops serialising near 255
_TOKEN = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
_SURROGATE = re.compile("[\ud800-\udfff]")
_SURROGATE_ESCAPE = re.compile(r"\\u[dD][89a-fA-F]")  # in JSON text: a \uXXXX escape of a UTF-16 surrogate


def is_field_name(name: str) -> bool:
    """True when `name` is an RFC 9110 token (section 5.6.2), i.e. a valid header name."""
    return _TOKEN.fullmatch(name) is not None


def find_surrogate(text: str, surrogates: re.Pattern[str] | None = None) -> re.Match[str] | None:
    """The first match in `text` of `surrogates` (a class of UTF-16 surrogate code points,
    U+D800-U+DFFF by default, or part of it), or None. An ASCII text (a flag of the string: no scan) or
    one that encodes as UTF-8 holds none; only a text that fails to encode is searched (the
    regex costs about 11 ns a character, 360 µs for 32 KiB)."""
    if text.isascii():
        return None
    try:
        text.encode("utf-8")
        return None
    except UnicodeEncodeError:
        return (surrogates or _SURROGATE).search(text)


def text_problem(text: str) -> str | None:
    """Why `text` cannot be encoded as UTF-8 (a lone surrogate), or None."""
    found = find_surrogate(text)
    if found is None:
        return None
    return (f"contains a lone UTF-16 surrogate U+{ord(found.group()):04X} at character {found.start()}, "
            "which is not valid Unicode text and cannot be encoded as UTF-8")


def header_value_problem(value: str) -> str | None:
    """Why `value` is not an RFC 9110 field-value (section 5.5), or None."""
    for index, char in enumerate(value):
        code = ord(char)
        if char in "\r\n":
            return f"contains a line break at character {index}"
        if code > 0xFF:
            return (f"contains {char!r} (U+{code:04X}) at character {index}: header values are ASCII "
                    "(RFC 9110 section 5.5; obs-text up to U+00FF at most); percent-encode it or send it in the body")
        if (code < 0x20 and char != "\t") or code == 0x7F:
            return f"contains the control character U+{code:04X} at character {index}"
    if value[:1] in (" ", "\t") or value[-1:] in (" ", "\t"):
        return "starts or ends with whitespace (RFC 9110 section 5.5 field values do not)"
    return None


def json_problem(value: Any, where: str = "$") -> str | None:
    """The first reason `value` is not a JSON value that can be sent as UTF-8, with its
    path (``$.messages[0].content``), or None.

    The verdict comes from the encoder the worker uses (`json.dumps`, strict: C speed, a
    few ms per MiB) plus a walk over the containers only, for the depth; the slow walk that
    names the path runs only for a value that fails. Object keys that are numbers, booleans
    or null are accepted: JSON encoders write them as strings."""
    try:
        text = json.dumps(value, ensure_ascii=False, allow_nan=False)
        text.encode("utf-8")
    except (ValueError, TypeError, RecursionError) as exc:  # UnicodeEncodeError is a ValueError
        return _describe(value, where, 0) or f"{_short(where)} cannot be written as JSON ({type(exc).__name__}: {exc})"
    # every array/object opens with one bracket (brackets inside strings only add to the count),
    # so a text with no more than MAX_JSON_DEPTH of them cannot nest deeper: no walk needed
    return depth_problem(value, where) if text.count("[") + text.count("{") > MAX_JSON_DEPTH else None


class _NotStrict(ValueError):
    """Raised inside `read_json`'s parse: the text holds a value `json_problem` may refuse."""


def _finite(text: str) -> float:
    value = float(text)
    if value - value != 0:  # inf: the literal overflows a 64-bit float (1e999)
        raise _NotStrict(text)
    return value


def _no_constant(name: str) -> float:
    raise _NotStrict(name)  # NaN, Infinity, -Infinity: Python's parser takes them, RFC 8259 does not


_STRICT_DECODER = json.JSONDecoder(parse_float=_finite, parse_constant=_no_constant)  # (json.loads builds one a call)


def loads_finite(text: str) -> tuple[Any, bool]:
    """`json.loads(text)`, but NaN, Infinity and number literals that overflow a float
    (`1e999`) raise ValueError, as text that is not JSON does (RFC 8259 section 6 has no such
    numbers); and whether the value is strict JSON but for its depth (True unless a string
    escape is a UTF-16 surrogate, even one of a valid pair: then `json_problem` decides).
    `text` itself must hold no lone surrogate (`text_problem`): a str decoded from UTF-8
    cannot (`read_json`), one from elsewhere is checked first (workers/body.py).
    Raises ValueError, RecursionError."""
    value = _STRICT_DECODER.decode(text)
    # (a one-character `in` is a memchr; a two-character one took 27 µs for 32 KiB, the regex 10)
    return value, "\\" not in text or _SURROGATE_ESCAPE.search(text) is None


def read_json(raw: bytes) -> tuple[Any, bool]:
    """`json.loads(raw)`, and whether the value is known to be strict JSON except for its
    depth (`strict`). Then `depth_problem` is all `json_problem` would still find, and the
    encoder pass `json_problem` makes (a few ms per MiB, on every job) is saved.

    Strict when, parsing UTF-8 text (the codec refuses encoded surrogates): no number is
    NaN, Infinity or overflows to infinity (the parser's `parse_constant`/`parse_float`
    hooks), and no string escape is a UTF-16 surrogate (none, or a `\\uD800`-`\\uDFFF`
    escape anywhere, even one of a valid pair: such a text takes the full check). Anything
    else gives `json.loads(raw)` as ever, with `strict` False, and so do the errors: raises
    what `json.loads(raw)` raises (ValueError, RecursionError)."""
    try:
        return loads_finite(raw.decode("utf-8"))  # (a value with a surrogate escape is json.loads')
    except ValueError:  # _NotStrict, not UTF-8, not JSON (then json.loads(raw) raises it)
        pass
    return json.loads(raw), False


def depth_problem(value: Any, where: str = "$") -> str | None:
    """`json_problem` of a value `read_json` found strict: arrays/objects nested more than
    MAX_JSON_DEPTH levels, with the path, or None."""
    return _describe(value, where, 0) if _too_deep(value) else None


def _too_deep(value: Any) -> bool:
    """True when arrays/objects nest more than MAX_JSON_DEPTH levels. Breadth first, no
    recursion, and at C speed where it can (a level of scalars is dismissed by its types)."""
    level, depth = [value], 0
    while level:
        kinds = {kind for kind in set(map(type, level)) if issubclass(kind, (list, tuple, dict))}
        if not kinds:
            return False
        depth += 1
        if depth > MAX_JSON_DEPTH:
            return True
        containers = [item for item in level if type(item) in kinds]
        level = list(chain.from_iterable(item.values() if isinstance(item, dict) else item for item in containers))
    return False


def _describe(value: Any, where: str, depth: int) -> str | None:
    """The first problem in `value` with its path (the slow walk; see json_problem)."""
    if value is None or isinstance(value, (bool, str)):
        problem = text_problem(value) if isinstance(value, str) else None
        return f"{_short(where)} {problem}" if problem else None
    if isinstance(value, int):
        try:
            str(value)
        except ValueError as exc:  # more digits than Python writes (sys.get_int_max_str_digits)
            return f"{_short(where)} is an integer of {value.bit_length()} bits, too large to write ({exc})"
        return None
    if isinstance(value, float):
        if math.isfinite(value):
            return None
        return (f"{_short(where)} is {value!r} (NaN or Infinity, or a number too large for a 64-bit float), "
                "which JSON cannot carry (RFC 8259 section 6)")
    if isinstance(value, (list, tuple, dict)):
        if depth >= MAX_JSON_DEPTH:
            return f"{_short(where)} is nested more than {MAX_JSON_DEPTH} levels deep"
        if isinstance(value, dict):
            return _object_problem(value, where, depth)
        for index, item in enumerate(value):
            problem = _describe(item, f"{where}[{index}]", depth + 1)
            if problem:
                return problem
        return None
    return (f"{_short(where)} is a {type(value).__name__}, not a JSON value "
            "(null, boolean, number, string, array, object)")


def _short(where: str, limit: int = 60) -> str:
    return where if len(where) <= limit else f"{where[:limit - 24]}...{where[-20:]}"


def _object_problem(value: dict[Any, Any], where: str, depth: int) -> str | None:
    for key, item in value.items():
        if not isinstance(key, (str, int, float, bool)) and key is not None:
            return f"{_short(where)} has the key {key!r:.40} ({type(key).__name__}); JSON object keys are strings"
        key = key if isinstance(key, str) else json.dumps(key)
        problem = text_problem(key)
        if problem:
            return f"{_short(where)} has a key that {problem}"
        problem = _describe(item, f"{where}.{key}" if key.isidentifier() else f"{where}[{key!r}]", depth + 1)
        if problem:
            return problem
    return None


def json_safe(value: Any, depth: int = 0) -> Any:
    """A copy of `value` that always serialises as strict JSON, for dead letters and logs:
    lone surrogates become ``\\udXXX`` text, NaN/Infinity their names as strings, other
    types their repr, and nesting past MAX_JSON_DEPTH a marker string."""
    if isinstance(value, int) and not isinstance(value, bool) and value.bit_length() > 14_000:
        return f"<integer of {value.bit_length()} bits>"  # (about Python's 4300-digit limit of str())
    if value is None or isinstance(value, (bool, int)):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else repr(value)
    if isinstance(value, str):
        return value if text_problem(value) is None else value.encode("utf-8", "backslashreplace").decode("utf-8")
    if depth >= MAX_JSON_DEPTH and isinstance(value, (list, tuple, dict)):
        return f"<nested more than {MAX_JSON_DEPTH} levels>"
    if isinstance(value, (list, tuple)):
        return [json_safe(item, depth + 1) for item in value]
    if isinstance(value, dict):
        return {json_safe(str(key)): json_safe(item, depth + 1) for key, item in value.items()}
    return json_safe(repr(value))


def dumps_safe(value: Any) -> bytes:
    """`value` as strict UTF-8 JSON bytes, whatever it holds (see `json_safe`)."""
    return json.dumps(json_safe(value), ensure_ascii=False, allow_nan=False).encode("utf-8")
