"""Sizes at the doors and in dead letters: a job is bounded by what one NATS message to a
worker can carry; rpc adds an id without inflating UTF-8; a dead letter always fits the
server's max_payload; an upstream's own auth header is masked in dead letters."""

from __future__ import annotations

import json

import nats.errors
import pytest

from ratefleet import Client
from ratefleet.dispatcher.shell.intake import validate_job
from ratefleet.dispatcher.shell.rpc import _with_id
from ratefleet.runtime.store import dead_letter
from ratefleet.schemas import JobRejected, Subjects
from ratefleet.schemas.config import parse_config
from ratefleet.schemas.errors import JobInvalid
from ratefleet.schemas.job import ASSIGNMENT_OVERHEAD, job_size_limit

pytestmark = pytest.mark.anyio
MIB = 1 << 20
CONFIG = parse_config({"upstreams": {"u": {"base_url": "https://api.example.test", "auth_header": "X-Custom-Token"}},
                       "pools": {"p": {"keys": [{"id": "k1", "secret": "env:RF_UNIT_UNUSED", "rps": 10}]}}})


def job_of(size: int, **extra) -> bytes:
    base = {"id": "big", "request": {"path": "/v1/embeddings", "json": {"input": ""}}, **extra}
    room = size - len(json.dumps(base, separators=(",", ":")))
    base["request"]["json"]["input"] = "x" * room
    raw = json.dumps(base, separators=(",", ":")).encode()
    assert len(raw) == size
    return raw


def test_the_job_limit_leaves_room_for_the_assignment():
    assert job_size_limit(MIB, MIB)[0] == MIB - ASSIGNMENT_OVERHEAD
    assert job_size_limit(64 << 10, MIB) == (64 << 10, "streams.max_job_bytes")
    assert job_size_limit(MIB, None) == (MIB, "streams.max_job_bytes")


def test_intake_and_rpc_refuse_a_job_whose_assignment_would_not_fit():
    raw = job_of(MIB - 200)  # under max_job_bytes (1 MiB), over what a worker can be sent
    assert validate_job(raw, CONFIG).id == "big"  # the server's max_payload unknown: only max_job_bytes
    with pytest.raises(JobRejected) as refused:
        validate_job(raw, CONFIG, max_payload=MIB)
    assert refused.value.code == "invalid_job" and "max_payload = 1048576" in refused.value.message
    assert validate_job(job_of(MIB - ASSIGNMENT_OVERHEAD), CONFIG, max_payload=MIB).id == "big"


class SizedNats:
    max_payload = MIB
    is_closed = is_draining = False

    def jetstream(self):
        return None


async def test_the_client_refuses_a_job_a_worker_could_not_be_sent():
    client = Client(SizedNats())
    with pytest.raises(JobInvalid, match="max_payload = 1048576"):
        await client.submit(json.loads(job_of(MIB - 200)), tier="normal")
    with pytest.raises(JobInvalid, match="max_payload"):
        await client.submit_many([json.loads(job_of(MIB - 200))], tier="normal")


@pytest.mark.parametrize("text", ["\U0001F600" * 1000, "日本" * 1000, "a" * 1000])
def test_rpc_adds_an_id_without_growing_utf8_text(text):
    raw = json.dumps({"request": {"path": "/v1/x", "json": {"t": text}}}, ensure_ascii=False).encode()
    job_id, with_id = _with_id(raw)
    assert json.loads(with_id) == {"request": {"path": "/v1/x", "json": {"t": text}}, "id": job_id}
    assert len(with_id) <= len(raw) + len(job_id) + 10


class CapturingJs:
    def __init__(self):
        self.published: list[bytes] = []

    async def publish(self, subject, payload, timeout=None):
        self.published.append(payload)


SUBJECTS = Subjects("ratefleet")


async def test_a_dead_letter_of_a_job_near_the_limit_fits_max_payload():
    js = CapturingJs()
    job = json.loads(job_of(MIB - ASSIGNMENT_OVERHEAD))
    last = {"status": 500, "headers": {}, "body": "e" * (16 << 10)}
    await dead_letter(js, SUBJECTS, "normal", code="attempts_exhausted", message="m", job=job, job_id="big",
                      last_error=last, max_payload=MIB)
    [letter] = js.published
    assert len(letter) <= MIB - 4096
    stored = json.loads(letter)
    assert stored["job"] == job, "the job fits once the last answer's body is left out"
    assert stored["last_error"]["status"] == 500 and stored["last_error"]["body"] is None


async def test_a_dead_letter_of_an_oversized_raw_payload_keeps_its_head():
    js = CapturingJs()
    raw = job_of(MIB + 2000, request={"path": "/x", "headers": {"X-Custom-Token": "tok-SECRET"}, "json": {"input": ""}})
    await dead_letter(js, SUBJECTS, "normal", code="invalid_job", message="too big", raw=raw, job_id="big",
                      max_payload=MIB, mask_headers=frozenset({"x-custom-token"}))
    [letter] = js.published
    stored = json.loads(letter)
    assert len(letter) <= MIB and "payload" not in stored
    assert stored["job_omitted"]["field"] == "payload" and stored["job_omitted"]["bytes"] > MIB
    assert stored["job_omitted"]["head"].startswith('{"id": "big"') and b"tok-SECRET" not in letter


@pytest.mark.parametrize("as_job", [True, False], ids=["job", "raw"])
async def test_an_upstreams_custom_auth_header_is_masked_in_dead_letters(as_job):
    js = CapturingJs()
    job = {"id": "j1", "request": {"path": "/x", "headers": {"x-custom-token": "tok-SECRET", "X-Title": "t"}}}
    payload = {"job": job} if as_job else {"raw": json.dumps(job).encode()}
    await dead_letter(js, SUBJECTS, "normal", code="forbidden_target", message="set by ratefleet", job_id="j1",
                      mask_headers=frozenset({"x-custom-token"}), **payload)
    [letter] = js.published
    assert b"tok-SECRET" not in letter and b'"X-Title":"t"' in letter.replace(b" ", b"")
    assert job["request"]["headers"]["x-custom-token"] == "tok-SECRET", "the caller's job was changed"


class RefusingNats:
    """A connection whose JetStream publish fails in a way the store does not translate."""
    max_payload = MIB

    def __init__(self):
        self.replies: list[tuple[str, bytes]] = []

    def jetstream(self):
        class Js:
            async def publish(self, *args, **kwargs):
                raise nats.errors.MaxPayloadError()

            async def get_last_msg(self, stream, subject):
                raise nats.js.errors.NotFoundError(description="no message found")  # the id has no Result

        return Js()

    async def publish(self, subject, payload):
        self.replies.append((subject, payload))


async def test_rpc_answers_a_failed_result_whatever_the_store_raises():
    from ratefleet.dispatcher.shell.rpc import RpcResponder

    nc = RefusingNats()
    responder = RpcResponder(CONFIG, nc)

    class Msg:
        subject = "ratefleet.rpc.normal"
        reply = "_INBOX.abc"
        headers = None  # a nats-py Msg always has it (None: no headers)
        data = json.dumps({"id": "j1", "request": {"path": "/v1/x", "json": {}}}).encode()

    await responder.handle(Msg())
    [(subject, payload)] = nc.replies
    answer = json.loads(payload)
    assert subject == "_INBOX.abc" and answer["status"] == "failed" and answer["job_id"] == "j1"
    assert answer["error"]["code"] == "submit_failed" and "MaxPayloadError" in answer["error"]["message"]
