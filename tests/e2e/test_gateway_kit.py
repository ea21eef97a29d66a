"""The gateway test kit's own promise: a free port taken by another process between the probe and
the gateway's bind costs a retry on another port, not a failed test (seen in CI: "--listen
127.0.0.1:41113: cannot listen there (Address already in use)" under five xdist workers)."""

from __future__ import annotations

import socket

import gatewaykit
import httpx
import pytest
from fleetkit import FleetKit
from gatewaykit import caller_env, callers, start_gateway

from ratefleet.mock import MockSettings, running_mock

pytestmark = pytest.mark.timeout(90)


def test_a_port_taken_before_the_gateway_binds_it_costs_a_retry_not_the_test(tmp_path, nats_server, monkeypatch):
    caller_env(monkeypatch)
    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    taken.listen()
    picks = [taken.getsockname()[1]]
    real_free_port = gatewaykit.free_port
    monkeypatch.setattr(gatewaykit, "free_port", lambda: picks.pop(0) if picks else real_free_port())
    with running_mock(MockSettings()) as upstream:
        kit = FleetKit(tmp_path, nats_server.url, upstream.url, overrides={"callers": callers()})
        try:
            url = start_gateway(kit)
            assert int(url.rsplit(":", 1)[1]) != taken.getsockname()[1]
            assert httpx.get(url + "/healthz", trust_env=False).status_code == 200
            assert "Address already in use" in kit.logs()  # the first try did meet the taken port
            with pytest.raises(AssertionError, match="exited"):  # a port the caller chose is not swapped
                start_gateway(kit, taken.getsockname()[1], name="pinned")
        finally:
            kit.stop()
            taken.close()
