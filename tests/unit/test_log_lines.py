"""Where log lines go and how they are written (ratefleet/runtime/logs.py): findings of an
operator's trial (lines of two processes glued together under `ratefleet up`, a raw Python
warning in a JSON log) and of a service team's (the Python Client printing to stdout)."""

from __future__ import annotations

import json
import subprocess
import sys
import warnings

import structlog

from ratefleet.runtime import logs


class Recorder:
    """A stderr that keeps each write() apart."""

    def __init__(self) -> None:
        self.writes: list[str] = []

    def write(self, text: str) -> int:
        self.writes.append(text)
        return len(text)

    def flush(self) -> None:
        pass

    def isatty(self) -> bool:
        return False


def test_each_json_line_is_one_write_and_a_python_warning_is_a_json_line_too(monkeypatch):
    """Before: message and newline were two writes (print), so under `ratefleet up`, whose
    children share its stderr, another process's line could land between them; and a Python
    warning came out as two lines of raw text in the JSON log."""
    saved, shown = structlog.get_config(), warnings.showwarning
    recorder = Recorder()
    monkeypatch.setattr(sys, "stderr", recorder)
    try:
        logs.configure_logging("INFO", json=True)
        logs.get_logger("ratefleet.test").info("one line", n=1)
        with warnings.catch_warnings():
            warnings.simplefilter("always")
            warnings.showwarning = logs._warning_as_log_line  # (catch_warnings restored the one set above)
            warnings.warn("a literal secret in the watched file", UserWarning, stacklevel=1)
    finally:
        structlog.configure(**saved)
        warnings.showwarning = shown
    assert all(chunk.endswith("\n") and chunk.count("\n") == 1 for chunk in recorder.writes), recorder.writes
    lines = [json.loads(chunk) for chunk in recorder.writes]
    assert lines[0]["event"] == "one line" and lines[0]["n"] == 1
    assert lines[1]["event"] == "a literal secret in the watched file" and lines[1]["category"] == "UserWarning"


LIBRARY_USER = """
import logging, sys
{setup}
from ratefleet.runtime.logs import get_logger
log = get_logger("ratefleet.client")
log.warning("nats error, reconnecting", error="ConnectionRefusedError", url="nats://app:hunter2@127.0.0.1:4222")
log.error("gave up", key="sk-abcdefghijklmnop")
"""


def _run(setup: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", LIBRARY_USER.format(setup=setup)], capture_output=True, text=True,
                          timeout=60, check=True)


def test_a_program_using_the_client_decides_where_its_log_lines_go():
    """Before: structlog's default printed every line to stdout, whatever the program's logging
    said (7 'nats error' lines on stdout in 3 s with logging.basicConfig(level=ERROR))."""
    quiet = _run("logging.basicConfig(level=logging.ERROR)")
    assert quiet.stdout == ""
    assert "gave up" in quiet.stderr and "reconnecting" not in quiet.stderr
    assert "ERROR:ratefleet.client:gave up key='***'" in quiet.stderr
    bare = _run("")  # no set-up: Python's last-resort handler, warnings and worse, on stderr
    assert bare.stdout == ""
    assert "nats error, reconnecting" in bare.stderr and "hunter2" not in bare.stderr


def test_importing_ratefleet_leaves_the_programs_own_structlog_alone():
    """A reviewer's finding on the first version: it configured structlog for the whole process at
    import, so a program's own `structlog.get_logger().info(...)` lines went to `logging` (and its
    info lines vanished). Only ratefleet's loggers take the `logging` route; an exception's
    traceback is printed by `logging`, not as text in the line."""
    program = (
        "import logging, structlog\n"
        "import ratefleet.client\n"
        "from ratefleet.runtime.logs import get_logger\n"
        "structlog.get_logger().info('service started')\n"
        "print('configured:', structlog.is_configured())\n"
        "try:\n"
        "    1 / 0\n"
        "except ZeroDivisionError:\n"
        "    get_logger('ratefleet.x').exception('it broke')\n")
    done = subprocess.run([sys.executable, "-c", program], capture_output=True, text=True, timeout=60, check=True)
    assert "service started" in done.stdout and "configured: False" in done.stdout
    assert "it broke" in done.stderr and "ZeroDivisionError" in done.stderr and "exc_info" not in done.stderr
