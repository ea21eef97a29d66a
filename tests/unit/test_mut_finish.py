"""Ending a job (ratefleet/runtime/finish.py), the parts the mutation run found unguarded:
large bodies moved to the Object Store before the Result that names them, the reply of a
job that had its Result already, dead letters (reason, masking, last error), naks with a
delay, finishing a job whose Result is stored already, and the auth header names.

Over a fake NATS connection and JetStream context that keep what is published per
subject and an in-memory object store, so every assertion is on what a consumer of the
streams would read. Deterministic, no server.
"""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
from nats.js.errors import NotFoundError

from ratefleet.runtime.bodies import inline_limit
from ratefleet.runtime.finish import Finisher, _may_be_large, auth_headers
from ratefleet.schemas import Config, ErrorInfo, ResponseInfo, Result, Subjects

pytestmark = pytest.mark.anyio
ACK = "$JS.ACK.RATEFLEET_JOBS.d.1.7.7.0.1"
REPLY = "_INBOX.caller.1"
SUBJECTS = Subjects()
SMALL_PAYLOAD = 70_000  # the server's max_payload in these tests: inline_limit 4464 bytes
LIMIT = inline_limit(SMALL_PAYLOAD)


class FakeObjectStore:
    def __init__(self, log: list):
        self.log, self.objects = log, {}

    async def get_info(self, name):
        if name not in self.objects:
            raise NotFoundError
        return SimpleNamespace(size=len(self.objects[name]))

    async def put(self, name, data):
        self.log.append(("object-put", name))
        self.objects[name] = bytes(data)


class FakeJetStream:
    """Keeps the last message per subject (as the results stream does); `held` are Results
    stored before the test (a publish to their subject is a duplicate)."""

    def __init__(self, log: list, held: dict[str, bytes] | None = None):
        self.log, self.messages, self.buckets = log, dict(held or {}), {}

    async def publish(self, subject, payload, headers=None, timeout=None):
        duplicate = subject in self.messages and subject.startswith(SUBJECTS.results(None, "")[:-6])
        self.log.append(("publish", subject))
        if not duplicate:
            self.messages[subject] = bytes(payload)
        return SimpleNamespace(duplicate=duplicate)

    async def get_last_msg(self, stream, subject):
        self.log.append(("read", stream, subject))
        if subject not in self.messages:
            raise NotFoundError
        return SimpleNamespace(data=self.messages[subject])

    async def object_store(self, bucket):
        self.log.append(("open-bucket", bucket))
        return self.buckets.setdefault(bucket, FakeObjectStore(self.log))


class FakeNats:
    def __init__(self, log: list, max_payload: int = 1 << 20):
        self.log, self.max_payload, self.sent = log, max_payload, []

    async def publish(self, subject, payload=b"", **_):
        self.log.append(("nats", subject))
        self.sent.append((subject, payload))


def finisher(max_payload: int = 1 << 20, held: dict[str, bytes] | None = None,
             mask: frozenset[str] = frozenset()) -> tuple[Finisher, FakeNats, FakeJetStream, list]:
    log: list = []
    nc, js = FakeNats(log, max_payload), FakeJetStream(log, held)
    return Finisher(nc, js, SUBJECTS, mask_headers=mask), nc, js, log


def text_result(body: str, job_id: str = "j1", batch: str | None = None) -> Result:
    return Result(job_id=job_id, batch=batch, status="succeeded", tier="normal", attempts=1,
                  response=ResponseInfo(status=200, body=body))


def stored(js: FakeJetStream, job_id: str = "j1", batch: str | None = None) -> dict:
    return json.loads(js.messages[SUBJECTS.results(batch, job_id)])


# --- bodies too large to travel inside the Result ---------------------------------------

async def test_a_body_larger_than_the_limit_goes_to_the_bucket_before_the_result_naming_it():
    f, nc, js, log = finisher(SMALL_PAYLOAD)
    body = "é" * LIMIT  # 2 bytes a character: twice the limit
    assert await f.finish(text_result(body), ack=ACK, reply_to=REPLY) is True
    result = stored(js)
    ref = result["response"]["body_ref"]
    assert result["response"]["body"] is None
    assert ref["bucket"] == SUBJECTS.bodies_bucket and ref["size"] == 2 * LIMIT and ref["encoding"] == "text"
    assert js.buckets[SUBJECTS.bodies_bucket].objects[ref["name"]] == body.encode()
    order = [entry[0] for entry in log]
    assert order.index("object-put") < order.index("publish") < len(order) - 1
    assert nc.sent[-1] == (ACK, b"+ACK")
    assert len(js.messages[SUBJECTS.results(None, "j1")]) <= LIMIT


