"""A local OpenAI-style upstream that enforces per-key limits, for demos, tests and benchmarks.

It answers /v1/chat/completions, /v1/embeddings and /v1/models like OpenAI, refuses
calls over a key's limits with 429 + Retry-After + x-ratelimit-* headers, counts every
call per key, and can be told to slow down or fail (settings, /_mock/config, or a
``"mock"`` object in a request body). See `app` for the /_mock control plane.

    with running_mock(MockSettings(keys=[parse_key_spec("k1=sk-test:rps=20:burst=5")])) as mock:
        httpx.post(mock.url + "/v1/chat/completions", headers={"Authorization": "Bearer sk-test"}, json={...})
        mock.stats()["keys"]["k1"]["ok"]
"""

from ratefleet.mock.app import create_app
from ratefleet.mock.limits import KeyLimiter, TokenBucket, format_duration
from ratefleet.mock.server import RunningMock, running_mock, serve, serve_forever
from ratefleet.mock.settings import MockKey, MockSettings, parse_key_spec, unknown_key_id

__all__ = [
    "KeyLimiter",
    "MockKey",
    "MockSettings",
    "RunningMock",
    "TokenBucket",
    "create_app",
    "format_duration",
    "parse_key_spec",
    "running_mock",
    "serve",
    "serve_forever",
    "unknown_key_id",
]
