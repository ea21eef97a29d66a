"""The embedded nats-server given time to recover a store it already has (ratefleet/runtime/embedded.py).

A nightly-batch trial: after a SIGKILL of `up`, nats-server spent longer than the fixed 10 s
reading back a 319 MB store before it listened; `up` stopped it mid-recovery and failed with
"nats-server did not start within 10.0s". A real nats-server, started late by a wrapper script
standing in for a long recovery."""

from __future__ import annotations

import os
import stat
import time
from pathlib import Path

import pytest

from ratefleet.runtime import embedded
from ratefleet.runtime.embedded import EmbeddedNats, nats_server_binary
from ratefleet.schemas.errors import NatsUnavailable


def slow_binary(tmp_path: Path, delay_s: float) -> str:
    script = tmp_path / "slow-nats-server"
    script.write_text(f"#!/bin/sh\nsleep {delay_s}\nexec {nats_server_binary()} \"$@\"\n")
    script.chmod(script.stat().st_mode | stat.S_IXUSR)
    return str(script)


def test_a_server_recovering_its_store_is_waited_for_past_the_timeout(tmp_path, monkeypatch):
    monkeypatch.setattr(embedded, "nats_server_binary", lambda: slow_binary(tmp_path, 2.0))
    (tmp_path / "nats" / "js").mkdir(parents=True)
    (tmp_path / "nats" / "js" / "kept.blk").write_bytes(os.urandom(4096))  # a store from an earlier run
    started = time.monotonic()
    server = EmbeddedNats(tmp_path / "nats").start(timeout=0.5, recovering_timeout=30)
    try:
        assert time.monotonic() - started >= 2.0 and server.url.startswith("nats://")
    finally:
        server.stop()


def test_without_a_store_the_timeout_stands_and_with_one_the_longer_wait_ends_too(tmp_path, monkeypatch):
    monkeypatch.setattr(embedded, "nats_server_binary", lambda: slow_binary(tmp_path, 5.0))
    with pytest.raises(NatsUnavailable, match=r"did not start within 0.5s; see .*nats-server.log$"):
        EmbeddedNats(tmp_path / "fresh").start(timeout=0.5)
    (tmp_path / "kept" / "js").mkdir(parents=True)
    (tmp_path / "kept" / "js" / "kept.blk").write_bytes(b"x")
    with pytest.raises(NatsUnavailable, match=r"within 1.0s; .*\(it had a JetStream store of 0 MB to recover\)"):
        EmbeddedNats(tmp_path / "kept").start(timeout=0.5, recovering_timeout=1.0)


def test_a_wait_told_to_stop_ends_at_once_and_stops_the_server(tmp_path, monkeypatch):
    """A reviewer: `up` told to stop (SIGTERM, Ctrl-C) while restarting a nats-server with a
    store waited out the whole recovery wait (600 s) before stopping."""
    monkeypatch.setattr(embedded, "nats_server_binary", lambda: slow_binary(tmp_path, 30.0))
    (tmp_path / "kept" / "js").mkdir(parents=True)
    (tmp_path / "kept" / "js" / "kept.blk").write_bytes(b"x")
    asked = time.monotonic() + 1.0
    server = EmbeddedNats(tmp_path / "kept")
    with pytest.raises(NatsUnavailable, match="stopped while nats-server was starting"):
        server.start(timeout=0.5, interrupted=lambda: time.monotonic() > asked)
    assert time.monotonic() - asked < 5.0 and server.process.poll() is not None

