"""The key's secret masked in a relayed stream as in a stored Result (workers/body.py `StreamMask`):
a gateway trial echoed the key in a streamed answer and the caller got it in clear, while the
Result of the same job had it masked."""

from __future__ import annotations

import json

import pytest

from ratefleet.workers.body import MASK, StreamMask, body_fields
from ratefleet.workers.relay import chunk_relay

SECRET = "sk-live/AAAA+BBBB-1234"
BODY = (b'data: {"choices":[{"delta":{"content":"echo: ' + SECRET.encode() + b'"}}]}\n\n'
        b'data: {"choices":[{"delta":{"content":"' + json.dumps(SECRET)[1:-1].replace("/", "\\/").encode()
        + b' and \\u0073k"}}]}\n\ndata: [DONE]\n\n')


def relayed(cuts: list[int], secret: str = SECRET, body: bytes = BODY) -> bytes:
    mask, out, start = StreamMask(secret), [], 0
    for cut in [*cuts, len(body)]:
        out.append(mask.feed(body[start:cut]))
        start = cut
    return b"".join(out) + mask.end()


def test_a_secret_cut_at_any_byte_is_masked_and_nothing_else_changes():
    whole = relayed([])
    assert SECRET.encode() not in whole and b"sk-live\\/AAAA" not in whole
    assert whole.count(MASK.encode()) == 2 and whole.endswith(b"data: [DONE]\n\n")
    for cut in range(1, len(BODY)):  # every place a chunk boundary can fall
        assert relayed([cut]) == whole, cut
    for size in (1, 2, 3, 7):  # and many small chunks
        assert relayed(list(range(size, len(BODY), size))) == whole, size


def test_the_relayed_bytes_are_masked_as_the_stored_result_is():
    stored = body_fields(BODY, "text/event-stream", SECRET)["body"]
    assert relayed(list(range(5, len(BODY), 5))).decode() == stored


def test_a_held_back_prefix_goes_out_with_the_next_chunk_or_at_the_end():
    mask = StreamMask(SECRET)
    assert mask.feed(b"data: sk-li") == b"data: "  # could begin the secret: held
    assert mask.feed(b"ke a word") == b"sk-like a word"  # it did not
    assert mask.feed(b"... sk") == b"... "
    assert mask.end() == b"sk"  # the answer ended: nothing to wait for


def test_without_a_secret_chunks_pass_unchanged():
    mask = StreamMask("")
    assert mask.feed(b"data: sk") == b"data: sk" and mask.end() == b""


class Recorder:
    def __init__(self) -> None:
        self.sent: list[bytes] = []

    async def publish(self, subject: str, payload: bytes, headers: dict) -> None:
        self.sent.append(payload)


@pytest.mark.anyio
async def test_the_relay_publishes_masked_chunks_and_its_held_bytes_at_the_end():
    from ratefleet.schemas import Job
    job = Job.model_validate({"request": {"path": "/v1/chat/completions", "json": {"model": "m", "stream": True}}})
    nc = Recorder()
    relay = chunk_relay(nc, "_INBOX.abc.r", 1, job, SECRET)
    for cut in range(0, len(BODY), 9):
        await relay(BODY[cut:cut + 9])
    await relay.end()
    assert b"".join(nc.sent) == relayed([]) and SECRET.encode() not in b"".join(nc.sent)
    assert all(nc.sent)  # nothing empty is published


@pytest.mark.parametrize("content_type", ["text/plain", "application/json"])
def test_a_secret_echoed_all_lower_or_upper_case_is_masked_stored_and_streamed(content_type):
    """An operations trial's upstream answered 422 `key was <secret> ... lower bearer <secret in
    lower case>`: the exact echo was masked, the lower-cased one was stored in the Result."""
    secret = "sk-SecretOne-AAAA1111"
    text = f"key {secret}, lower bearer {secret.lower()}, upper {secret.upper()}, other sk-secretone-aaaa1112"
    raw = json.dumps({"error": text}).encode() if content_type == "application/json" else text.encode()
    fields = body_fields(raw, content_type, secret)
    shown = json.dumps(fields)
    assert secret.lower() not in shown and secret.upper() not in shown and secret not in shown
    assert shown.count(MASK) == 3 and "sk-secretone-aaaa1112" in shown  # a different value is left alone
    streamed = relayed([7, 30, 31], secret, raw)
    assert secret.lower().encode() not in streamed and secret.upper().encode() not in streamed
    assert streamed.count(MASK.encode()) == 3
