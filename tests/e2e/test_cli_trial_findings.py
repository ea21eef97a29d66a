"""What a new user's batch trial (2026-12-02) met in the CLI, each against a real nats-server."""

from __future__ import annotations

import gzip
import json
import subprocess
import sys

import anyio
import pytest

from ratefleet import Client
from ratefleet.runtime.streams import ensure_topology
from ratefleet.schemas.config import parse_config

pytestmark = [pytest.mark.timeout(120)]
JOB = {"request": {"path": "/v1/chat/completions", "json": {"model": "m", "messages": []}}}


def cli(*args: str, timeout: float = 60, **kw) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "ratefleet", *args], capture_output=True, text=True,
                          timeout=timeout, **kw)


@pytest.mark.parametrize(("pack", "what", "command"), [
    (gzip.compress, "gzip-compressed", "zcat"),
    (lambda data: b"BZh91AY&SY" + data, "bzip2-compressed", "bzcat"),
    (lambda data: b"PK\x03\x04" + data, "a zip archive", "unzip -p"),
])
def test_a_compressed_jobs_file_is_named_as_such_with_the_command_that_streams_it(tmp_path, nats_server, pack, what,
                                                                                    command):
    # it was "line 1: not UTF-8 (byte 0x8b at character 2); save the file as UTF-8"
    path = tmp_path / "jobs.jsonl.packed"
    path.write_bytes(pack((json.dumps(JOB) + "\n").encode() * 3))
    done = cli("submit", str(path), "--tier", "normal", "--batch", "nightly", "--nats", nats_server.url)
    assert done.returncode == 2, done.stderr
    assert f"error: {path} is {what}, not JSONL text" in done.stderr
    assert f"{command} {path} | ratefleet submit - --tier normal --batch nightly" in done.stderr
    assert "nothing was submitted" in done.stderr and "not UTF-8" not in done.stderr
    anyio.run(_streams, nats_server.url)
    with path.open("rb") as stdin:
        piped = cli("submit", "-", "--tier", "normal", "--nats", nats_server.url, stdin=stdin)
    assert piped.returncode == 2 and f"standard input is {what}, not JSONL text" in piped.stderr, piped.stderr
    assert command in piped.stderr


async def _streams(url: str) -> None:
    async with await Client.connect(url) as client:
        await ensure_topology(client.js, parse_config({}))
