"""structlog set-up: readable in a terminal, JSON lines otherwise. Never logs a secret."""

from __future__ import annotations

import logging
import os
import re
import sys
import warnings
from typing import Any, cast

import structlog
from opentelemetry import trace

_SECRETISH = re.compile(r"(?i)(bearer\s+)[A-Za-z0-9._\-]{6,}|\bsk-[A-Za-z0-9_\-]{6,}"
                        # NKey seeds (user, account, operator...): "S" + type + 56 base32 characters
                        r"|(?-i:\bS[UAONCPX][A-Z2-7]{56}\b)")
# user info of a URL (`nats://user:password@host`, `nats://token@host`): up to the last "@"
# before the host, so a password holding "@" is masked whole
_URL_USERINFO = re.compile(r"([A-Za-z][A-Za-z0-9+.\-]*://)([^\s/,'\"<>]*)@")


def _mask_userinfo(m: re.Match) -> str:
    user, colon, _ = m.group(2).partition(":")
    return f"{m.group(1)}{user}:***@" if colon else f"{m.group(1)}***@"


def redact_text(text: str) -> str:
    """`text` with URL credentials (`scheme://user:***@host`, `scheme://***@host`), bearer
    tokens, `sk-` keys and NKey seeds masked. Used on every log line and CLI error."""
    if "@" in text:
        text = _URL_USERINFO.sub(_mask_userinfo, text)
    return _SECRETISH.sub(lambda m: (m.group(1) or "") + "***", text)


def _scrub(_logger: object, _name: str, event: dict) -> dict:
    """Last line of defence: mask URL credentials and anything shaped like a bearer token,
    an sk- key or an NKey seed, in every string value of the event."""
    for field, value in event.items():
        if isinstance(value, str) and (("@" in value and "://" in value) or _SECRETISH.search(value)):
            event[field] = redact_text(value)
    return event


def add_trace_id(_logger: object, _name: str, event: dict) -> dict:
    """Every line written inside a job's span carries the job's `trace_id` (32 hex digits,
    the W3C trace id of runtime/tracing.py), unless the line names one itself."""
    if "trace_id" not in event:
        span_context = trace.get_current_span().get_span_context()
        if span_context.is_valid:
            event["trace_id"] = format(span_context.trace_id, "032x")
    return event


def configure_logging(level: str | None = None, *, json: bool | None = None) -> None:
    level_name = (level or os.environ.get("RATEFLEET_LOG_LEVEL") or "INFO").upper()
    use_json = (not sys.stderr.isatty()) if json is None else json
    if os.environ.get("RATEFLEET_LOG_FORMAT") in ("json", "console"):
        use_json = os.environ["RATEFLEET_LOG_FORMAT"] == "json"
    renderer = structlog.processors.JSONRenderer() if use_json else structlog.dev.ConsoleRenderer(colors=_colors())
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            add_trace_id,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.format_exc_info,
            _scrub,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(getattr(logging, level_name, logging.INFO)),
        # one write per line (message and newline together): PrintLogger's print() wrote them apart, and
        # under `ratefleet up`, whose children share its stderr, two lines were glued ("...}{...")
        logger_factory=structlog.WriteLoggerFactory(file=sys.stderr),
        cache_logger_on_first_use=False,
    )
    if use_json:  # a Python warning (e.g. a literal secret in a watched file) as a JSON line too, not raw text
        warnings.showwarning = _warning_as_log_line


def _warning_as_log_line(message: Warning | str, category: type[Warning], filename: str, lineno: int,
                         file: object = None, line: str | None = None) -> None:
    structlog.get_logger("py.warnings").warning(str(message), category=category.__name__)


def _message_and_fields(_logger: object, _name: str, event: dict) -> tuple[tuple[str], dict]:
    """`event` as one line for a standard-library logger: the message, then key=value pairs;
    `exc_info` goes to the logger (it prints the traceback), not into the line."""
    exc_info = event.pop("exc_info", None)
    message = str(event.pop("event", ""))
    line = " ".join([message, *(f"{key}={value!r}" for key, value in event.items())])
    return (line,), ({"exc_info": exc_info} if exc_info else {})


def _colors() -> bool:
    """Colour only on a terminal and only without $NO_COLOR (https://no-color.org)."""
    return sys.stderr.isatty() and not os.environ.get("NO_COLOR")


class _RatefleetLogger:
    """What `get_logger` returns: structlog's logger once structlog is configured (the CLI's
    `configure_logging`, or the program's own set-up), else one writing to the standard
    library's `logging` under the same name. In a program that uses ratefleet as a library and
    configures no structlog (the Python Client in a service), the program's logging set-up then
    decides where ratefleet's lines go (before, structlog's default printed every line, NATS
    reconnect warnings included, to stdout whatever it said: a service team's finding). Only
    ratefleet's loggers take this route: structlog itself is left unconfigured, so a program's
    own structlog lines are unchanged (a reviewer's finding on the first version, which
    configured structlog for the whole process at import)."""

    def __init__(self, name: str) -> None:
        self._name = name
        self._structlog = structlog.get_logger(name)
        self._stdlib: Any = None

    def __getattr__(self, method: str) -> Any:
        if structlog.is_configured():
            return getattr(self._structlog, method)
        if self._stdlib is None:
            self._stdlib = structlog.wrap_logger(
                logging.getLogger(self._name), wrapper_class=structlog.stdlib.BoundLogger,
                processors=[structlog.contextvars.merge_contextvars, add_trace_id, _scrub, _message_and_fields])
        return getattr(self._stdlib, method)


def get_logger(name: str) -> structlog.typing.FilteringBoundLogger:
    """The logger `name` (`ratefleet.<part>`), see _RatefleetLogger."""
    return cast(structlog.typing.FilteringBoundLogger, _RatefleetLogger(name))
