"""Upstream bodies as bytes: content type decides the field, sizes are bytes, the cap ends
the job after one read, and an echoed key is masked in every form."""

from __future__ import annotations

import base64
import json
import re

import httpx
import pytest

from ratefleet.schemas import ErrorCode, Job, UpstreamConfig
from ratefleet.workers.body import body_fields, media_type
from ratefleet.workers.executor import UpstreamExecutor

SECRET = "sk-test-SECRET-123456"
UPSTREAM = UpstreamConfig(base_url="https://api.example.test")
BINARY = bytes(range(256)) * 4  # 1 KiB, invalid UTF-8 (0x80.. lone continuation bytes)


def job() -> Job:
    return Job.model_validate({"request": {"path": "/v1/x", "json": {"m": 1}}})


@pytest.mark.parametrize("content_type", ["audio/mpeg", "image/png", "application/octet-stream", "application/pdf"])
def test_binary_types_come_back_byte_exact_as_base64(content_type):
    fields = body_fields(BINARY, content_type, SECRET)
    assert list(fields) == ["body_b64"] and base64.b64decode(fields["body_b64"]) == BINARY


def test_binary_type_stays_base64_even_when_its_bytes_are_ascii():
    assert body_fields(b"ID3 plain ascii", "audio/mpeg", SECRET) == {"body_b64": base64.b64encode(b"ID3 plain ascii").decode()}


@pytest.mark.parametrize("raw, content_type, expected", [
    ('{"a": "é"}'.encode(), "application/json", {"json": {"a": "é"}}),
    (b'{"a": 1}', "application/problem+json; charset=utf-8", {"json": {"a": 1}}),
    (b'{"a": NaN}', "application/json", {"body": '{"a": NaN}'}),          # not RFC 8259 JSON: kept as text
    (b'{"a": Infinity}', "application/json", {"body": '{"a": Infinity}'}),
    (b"{broken", "application/json", {"body": "{broken"}),
    ("café".encode("latin-1"), "text/plain; charset=ISO-8859-1", {"body": "café"}),
    ("日本".encode("utf-16"), "text/plain; charset=utf-16", {"body": "日本"}),
    ("é".encode(), None, {"body": "é"}),                                    # no type: text when it decodes
    (b"<a/>", "application/xml", {"body": "<a/>"}),
    (b"", "application/json", {}),
])
def test_text_and_json_only_when_they_decode_and_parse(raw, content_type, expected):
    assert body_fields(raw, content_type, SECRET) == expected


@pytest.mark.parametrize("raw, content_type", [
    ("café".encode("latin-1"), "text/plain"),           # says UTF-8 (default), is not
    (b"hello", "text/plain; charset=no-such-charset"),  # unknown charset
    (BINARY, "application/json"),                       # JSON type, undecodable bytes
])
def test_a_body_that_does_not_decode_is_kept_losslessly(raw, content_type):
    assert base64.b64decode(body_fields(raw, content_type, SECRET)["body_b64"]) == raw


def test_media_type_reads_the_charset_parameter():
    assert media_type('Text/Plain; Charset="Latin-1"') == ("text/plain", "Latin-1")
    assert media_type(None) == ("", None)


@pytest.mark.parametrize("raw, content_type, field", [
    (json.dumps({"error": f"bad key {SECRET}"}).encode(), "application/json", "json"),
    (f"bad key {SECRET}".encode(), "text/plain", "body"),
    (f"bad key {SECRET}".encode("utf-16"), "text/plain; charset=utf-16", "body"),
    (BINARY + SECRET.encode() + BINARY, "application/octet-stream", "body_b64"),
])
def test_an_echoed_secret_is_masked_in_every_form(raw, content_type, field):
    fields = body_fields(raw, content_type, SECRET)
    shown = base64.b64decode(fields[field]) if field == "body_b64" else json.dumps(fields[field], ensure_ascii=False)
    assert (SECRET.encode() not in shown) if field == "body_b64" else (SECRET not in shown)
    assert (b"***" in shown) if field == "body_b64" else ("***" in shown)