async def test_a_body_under_the_limit_in_a_result_over_it_is_moved_too():
    """The body alone fits (`limit - 100` bytes) but not with the rest of the Result."""
    f, nc, js, _ = finisher(SMALL_PAYLOAD)
    body = "a" * (LIMIT - 100)
    await f.finish(Result(job_id="j1", status="succeeded", tier="normal", attempts=1,
                          metadata={"note": "n" * 500}, response=ResponseInfo(status=200, body=body)),
                   ack=ACK, reply_to=REPLY)
    result = stored(js)
    assert result["response"]["body_ref"]["size"] == LIMIT - 100
    assert result["metadata"] == {"note": "n" * 500}
    assert len(js.messages[SUBJECTS.results(None, "j1")]) <= LIMIT
    assert json.loads(nc.sent[0][1]) == result


async def test_a_result_of_exactly_the_limit_is_stored_whole():
    f, _, js, _ = finisher(SMALL_PAYLOAD)
    empty = len(text_result("").to_json())
    body = "a" * (LIMIT - empty)
    assert len(text_result(body).to_json()) == LIMIT
    await f.finish(text_result(body), ack=ACK, reply_to=None)
    assert stored(js)["response"]["body"] == body
    assert js.buckets == {}


async def test_empty_and_small_bodies_stay_inline():
    f, nc, js, _ = finisher(SMALL_PAYLOAD)
    await f.finish(text_result("", job_id="e"), ack=ACK, reply_to=REPLY)
    await f.finish(text_result("small", job_id="s"), ack=ACK, reply_to=REPLY)
    assert stored(js, "e")["response"]["body"] == "" and stored(js, "s")["response"]["body"] == "small"
    assert js.buckets == {}
    assert [s for s, _ in nc.sent] == [REPLY, ACK, REPLY, ACK]


@pytest.mark.parametrize("response, expected", [
    (None, False),
    (ResponseInfo(status=200), False),  # no body at all
    (ResponseInfo(status=200, body=""), False),
    (ResponseInfo(status=200, body="x" * 250), False),  # at most 1000 bytes: cannot pass 1000
    (ResponseInfo(status=200, body="x" * 251), True),  # 1004 bytes possible
    (ResponseInfo(status=200, body_b64="QUJD" * 62), False),
    (ResponseInfo(status=200, body_b64="QUJD" * 63), True),
    (ResponseInfo(status=200, json={"a": 1}), True),  # JSON is sized by serialising it
])
def test_may_be_large_is_false_only_when_the_body_cannot_pass_the_limit(response, expected):
    result = Result(job_id="j", status="succeeded", response=response)
    assert _may_be_large(result, 1000) is expected


# --- the reply of a job that had its Result already -------------------------------------

async def test_a_second_finish_replies_with_the_result_stored_first_for_that_job_and_batch():
    earlier = text_result("first answer", batch="b1").to_json()
    other = text_result("another job's answer", job_id="j2", batch="b1").to_json()
    held = {SUBJECTS.results("b1", "j1"): earlier, SUBJECTS.results("b1", "j2"): other,
            SUBJECTS.results(None, "j1"): b'{"wrong": "batch"}'}
    f, nc, js, _ = finisher(held=held)
    assert await f.finish(text_result("second answer", batch="b1"), ack=ACK, reply_to=REPLY) is False
    assert nc.sent == [(REPLY, earlier), (ACK, b"+ACK")]
    assert js.messages[SUBJECTS.results("b1", "j1")] == earlier


async def test_finish_stored_replies_with_the_stored_result_then_acks():
    f, nc, js, log = finisher()
    await f.finish_stored(b'{"job_id": "j1"}', ack=ACK, reply_to=REPLY)
    assert nc.sent == [(REPLY, b'{"job_id": "j1"}'), (ACK, b"+ACK")]
    assert js.messages == {}
    await f.finish_stored(b'{"job_id": "j1"}', ack=ACK, reply_to=None)
    assert nc.sent[2:] == [(ACK, b"+ACK")]


# --- naks and keep-alives ---------------------------------------------------------------

