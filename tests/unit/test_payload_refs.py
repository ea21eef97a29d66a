"""Body references: the inline limit, a lossless split into bytes and back for every
encoding, a mismatching object refused, and dead letters that stay small."""

from __future__ import annotations

import base64
import hashlib
import json

import pytest

from ratefleet.runtime.bodies import (
    LETTER_BODY_BYTES,
    body_bytes,
    inline_limit,
    letter_response,
    object_name,
    with_body,
    without_body,
)
from ratefleet.schemas import BodyRef, ResponseInfo, Result
from ratefleet.schemas.errors import BodyUnavailable

BINARY = bytes(range(256)) * 4


def test_inline_limit_leaves_headroom_below_max_payload_and_never_passes_one_mib():
    assert inline_limit(1 << 20) == (1 << 20) - (64 << 10)
    assert inline_limit(8 << 20) == (1 << 20) - (64 << 10)
    assert inline_limit(256 << 10) == 192 << 10


@pytest.mark.parametrize("response, encoding", [
    (ResponseInfo(status=200, json={"data": [{"embedding": [0.1, -2.5e-7, 3, 1e300]}], "s": "é\"\n\u2028", "n": None}), "json"),
    (ResponseInfo(status=200, body="é" * 1000 + "\x00\ud7ff"), "text"),
    (ResponseInfo(status=200, body_b64=base64.b64encode(BINARY).decode()), "base64"),
])
def test_a_body_splits_into_bytes_and_comes_back_the_same(response, encoding):
    data, got = body_bytes(response)
    assert got == encoding
    ref = BodyRef(bucket="b", name="n", size=len(data), sha256=hashlib.sha256(data).hexdigest(), encoding=got)
    stripped = without_body(response, ref)
    assert body_bytes(stripped) is None and stripped.body_ref == ref
    back = with_body(stripped, data)
    assert back.model_dump(exclude={"body_ref"}) == response.model_dump(exclude={"body_ref"})
    # the wire form round-trips too
    again = ResponseInfo.model_validate_json(stripped.model_dump_json(by_alias=True))
    assert again.body_ref == ref


def test_the_object_holds_the_field_value_as_utf8():
    data, encoding = body_bytes(ResponseInfo(status=200, body_b64=base64.b64encode(BINARY).decode()))
    assert encoding == "base64" and base64.b64decode(data) == BINARY
    assert body_bytes(ResponseInfo(status=200, body="é")) == ("é".encode(), "text")
    assert body_bytes(ResponseInfo(status=200, json={"a": [1, "é"]})) == ('{"a":[1,"é"]}'.encode(), "json")


def test_an_object_that_does_not_match_its_reference_is_refused():
    data = b'{"a": 1}'
    ref = BodyRef(bucket="b", name="n", size=len(data), sha256=hashlib.sha256(data).hexdigest(), encoding="json")
    stripped = ResponseInfo(status=200, body_ref=ref)
    with pytest.raises(BodyUnavailable, match="does not match"):
        with_body(stripped, b'{"a": 2}')
    with pytest.raises(BodyUnavailable):
        with_body(stripped, data + b" ")


def test_a_dead_letter_leaves_a_large_body_out_and_keeps_a_small_one():
    big = ResponseInfo(status=500, headers={"content-type": "text/plain"}, body="x" * (LETTER_BODY_BYTES + 1))
    letter = letter_response(big)
    assert letter["body"] is None and "the job's Result holds" in letter["body_omitted"]
    assert letter["status"] == 500 and letter["headers"] == {"content-type": "text/plain"}
    assert len(json.dumps(letter)) < 1024
    small = ResponseInfo(status=500, json={"error": "boom"})
    assert letter_response(small)["json"] == {"error": "boom"}
    assert letter_response(None) is None


def test_object_names_are_per_job_and_per_body():
    assert object_name("job-1", "ab" * 32) == "job-1." + "ab" * 32
    result = Result(job_id="j", status="succeeded", response=ResponseInfo(status=200, body_b64="AAEC"))
    assert json.loads(result.to_json())["response"]["body_b64"] == "AAEC"
