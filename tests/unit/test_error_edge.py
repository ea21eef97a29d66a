"""nats-py and httpx exceptions are translated at one edge (ratefleet/runtime/edge.py): a
user of the Client or of the CLI sees RatefleetError subclasses only, over a real
nats-server (no fleet running, or a connection that is gone)."""

from __future__ import annotations

import contextlib
import subprocess
import sys
from pathlib import Path

import httpx
import nats.errors
import nats.js.errors
import pytest

from ratefleet import Client, DispatcherUnavailable, NatsError, NatsUnavailable, RatefleetError, SubmitError
from ratefleet.runtime.edge import translate
from ratefleet.schemas.errors import UpstreamUnavailable

JOB = {"request": {"path": "/v1/chat/completions"}}
RATEFLEET = str(Path(sys.executable).with_name("ratefleet"))


@pytest.mark.parametrize(
    "exc, kind",
    [
        (nats.errors.ConnectionClosedError(), NatsUnavailable),
        (nats.errors.NoServersError(), NatsUnavailable),
        (nats.errors.TimeoutError(), NatsUnavailable),
        (nats.errors.ConnectionReconnectingError(), NatsUnavailable),
        (nats.errors.NoRespondersError(), NatsError),
        (nats.js.errors.NotFoundError(), NatsError),
        (nats.js.errors.APIError(code=503, description="JetStream system temporarily unavailable"), NatsError),
        (httpx.ConnectError("connection refused"), UpstreamUnavailable),
        (httpx.InvalidURL("no scheme"), UpstreamUnavailable),
        (ExceptionGroup("tasks", [nats.errors.ConnectionClosedError(), ValueError()]), NatsUnavailable),
    ],
)
def test_nats_and_httpx_failures_become_ratefleet_errors(exc, kind):
    ours = translate(exc, "doing it")
    assert type(ours) is kind and "doing it" in str(ours)


def test_what_ratefleet_does_not_know_passes_unchanged():
    failure = SubmitError("refused")
    assert translate(failure) is failure
    assert translate(ValueError("a bug")) is None and translate(KeyError("k")) is None
    assert translate(ExceptionGroup("tasks", [ValueError(), nats.errors.ConnectionClosedError()])) is None


@pytest.mark.anyio
async def test_status_without_a_dispatcher_is_dispatcher_unavailable_not_a_submit_error(nats_server):
    async with await Client.connect(nats_server.url) as client:
        with pytest.raises(DispatcherUnavailable, match="no dispatcher answered") as caught:
            await client.status(timeout=1.0)
    assert not isinstance(caught.value, SubmitError)


@pytest.mark.anyio
async def test_results_before_any_stream_exists_is_a_nats_error_saying_to_start_the_fleet(nats_server):
    async with await Client.connect(nats_server.url) as client:
        with pytest.raises(NatsError, match="ratefleet up") as caught:
            async for _ in client.results("nightly"):
                pass
    assert isinstance(caught.value.__cause__, nats.js.errors.NotFoundError)  # kept for debugging


@pytest.mark.anyio
async def test_a_closed_connection_is_nats_unavailable_for_every_client_call(nats_server):
    client = await Client.connect(nats_server.url)
    await client.nc.close()
    calls = {"request": lambda: client.request(JOB, "normal", timeout=1.0),
             "results": lambda: anext(client.results("nightly")),
             "status": lambda: client.status(timeout=1.0)}
    for name, call in calls.items():
        with pytest.raises(RatefleetError) as caught:
            await call()
        assert isinstance(caught.value, NatsUnavailable), (name, caught.value)
        assert "this Client is closed" in str(caught.value) and "Client.connect" in str(caught.value)
        # a ratefleet command's connection gives up so: its user is told what happened and to run it
        # again, not only (before) 'connect a new one with Client.connect', which a CLI user cannot do
        assert "NATS was unreachable" in str(caught.value) and "run the command again" in str(caught.value)


@pytest.mark.anyio
async def test_a_results_reader_stopped_early_closes_its_subscription(nats_server):
    """The edge wraps the async generator without keeping it open: closing `results()`
    early still runs its cleanup (the ordered consumer is unsubscribed)."""
    from ratefleet.runtime.streams import ensure_topology
    from ratefleet.schemas.config import parse_config
    from ratefleet.schemas.result import Result

    async with await Client.connect(nats_server.url) as client:
        await ensure_topology(client.js, parse_config({}))
        for n in range(3):
            result = Result(job_id=f"j{n}", status="succeeded", batch="b")
            await client.js.publish(client.subjects.results("b", f"j{n}"), result.to_json())
        before = len(client.nc._subs)
        async with contextlib.aclosing(client.results("b")) as results:
            async for first in results:
                assert first.job_id == "j0" and len(client.nc._subs) == before + 1
                break
        assert len(client.nc._subs) == before


def test_the_cli_says_a_nats_failure_in_one_line(nats_server, tmp_path):
    run = subprocess.run([RATEFLEET, "results", "--batch", "nightly", "--nats", nats_server.url], cwd=tmp_path,
                         capture_output=True, text=True, timeout=60)
    assert run.returncode == 1, run.stderr
    assert "Traceback" not in run.stderr and run.stderr.count("\n") == 1, run.stderr
    assert run.stderr.startswith("error: NATS has no such stream or consumer"), run.stderr
