"""How an upstream body becomes a Result's body field (workers/body.py): the byte cap of
`read_capped` (declared and streamed), which media types are text, strict JSON (a value JSON
cannot store again makes the body text), and the key's secret masked in escapes only the
parsed value shows. Deterministic, no network (httpx responses built in memory).
"""

from __future__ import annotations

import base64
import json
from types import SimpleNamespace

import httpx
import pytest

from ratefleet.workers import body as body_module
from ratefleet.workers.body import body_fields, is_textual, mask_parsed, media_type, read_capped

SECRET = "sk-a+b/c-123456"


def streamed(*chunks: bytes, length: str | None = None) -> httpx.Response:
    """A response whose body arrives as `chunks` (no Content-Length unless `length`)."""

    async def body():
        for chunk in chunks:
            yield chunk

    headers = {"content-length": length} if length is not None else {}
    return httpx.Response(200, content=body(), headers=headers)


# -- read_capped ----------------------------------------------------------------------------


@pytest.mark.anyio
@pytest.mark.parametrize("chunks, cap, expected", [
    ((b"ab", b"cd"), 4, b"abcd"),     # exactly at the cap over two chunks: kept
    ((b"ab", b"cd"), 3, None),        # one byte past it, counted over the chunks
    ((b"abcd",), 4, b"abcd"),
    ((b"abcde",), 4, None),
    ((b"a", b"b", b"c"), 2, None),    # every chunk is counted, not only the last
    ((), 0, b""),
])
async def test_the_cap_counts_every_streamed_byte(chunks, cap, expected):
    assert await read_capped(streamed(*chunks), cap) == expected


@pytest.mark.anyio
async def test_a_declared_length_past_the_cap_stops_before_reading():
    # the header says 100 bytes: refused at once, whatever the (here shorter) body holds
    assert await read_capped(streamed(b"ab", length="100"), 10) is None
    assert await read_capped(streamed(b"ab", length="10"), 10) == b"ab"  # exactly the cap is kept
    assert await read_capped(streamed(b"ab", length="abc"), 10) == b"ab"  # not a number: the bytes decide


@pytest.mark.anyio
async def test_each_chunk_within_the_cap_is_handed_on_as_it_is_read():
    seen: list[bytes] = []

    async def sink(chunk: bytes) -> None:
        seen.append(chunk)

    assert await read_capped(streamed(b"data: 1\n\n", b"data: 2\n\n"), 100, sink) == b"data: 1\n\ndata: 2\n\n"
    assert seen == [b"data: 1\n\n", b"data: 2\n\n"]
    seen.clear()
    assert await read_capped(streamed(b"12345", b"67890"), 7, sink) is None
    assert seen == [b"12345"]  # the chunk past the cap is not relayed


# -- media types ------------------------------------------------------------------------------


@pytest.mark.parametrize("kind, charset, textual", [
    ("", None, True),                                  # no type: text if it decodes
    ("application/octet-stream", "utf-8", True),       # a declared charset means text
    ("application/octet-stream", None, False),
    ("image/png", None, False),
    ("audio/mpeg", None, False),
    ("text/plain", None, True),
    ("text/x-unknown", None, True),
    ("application/json", None, True),
    ("application/csv", None, True),
    ("application/vnd.api+json", None, True),
    ("application/atom+xml", None, True),
    ("application/vnd.x+zip", None, False),
])
def test_which_media_types_are_text(kind, charset, textual):
    assert is_textual(kind, charset) is textual


def test_media_type_without_a_value_or_with_an_empty_charset():
    assert media_type("") == ("", None)
    assert media_type('text/plain; charset=""') == ("text/plain", None)
    assert media_type("Application/JSON") == ("application/json", None)


# -- body_fields ------------------------------------------------------------------------------


@pytest.mark.parametrize("raw, content_type, expected", [
    # a lone surrogate escape parses, but cannot be stored as JSON: the text is kept
    (b'{"a": "\\ud800"}', "application/json", {"body": '{"a": "\\ud800"}'}),
    # a number past a float's range parses as inf: the text is kept
    (b'{"a": 1e309}', "application/json", {"body": '{"a": 1e309}'}),
    # a surrogate pair and a large finite number are good JSON
    (b'{"a": "\\ud83d\\ude00", "b": 1e308}', "application/json", {"json": {"a": "\U0001F600", "b": 1e308}}),
    (b'{"a": 1}', "application/vnd.api+json", {"json": {"a": 1}}),
    (b'{"a": 1}', "text/plain", {"body": '{"a": 1}'}),   # JSON text, not a JSON type
])
def test_strict_json_or_text(raw, content_type, expected):
    assert body_fields(raw, content_type, SECRET) == expected