def executor(handler, cap: int = 64 << 20) -> UpstreamExecutor:
    return UpstreamExecutor(httpx.AsyncClient(transport=httpx.MockTransport(handler)), cap)


@pytest.mark.anyio
async def test_two_mib_of_non_ascii_text_comes_back_whole():
    text = "é" * (1_100_000)  # 2.2 MB, 1.1 M characters: past the former 1 M-character cut

    result = await executor(lambda r: httpx.Response(200, content=text.encode(), headers={
        "content-type": "text/plain; charset=utf-8"})).call(job(), UPSTREAM, SECRET)
    assert result.kind == "ok" and result.response.body == text


@pytest.mark.anyio
@pytest.mark.parametrize("with_length", [True, False])
async def test_a_body_past_max_response_bytes_ends_the_job_without_reading_on(with_length):
    sent = []

    async def chunks():
        for _ in range(64):  # 64 x 64 KiB = 4 MiB offered
            sent.append(1)
            yield b"x" * 65536

    def handler(request):
        headers = {"content-type": "application/json", "x-ratelimit-remaining-requests": "9"}
        if with_length:
            return httpx.Response(200, content=b"x" * (4 << 20), headers=headers)
        return httpx.Response(200, content=chunks(), headers=headers)

    result = await executor(handler, cap=1 << 20).call(job(), UPSTREAM, SECRET)
    assert result.code == ErrorCode.RESPONSE_TOO_LARGE and result.kind == "bad_request"
    assert result.response.status == 200 and result.response.headers["content-type"] == "application/json"
    assert result.response.json_body is None and result.response.body is None and result.response.body_b64 is None
    assert "1048576 bytes" in result.error and result.ratelimit.remaining_requests == 9.0
    if not with_length:
        assert len(sent) <= 17  # stopped at the first chunk past 1 MiB, not after 4 MiB


@pytest.mark.anyio
async def test_a_body_exactly_at_the_cap_is_kept():
    result = await executor(lambda r: httpx.Response(200, content=BINARY, headers={"content-type": "image/png"}),
                            cap=len(BINARY)).call(job(), UPSTREAM, SECRET)
    assert result.code is None and base64.b64decode(result.response.body_b64) == BINARY
    assert result.response.headers["content-type"] == "image/png"


@pytest.mark.parametrize("prefix", [b"", b"u", b"us", b"user:", b"Bearer "])
@pytest.mark.parametrize("encode", [base64.b64encode, base64.urlsafe_b64encode])
@pytest.mark.parametrize("content_type", ["text/plain", "application/json"])
def test_an_echoed_secret_is_masked_in_base64_at_any_offset(prefix, encode, content_type):
    # an upstream echoing `Authorization: Basic <base64 of user:key>` (or any encoded request)
    # showed the key to anyone who decoded the stored body (a break-it trial)
    encoded = encode(prefix + SECRET.encode() + b"!tail").decode("ascii")
    raw = (json.dumps({"echo": encoded}) if content_type == "application/json" else f"auth={encoded}").encode()
    fields = body_fields(raw, content_type, SECRET)
    shown = json.dumps(fields, ensure_ascii=False)
    assert encoded not in shown and "***" in shown
    decoded = _decoded_runs(shown)  # every base64-looking run, at every alignment
    assert SECRET[:8].encode() not in decoded and SECRET[-8:].encode() not in decoded


def _decoded_runs(text: str) -> bytes:
    out = b""
    for run in re.findall(r"[A-Za-z0-9+/_-]{4,}", text):
        for cut in range(4):
            piece = run[cut:][: (len(run) - cut) // 4 * 4]
            for decode in (base64.b64decode, base64.urlsafe_b64decode):
                try:
                    out += decode(piece) + b"|"
                except ValueError:
                    pass
    return out