@pytest.mark.parametrize("delay_s, payload", [
    (0.0, b"-NAK"),
    (-1.0, b"-NAK"),
    (2.5, b'-NAK {"delay": 2500000000}'),
    (0.001, b'-NAK {"delay": 1000000}'),
])
async def test_a_nak_asks_for_redelivery_after_the_delay_in_nanoseconds(delay_s, payload):
    f, nc, _, _ = finisher()
    await f.nak(ACK, delay_s)
    assert nc.sent == [(ACK, payload)]


async def test_a_nak_without_delay_is_immediate_and_in_progress_is_wpi():
    f, nc, _, _ = finisher()
    await f.nak(ACK)
    await f.in_progress(ACK)
    assert nc.sent == [(ACK, b"-NAK"), (ACK, b"+WPI")]


# --- dead letters -----------------------------------------------------------------------

def letter(js: FakeJetStream, tier: str = "normal") -> dict:
    return json.loads(js.messages[SUBJECTS.dead(tier)])


async def test_a_dead_letter_names_the_reason_attempts_and_last_answer_and_masks_auth_headers():
    f, _, js, _ = finisher(mask=frozenset({"x-custom-token"}))
    job = {"id": "j1", "request": {"method": "GET", "path": "/x", "headers": {
        "X-Custom-Token": "s3cret", "Authorization": "Bearer s3cret", "Accept": "text/plain"}}}
    result = Result(job_id="j1", status="failed", tier="normal", attempts=3,
                    error=ErrorInfo(code="attempts_exhausted", message="3 attempts"),
                    response=ResponseInfo(status=503, body="busy"))
    await f.dead("normal", result, job=job)
    got = letter(js)
    assert got["job_id"] == "j1" and got["tier"] == "normal" and got["attempts"] == 3
    assert got["reason"] == {"code": "attempts_exhausted", "message": "3 attempts"}
    assert got["last_error"]["status"] == 503 and got["last_error"]["body"] == "busy"
    assert got["job"]["request"]["headers"] == {"X-Custom-Token": "***", "Authorization": "***",
                                                "Accept": "text/plain"}
    assert "s3cret" not in js.messages[SUBJECTS.dead("normal")].decode()


async def test_a_dead_letter_without_a_call_gives_the_error_and_without_error_says_unknown():
    f, _, js, _ = finisher()
    result = Result(job_id="j2", status="failed", tier="vip", attempts=0,
                    error=ErrorInfo(code="invalid_job", message="bad path"))
    await f.dead("vip", result, raw=b"not json")
    got = letter(js, "vip")
    assert got["last_error"] == {"code": "invalid_job", "message": "bad path"}
    assert got["reason"] == {"code": "invalid_job", "message": "bad path"}
    assert got["raw"] == "not json" and got["job_id"] == "j2"

    await f.dead("vip", Result(job_id="j3", status="failed", attempts=2), last_error={"why": "given"})
    got = letter(js, "vip")
    assert got["reason"] == {"code": "unknown", "message": ""}
    assert got["last_error"] == {"why": "given"} and got["attempts"] == 2

    await f.dead("vip", Result(job_id="j4", status="failed"))
    assert letter(js, "vip")["last_error"] is None


async def test_a_dead_letter_fits_the_servers_max_payload():
    f, _, js, _ = finisher(SMALL_PAYLOAD)
    job = {"id": "j1", "request": {"method": "POST", "path": "/x", "json": {"text": "x" * 100_000}}}
    await f.dead("normal", Result(job_id="j1", status="failed", tier="normal"), job=job)
    data = js.messages[SUBJECTS.dead("normal")]
    assert len(data) <= SMALL_PAYLOAD - 4096
    assert json.loads(data)["job_omitted"]["field"] == "job"


def test_auth_headers_are_the_lower_case_names_of_every_upstream():
    config = Config.model_validate({
        "upstreams": {"a": {"base_url": "http://127.0.0.1:9", "auth_header": "X-Custom-Token"},
                      "b": {"base_url": "http://127.0.0.1:9"}},
        "pools": {"p": {"upstream": "a", "keys": [{"id": "k1", "rps": 1, "secret": "env:UNUSED"}]},
                  "q": {"upstream": "b", "keys": [{"id": "k2", "rps": 1, "secret": "env:UNUSED"}]}},
    })
    assert auth_headers(config) == frozenset({"x-custom-token", "authorization"})
