"""What the gateway's Files and Batch API answer when NATS fails under a request: a 503 with
Retry-After (an SDK retries it) that says which failure, not a 500 naming an exception class
(a reviewer's finding: a bucket deleted under load gave "500 ... (NotFoundError on POST
/v1/files)", and a store that never acknowledged gave "cannot reach NATS" while connected)."""

from __future__ import annotations

import types

import nats.errors
import pytest
from nats.js.errors import APIError, NoStreamResponseError, NotFoundError

from ratefleet.gateway.batch_routes import BatchApi
from ratefleet.gateway.errors import GatewayRefusal


def api(connected: bool) -> BatchApi:
    made = BatchApi.__new__(BatchApi)
    made.runner = types.SimpleNamespace(client=types.SimpleNamespace(nc=types.SimpleNamespace(is_connected=connected)))
    return made


@pytest.mark.parametrize("exc", [NoStreamResponseError(), NotFoundError(code=404, err_code=10059,
                                                                        description="stream not found"),
                                 APIError(code=500, err_code=10049, description="error creating store for stream")])
def test_a_lost_bucket_is_a_503_that_says_it_is_made_anew(exc):
    refusal = api(True)._refusal_for(exc)
    assert isinstance(refusal, GatewayRefusal) and refusal.status == 503 and refusal.retry_after_s
    assert "NATS has lost the bucket" in refusal.message and "retry shortly" in refusal.message


def test_a_timeout_while_connected_is_not_called_unreachable():
    refusal = api(True)._refusal_for(nats.errors.TimeoutError())
    assert refusal.status == 503 and "did not answer in time" in refusal.message and "cannot reach" not in refusal.message
    away = api(False)._refusal_for(nats.errors.TimeoutError())
    assert away.status == 503 and "cannot reach NATS" in away.message


def test_anything_else_stays_itself_for_the_500():
    bug = ValueError("a bug")
    assert api(True)._refusal_for(bug) is bug
