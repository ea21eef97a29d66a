"""Running the mock upstream under uvicorn: in a task, in a background thread, or forever.

- `serve` runs on the caller's event loop until cancelled, then shuts down gracefully.
  It installs no signal handlers: whoever owns the loop owns Ctrl-C.
- `running_mock` starts it in a background thread for tests and benchmarks.
- `serve_forever` is the blocking entry point of ``ratefleet mock-upstream``.

The listening socket is bound before uvicorn starts, so port 0 works and bind errors
surface in the caller.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib.util
import signal
import socket
import sys
import threading
from collections.abc import Callable, Iterator
from dataclasses import replace
from typing import Any, Protocol

import httpx
import uvicorn

from ratefleet.mock.app import create_app
from ratefleet.mock.settings import MockSettings

START_TIMEOUT_S = 10.0


class Settable(Protocol):
    def set(self) -> None: ...


def bind_socket(host: str, port: int) -> socket.socket:
    """A listening TCP socket on (host, port); port 0 picks a free one.

    Made by hand rather than with `socket.create_server` because asyncio only turns on
    TCP_NODELAY for sockets whose ``proto`` is IPPROTO_TCP (create_server leaves it 0),
    and without it every answer waits ~40 ms for a delayed ACK.
    """
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
        sock.listen(2048)
    except OSError:
        sock.close()
        raise
    return sock


def url_for(host: str, port: int) -> str:
    """Base URL a client on this machine should use to reach (host, port)."""
    if host in ("", "0.0.0.0"):
        host = "127.0.0.1"
    elif host == "::":
        host = "::1"
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


def uvicorn_config(settings: MockSettings) -> uvicorn.Config:
    http = "httptools" if importlib.util.find_spec("httptools") else "h11"
    return uvicorn.Config(
        create_app(settings),
        host=settings.host,
        port=settings.port,
        http=http,
        ws="none",
        loop="asyncio",
        lifespan="off",
        log_level="warning",
        access_log=False,
        timeout_graceful_shutdown=1,
    )


class _MockServer(uvicorn.Server):
    """uvicorn.Server that reports readiness and leaves signals to the loop's owner."""

    def __init__(self, config: uvicorn.Config, ready: Settable | None) -> None:
        super().__init__(config)
        self._ready = ready

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        await super().startup(sockets=sockets)
        if self.started and self._ready is not None:
            self._ready.set()


async def serve(
    settings: MockSettings, *, started: Settable | None = None, sock: socket.socket | None = None
) -> None:
    """Serve until cancelled; `started` (any object with ``set()``) is set once listening."""
    sock = sock if sock is not None else bind_socket(settings.host, settings.port)
    server = _MockServer(uvicorn_config(settings), started)
    running = asyncio.ensure_future(server.serve(sockets=[sock]))
    try:
        await asyncio.shield(running)
    except asyncio.CancelledError:
        server.should_exit = True
        try:
            await running
        except asyncio.CancelledError:
            server.force_exit = True
            await running
        raise


class RunningMock:
    """A mock upstream in a background thread; use as ``with running_mock(s) as mock``."""

    def __init__(self, settings: MockSettings) -> None:
        self.settings = settings
        self.port = settings.port
        self._ready = threading.Event()
        self._error: BaseException | None = None
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._task: asyncio.Task[Any] | None = None
        self._client: httpx.Client | None = None

    @property
    def url(self) -> str:
        return url_for(self.settings.host, self.port)

    def start(self) -> RunningMock:
        sock = bind_socket(self.settings.host, self.settings.port)
        self.port = sock.getsockname()[1]
        self._thread = threading.Thread(target=self._run, args=(sock,), name=f"mock-upstream-{self.port}", daemon=True)
        self._thread.start()
        if not self._ready.wait(START_TIMEOUT_S) or self._error is not None:
            self.stop()
            raise RuntimeError(f"mock upstream did not start on {self.url}") from self._error
        self._client = httpx.Client(base_url=self.url, trust_env=False, timeout=10.0)
        return self

    def _run(self, sock: socket.socket) -> None:
        try:
            asyncio.run(self._main(sock))
        except BaseException as exc:  # reported by start(); a thread has nowhere else to put it
            self._error = exc
        finally:
            self._ready.set()

    async def _main(self, sock: socket.socket) -> None:
        self._loop = asyncio.get_running_loop()
        self._task = asyncio.current_task()
        with contextlib.suppress(asyncio.CancelledError):
            await serve(self.settings, started=self._ready, sock=sock)

    def stop(self) -> None:
        """Shut the server down gracefully and wait for its thread."""
        if self._loop is not None and self._task is not None and not self._loop.is_closed():
            with contextlib.suppress(RuntimeError):  # loop already gone
                self._loop.call_soon_threadsafe(self._task.cancel)
        if self._thread is not None:
            self._thread.join(START_TIMEOUT_S)
        if self._client is not None:
            self._client.close()
            self._client = None

    def __enter__(self) -> RunningMock:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    def _control(self, method: str, path: str, **kwargs: Any) -> Any:
        if self._client is None:
            raise RuntimeError("the mock upstream is not running")
        response = self._client.request(method, path, **kwargs)
        response.raise_for_status()
        return response.json()

    def stats(self) -> dict[str, Any]:
        return self._control("GET", "/_mock/stats")

    def log(self, limit: int = 1000) -> list[dict[str, Any]]:
        return self._control("GET", "/_mock/log", params={"limit": limit})

    def configure(self, **changes: Any) -> dict[str, Any]:
        return self._control("POST", "/_mock/config", json=changes)

    def reset(self) -> None:
        self._control("POST", "/_mock/reset")


def running_mock(settings: MockSettings | None = None, *, port: int | None = 0) -> RunningMock:
    """A `RunningMock` on `port` (0: a free one; None: ``settings.port``), started by ``with``."""
    settings = settings or MockSettings()
    if port is not None:
        settings = replace(settings, port=port)
    return RunningMock(settings)


def serve_forever(settings: MockSettings, *, announce: Callable[[str], None] | None = None,
                  sock: socket.socket | None = None) -> None:
    """Serve in the foreground until Ctrl-C or SIGTERM (the CLI's ``mock-upstream``), on `sock`
    when given (bound already), else on ``settings.host``/``port``."""
    sock = sock if sock is not None else bind_socket(settings.host, settings.port)
    url = url_for(settings.host, sock.getsockname()[1])
    say = announce or (lambda line: print(line, file=sys.stderr, flush=True))
    say(f"mock upstream listening on {url} ({len(settings.keys)} keys); stats at {url}/_mock/stats")

    async def main() -> None:
        task = asyncio.current_task()
        assert task is not None
        with contextlib.suppress(NotImplementedError, RuntimeError):  # not on Windows / not main thread
            asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, task.cancel)
        await serve(settings, sock=sock)

    with contextlib.suppress(KeyboardInterrupt, asyncio.CancelledError):
        asyncio.run(main())
