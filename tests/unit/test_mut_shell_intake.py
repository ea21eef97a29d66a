"""Intake's shared validation (dispatcher/shell/intake.py `validate_job`, used by rpc) and the
fields of what `read_message` makes of a delivery, field by field. No NATS needed."""

from __future__ import annotations

import pytest
from test_bite_intake import ACK, config, job, message

from ratefleet.dispatcher.shell.intake import Incoming, Refused, read_message, validate_job
from ratefleet.schemas import ErrorCode, JobRejected


def test_a_job_refused_by_the_config_names_its_id_batch_code_and_reason():
    conf = config(upstream={"auth_header": "X-Custom-Auth"})
    raw = b'{"id": "j1", "batch": "b1", "request": {"path": "/v1/x", "headers": {"X-Custom-Auth": "s"}}}'
    with pytest.raises(JobRejected) as caught:
        validate_job(raw, conf)
    rejected = caught.value
    assert (rejected.code, rejected.job_id, rejected.batch) == (ErrorCode.FORBIDDEN_TARGET, "j1", "b1")
    assert "'X-Custom-Auth'" in rejected.message and "set by ratefleet" in rejected.message


def test_a_valid_job_is_returned_parsed():
    assert validate_job(b'{"id": "j2", "request": {"path": "/v1/x"}}', config()).id == "j2"


@pytest.mark.parametrize(("headers", "body", "job_id"), [
    ({"Nats-Msg-Id": "hdr-1"}, {"request": {"path": "/v1/x"}}, "hdr-1"),       # no id in the job: the message's
    ({"Nats-Msg-Id": "has space"}, {"request": {"path": "/v1/x"}}, "s9"),      # not a token: the stream sequence
    (None, {"request": {"path": "/v1/x"}}, "s9"),
    ({"Nats-Msg-Id": "hdr-1"}, {"id": "j1", "request": {"path": "/v1/x"}}, "j1"),  # the job's own id wins
])
def test_a_job_without_an_id_takes_its_messages_id_or_stream_sequence(headers, body, job_id):
    got = read_message(message(body, headers=headers), "normal", config())
    assert isinstance(got, Incoming) and got.job_id == job_id and got.job.id == job_id


def test_an_unreadable_job_is_refused_under_its_messages_id():
    got = read_message(message(b"{not json", headers={"Nats-Msg-Id": "hdr-2"}), "normal", config())
    assert isinstance(got, Refused) and (got.job_id, got.status) == ("hdr-2", "invalid")


def test_a_reply_subject_in_a_custom_prefixs_own_namespace_is_refused():
    conf = config(nats={"prefix": "acme"})
    got = read_message(message(headers={"Ratefleet-Reply-To": "acme.admin.keys"}), "normal", conf)
    assert isinstance(got, Refused) and got.code == ErrorCode.FORBIDDEN_TARGET and got.reply_to is None


def test_a_refused_job_keeps_its_batch():
    got = read_message(message(job(batch="b7"), delivered=99), "normal", config())
    assert isinstance(got, Refused) and got.batch == "b7" and got.job_id == "j1"


def test_a_refused_job_is_acked_on_its_own_message_in_its_tier_and_answered_on_its_inbox():
    got = read_message(message(job(), delivered=99, headers={"Ratefleet-Reply-To": "_INBOX.abc"}), "vip", config())
    assert isinstance(got, Refused) and got.code == ErrorCode.POISON_MESSAGE
    assert (got.tier, got.ack, got.reply_to) == ("vip", ACK, "_INBOX.abc")
