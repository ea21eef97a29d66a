"""The wire contract of ratefleet: pydantic models for what crosses a process boundary.

`Job` and `Result` are the public JSON shapes, `Config` is the TOML file, `Subjects`
names every NATS subject and stream. `internal` holds the dispatcher/worker protocol,
which is not part of the public contract.
"""

from ratefleet.schemas.config import (
    Config,
    DispatcherConfig,
    KeyConfig,
    PoolConfig,
    StreamsConfig,
    TierConfig,
    UpstreamConfig,
    WorkersConfig,
    load_config,
)
from ratefleet.schemas.errors import ConfigError, JobRejected
from ratefleet.schemas.job import HttpRequest, Job, parse_job
from ratefleet.schemas.result import BodyRef, ErrorCode, ErrorInfo, ResponseInfo, Result, ResultStatus, Timings
from ratefleet.schemas.subjects import TOKEN_PATTERN, Subjects, is_token

__all__ = [
    "BodyRef", "Config", "ConfigError", "DispatcherConfig", "ErrorCode", "ErrorInfo", "HttpRequest",
    "Job", "JobRejected", "KeyConfig", "PoolConfig", "ResponseInfo", "Result",
    "ResultStatus", "StreamsConfig", "Subjects", "TOKEN_PATTERN", "TierConfig", "Timings",
    "UpstreamConfig", "WorkersConfig", "is_token", "load_config", "parse_job",
]
