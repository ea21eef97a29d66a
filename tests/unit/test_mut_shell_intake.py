"""Intake's shared validation (dispatcher/shell/intake.py `validate_job`, used by rpc) and the
fields of what `read_message` makes of a delivery, field by field. No NATS needed."""

from __future__ import annotations

import pytest
from test_bite_intake import config

from ratefleet.dispatcher.shell.intake import validate_job
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
