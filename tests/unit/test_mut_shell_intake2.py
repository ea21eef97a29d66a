"""What dispatcher/shell/intake.py makes of a delivery, every field at once: an `Incoming`
(upstream, attempt, limits, trace), each kind of `Refused` (status, code, ids, tier, ack,
reply subject, attempt, raw bytes, reason), the size limits from the config and from the
server's max_payload, `unreadable`, and a payload that makes the parser itself fail.
No NATS needed (the fake message of test_bite_intake)."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta

import pytest
from test_bite_intake import ACK, config, job, message

from ratefleet.dispatcher.shell import intake
from ratefleet.dispatcher.shell.intake import Incoming, Refused, read_message, unreadable, validate_job
from ratefleet.runtime.tracing import fresh_traceparent
from ratefleet.schemas import ErrorCode, JobRejected

SUBMITTED = datetime(2026, 11, 29, 9, 0, tzinfo=UTC).timestamp()  # the fake message's timestamp
INBOX = "_INBOX.caller.1"
TRACEPARENT = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"


def vip_config(**sections):
    """Tier `vip`: 4 attempts, 7 answers 429; streams.max_deliver stays 20."""
    return config(tiers={"normal": {}, "vip": {"max_attempts": 4, "max_rate_limited": 7}}, **sections)


def deliver(body=None, *, delivered=1, handbacks=0, rate_limited=0, headers=None, conf=None, tier="vip"):
    headers = {"Ratefleet-Reply-To": INBOX} if headers is None else headers
    msg = message(body if body is not None else job(batch="b1"), delivered=delivered, headers=headers, seq=12)
    return msg, read_message(msg, tier, conf or vip_config(), handbacks, rate_limited)


def fields(got: Refused) -> tuple:
    return (got.status, got.code, got.job_id, got.batch, got.tier, got.ack, got.reply_to, got.attempt)


# -- an Incoming ---------------------------------------------------------------------------------


def test_an_incoming_job_carries_every_field_of_its_delivery():
    _, got = deliver(delivered=5, handbacks=1, rate_limited=2)
    assert isinstance(got, Incoming), got
    assert (got.job_id, got.job.id, got.job.batch, got.tier, got.upstream, got.ack, got.reply_to) == (
        "j1", "j1", "b1", "vip", "u", ACK, INBOX)
    assert (got.attempt, got.max_attempts, got.submitted_at, got.stream_seq) == (2, 4, SUBMITTED, 12)
    assert (got.rate_limited, got.max_rate_limited) == (2, 7)
    # no trace came with the message: a fresh one, derived from the job id, sequence and timestamp
    assert (got.traceparent, got.tracestate) == (fresh_traceparent("j1", 12, SUBMITTED), None)


def test_handbacks_and_429s_default_to_none():
    got = read_message(message(delivered=3), "normal", config())
    assert isinstance(got, Incoming) and (got.attempt, got.rate_limited) == (3, 0)


def test_the_messages_trace_is_kept():
    headers = {"traceparent": TRACEPARENT, "tracestate": "acme=1", "Ratefleet-Reply-To": INBOX}
    _, got = deliver(headers=headers)
    assert isinstance(got, Incoming) and (got.traceparent, got.tracestate) == (TRACEPARENT, "acme=1")


def test_a_fresh_trace_is_the_same_for_every_delivery_of_a_message_and_differs_between_messages():
    first = read_message(message(seq=3), "normal", config())
    again = read_message(message(seq=3, delivered=2), "normal", config())
    other = read_message(message(seq=4), "normal", config())
    assert first.traceparent == again.traceparent != other.traceparent


def test_the_jobs_upstream_is_used_when_several_are_configured():
    conf = config(upstreams={"u": {"base_url": "https://a.example.test"}, "u2": {"base_url": "https://b.example.test"}},
                  pools={"p": {"upstream": "u", "keys": [{"id": "k1", "secret": "env:K1", "rps": 10}]},
                         "p2": {"upstream": "u2", "keys": [{"id": "k2", "secret": "env:K2", "rps": 10}]}})
    _, got = deliver(job(upstream="u2"), conf=conf, tier="normal")
    assert isinstance(got, Incoming) and got.upstream == "u2"
    _, refused = deliver(job(batch="b1"), conf=conf, tier="normal")
    assert isinstance(refused, Refused)
    assert fields(refused) == ("invalid", ErrorCode.UNKNOWN_UPSTREAM, "j1", "b1", "normal", ACK, INBOX, 1)
    assert "several are configured (['u', 'u2'])" in refused.message


# -- each kind of Refused ------------------------------------------------------------------------


def test_a_job_that_fails_the_schema_is_refused_under_its_own_id_and_batch():
    raw = json.dumps({"id": "j1", "batch": "b1", "request": {}}).encode()
    with pytest.raises(JobRejected) as caught:
        validate_job(raw, vip_config())
    msg, got = deliver(raw, delivered=2)
    assert isinstance(got, Refused)
    assert fields(got) == ("invalid", caught.value.code, "j1", "b1", "vip", ACK, INBOX, 2)
    assert (got.message, got.raw, got.job) == (caught.value.message, msg.data, None)


def test_a_poison_message_is_refused_with_its_job():
    msg, got = deliver(delivered=22, handbacks=21, rate_limited=2)  # 20 deliveries that were not 429s
    assert isinstance(got, Refused)
    assert fields(got) == ("failed", ErrorCode.POISON_MESSAGE, "j1", "b1", "vip", ACK, INBOX, 1)
    # the reason names the setting that bounds it and where the job went
    assert got.message == ("delivered 22 times without finishing (2 answered 429; streams.max_deliver); "
                           "moved to dead letters")
    assert got.raw == msg.data and got.job is not None and got.job.id == "j1"


def test_the_consumers_own_delivery_limit_makes_a_poison_message_too():
    # more 429s than the tier's budget (e.g. lowered since): 27 = 20 + 7 deliveries is the
    # consumer's max_deliver, so this is the last delivery the server makes
    _, got = deliver(delivered=27, handbacks=10, rate_limited=8)
    assert isinstance(got, Refused) and (got.status, got.code) == ("failed", ErrorCode.POISON_MESSAGE)
    _, before = deliver(delivered=26, handbacks=10, rate_limited=8)
    assert isinstance(before, Refused) and before.code == ErrorCode.RATE_LIMITED


def test_a_forbidden_reply_subject_is_refused_and_not_answered():
    msg, got = deliver(headers={"Ratefleet-Reply-To": "$SYS.REQ.SERVER.PING"})
    assert isinstance(got, Refused)
    assert fields(got) == ("invalid", ErrorCode.FORBIDDEN_TARGET, "j1", "b1", "vip", ACK, None, 1)
    assert "Ratefleet-Reply-To" in got.message and got.raw == msg.data and got.job.id == "j1"


def test_an_unknown_upstream_is_refused_naming_the_configured_ones():
    msg, got = deliver(job(upstream="nope", batch="b1"))
    assert isinstance(got, Refused)
    assert fields(got) == ("invalid", ErrorCode.UNKNOWN_UPSTREAM, "j1", "b1", "vip", ACK, INBOX, 1)
    assert "unknown upstream 'nope'; configured: ['u']" in got.message
    assert got.raw == msg.data and got.job.id == "j1"


def test_a_job_out_of_429s_fails_rate_limited():
    msg, got = deliver(delivered=9, rate_limited=7)
    assert isinstance(got, Refused)
    assert fields(got) == ("failed", ErrorCode.RATE_LIMITED, "j1", "b1", "vip", ACK, INBOX, 2)
    assert "answered 429 7 times (tiers.vip.max_rate_limited = 7)" in got.message
    assert got.raw == msg.data and got.job.id == "j1"


def test_a_job_out_of_attempts_fails_attempts_exhausted():
    msg, got = deliver(delivered=5)
    assert isinstance(got, Refused)
    assert fields(got) == ("failed", ErrorCode.ATTEMPTS_EXHAUSTED, "j1", "b1", "vip", ACK, INBOX, 5)
    assert got.message == ("delivered again after 4 attempts, max_attempts=4 (the last ones ended without a stored "
                           "Result: a worker stopped mid-call or could not reach NATS to store the Result, or a leader "
                           "holding the job was killed before handing it out; such a delivery counts, as the README's "
                           "attempts rule says)")  # 4: the Result's `attempts` (calls_before(5))
    assert got.raw == msg.data and got.job.id == "j1"


def test_a_job_past_its_deadline_is_expired():
    past = (datetime.now(UTC) - timedelta(minutes=5)).isoformat()
    msg, got = deliver(job(batch="b1", deadline=past), delivered=2)
    assert isinstance(got, Refused)
    assert fields(got) == ("expired", ErrorCode.DEADLINE_EXCEEDED, "j1", "b1", "vip", ACK, INBOX, 2)
    assert got.message == "the deadline passed before the job could be called again, after 1 failed attempt"
    assert got.raw == msg.data and got.job.id == "j1"
    _, first = deliver(job(batch="b1", deadline=past))
    assert first.message == "the deadline passed before the call could start"
    # a job 429'd until its deadline says so (it said "before the call could start" after 7 calls)
    _, throttled = deliver(job(batch="b1", deadline=past), delivered=6, rate_limited=5)
    assert throttled.message == ("the deadline passed before the job could be called again, after 5 answers of 429 "
                                 "(the keys' limits: a longer deadline or more key capacity)")
    _, both = deliver(job(batch="b1", deadline=past), delivered=6, rate_limited=3)
    assert both.message.endswith("after 3 answers of 429 and 2 failed attempts (the keys' limits: a longer deadline "
                                 "or more key capacity)")


# -- size limits ---------------------------------------------------------------------------------


def big_job() -> bytes:
    return json.dumps(job(batch="b1", metadata={"pad": "x" * 400})).encode()


def test_a_job_over_streams_max_job_bytes_is_refused():
    conf = vip_config(streams={"max_job_bytes": 300})
    with pytest.raises(JobRejected) as caught:
        validate_job(big_job(), conf)
    assert (caught.value.code, caught.value.job_id, caught.value.batch) == (ErrorCode.INVALID_JOB, "j1", "b1")
    assert "the limit is 300 (streams.max_job_bytes)" in caught.value.message
    _, got = deliver(big_job(), conf=conf)
    assert isinstance(got, Refused) and fields(got)[:4] == ("invalid", ErrorCode.INVALID_JOB, "j1", "b1")
    assert got.message == caught.value.message


def test_a_job_over_the_servers_max_payload_is_refused():
    max_payload = (8 << 10) + 300  # leaves 300 bytes for the job in its assignment
    with pytest.raises(JobRejected) as caught:
        validate_job(big_job(), vip_config(), max_payload)
    assert "the limit is 300 (the NATS server's max_payload = 8492" in caught.value.message
    got = read_message(message(big_job()), "vip", vip_config(), max_payload=max_payload)
    assert isinstance(got, Refused) and (got.code, got.message) == (ErrorCode.INVALID_JOB, caught.value.message)
    assert isinstance(read_message(message(job()), "vip", vip_config(), max_payload=max_payload), Incoming)
    assert validate_job(json.dumps(job()).encode(), vip_config(), max_payload).id == "j1"


# -- failures of the parser itself, and unreadable ------------------------------------------------


def test_a_parser_failure_is_the_payloads_fault(monkeypatch):
    def broken(raw, **limits):
        raise KeyError("x")

    monkeypatch.setattr(intake, "parse_job", broken)
    with pytest.raises(JobRejected) as caught:
        validate_job(b"{}", config())
    assert (caught.value.code, caught.value.message) == (ErrorCode.INVALID_JOB, "job could not be read (KeyError)")
    msg, got = deliver(b"{}")
    assert isinstance(got, Refused)
    assert fields(got) == ("invalid", ErrorCode.INVALID_JOB, "s12", None, "vip", ACK, INBOX, 1)
    assert got.message == "job could not be read (KeyError)"


@pytest.mark.parametrize(("headers", "job_id"), [
    ({"Nats-Msg-Id": "m-1"}, "m-1"), ({"Nats-Msg-Id": "not a token"}, "s12"), (None, "s12"), ({}, "s12"),
])
def test_an_unreadable_message_ends_invalid_under_its_message_id(headers, job_id):
    msg = message(b"\x00", delivered=3, headers=headers, seq=12)
    got = unreadable(msg, "vip", ValueError("boom"))
    assert got == Refused("invalid", ErrorCode.INVALID_JOB, "job could not be read (ValueError)", job_id, None,
                          "vip", ACK, None, 1, b"\x00")