@pytest.mark.parametrize("raw, expected", [
    (b'{"a": -1e309}', {"body": '{"a": -1e309}'}),  # -inf
    (b'{"a": 1' + b"0" * 400 + b'.5}', {"body": '{"a": 1' + "0" * 400 + '.5}'}),  # past range with no exponent
    (b'{"a": [NaN]}', {"body": '{"a": [NaN]}'}),
    (b'{"e1000": "1e1000", "v": 2.5e-400}', {"json": {"e1000": "1e1000", "v": 0.0}}),  # in a string; underflow is 0
    (b'{"\\udc00": 1}', {"body": '{"\\udc00": 1}'}),  # a lone surrogate in a key
])
def test_what_cannot_be_stored_as_json_again_is_kept_as_text(raw, expected):
    assert body_fields(raw, "application/json", SECRET) == expected


def test_a_clean_answer_is_neither_walked_nor_scanned_character_by_character(monkeypatch):
    """A 32 KiB answer took 660-820 µs here, mostly two regex scans at ~11 ns a character (for a
    lone surrogate, and for a float past range): now its parse decides, and only a text with a
    surrogate escape is walked (json_problem)."""
    from ratefleet.schemas import wire

    def refuse(*_args, **_kwargs):
        raise RuntimeError("walked or scanned")

    monkeypatch.setattr(body_module, "json_problem", refuse)
    monkeypatch.setattr(wire, "_SURROGATE", SimpleNamespace(search=refuse))
    text = json.dumps({"choices": [{"message": {"content": "lörem ipsum \n 😀 " * 2000}}], "n": 1.5e300},
                      ensure_ascii=False)  # escapes (the newline's), none of a surrogate
    assert body_fields(text.encode(), "application/json", SECRET)["json"]["n"] == 1.5e300
    with pytest.raises(RuntimeError, match="walked"):  # a surrogate escape: the walk decides
        body_fields(b'{"a": "\\ud83d\\ude00"}', "application/json", SECRET)


def test_a_codec_that_makes_a_lone_surrogate_keeps_the_bytes():
    raw = b"x \\ud800 y"
    assert body_fields(raw, "text/plain; charset=unicode_escape", SECRET) == {
        "body_b64": base64.b64encode(raw).decode()}


@pytest.mark.parametrize("text", [
    '{"error": "bad key sk-a\\u002Bb/c-123456"}',            # only `+` escaped (.NET)
    '{"error": "bad key sk-a+b\\/c-123456"}',                 # only `/` escaped (PHP)
    '{"bad key sk-a\\u002bb\\/c-123456": 1}',                 # in an object key, mixed escapes
    '[["sk-a\\u002Bb/c-123456"]]',
])
def test_a_partly_escaped_secret_is_masked_in_the_parsed_json(text):
    fields = body_fields(text.encode(), "application/json", SECRET)
    shown = json.dumps(fields["json"])
    assert SECRET not in shown and "***" in shown


def test_a_secret_is_masked_in_the_bytes_of_any_type():
    raw = b"\x00\xff" + SECRET.encode() + b"\xfe"
    fields = body_fields(raw, "application/octet-stream", SECRET)
    assert base64.b64decode(fields["body_b64"]) == b"\x00\xff***\xfe"


def test_mask_parsed_masks_keys_and_strings_and_leaves_the_rest():
    value = {"a": [1, None, True, {"k": f"x{SECRET}y"}], f"{SECRET}": "v", "n": 2.5, "plain": "ok"}
    assert mask_parsed(value, SECRET) == {"a": [1, None, True, {"k": "x***y"}], "***": "v", "n": 2.5, "plain": "ok"}
    assert mask_parsed([1, 2, [SECRET]], SECRET) == [1, 2, ["***"]]
    assert mask_parsed(f"{SECRET}!", SECRET) == "***!"
    # a number before a list: the walk goes on past values that are not containers
    assert mask_parsed({"n": 1, "l": [f"{SECRET}"]}, SECRET) == {"n": 1, "l": ["***"]}


def test_a_declared_charset_makes_any_type_text():
    assert body_fields(b"hi", "application/octet-stream; charset=utf-8", SECRET) == {"body": "hi"}
    assert body_fields(b"hi", "application/octet-stream", SECRET) == {"body_b64": "aGk="}
