"""`--http HOST:PORT`: /metrics, /healthz and /readyz of a long-running role.

Served by uvicorn inside the role's own event loop (a task of its task group), so the
collectors read the role's state on the loop's thread, between two of its steps.

    GET /metrics   Prometheus text format (prometheus_client's ASGI app over the role's registry)
    GET /healthz   200 {"ok": true} while the process runs its loop
    GET /readyz    200 {"ready": true}, or 503 {"ready": false, "reason": "..."}: NATS not
                   connected, a stream missing, or the role's own condition (a worker: no
                   leader heard; a dispatcher: neither leader nor a known leader); both
                   answers also carry the role's `notes` (the gateway: `callers_left_out`)

Kubernetes: livenessProbe on /healthz, readinessProbe on /readyz; compose: a healthcheck.
"""

from __future__ import annotations

import contextlib
import importlib.util
import socket
from collections.abc import Awaitable, Callable, Iterator
from typing import Any

import anyio
import uvicorn
from nats.js.errors import NotFoundError
from prometheus_client import CollectorRegistry, make_asgi_app
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from ratefleet.runtime.logs import get_logger
from ratefleet.runtime.metrics import new_registry
from ratefleet.schemas import Subjects
from ratefleet.schemas.config import split_listen
from ratefleet.schemas.errors import ConfigError

log = get_logger("ratefleet.probes")
Check = Callable[[], Awaitable[str | None]]  # None: ready; else why not (one line, no secret)
CHECK_TIMEOUT_S = 2.0


def streams_check(js: Any, subjects: Subjects) -> Check:
    """A readiness check: the JOBS, RESULTS and DEAD streams exist (the roles create them at
    start; a server wiped since then lacks them until a dispatcher starts again)."""

    async def check() -> str | None:
        for stream in (subjects.jobs_stream, subjects.results_stream, subjects.dead_stream):
            try:
                await js.stream_info(stream)
            except NotFoundError:
                return f"stream {stream} missing"
        return None

    return check


def parse_http(address: str) -> tuple[str, int]:
    """`HOST:PORT` (or `[IPv6]:PORT`; port 0: any free port) -> (host, port).
    Raises ConfigError naming the flag when it is neither (schemas/config.py `split_listen`)."""
    try:
        return split_listen(address, example="127.0.0.1:9464", any_port=True)
    except ValueError as exc:
        raise ConfigError(f"--http {address!r}: {exc}") from None


class Probes:
    """What one process serves: its metrics registry and its readiness checks.

    `nc` is set once NATS is connected (until then /readyz says so); the role appends its own
    checks (`checks`), run in order: the first reason found is the answer. `notes`: fields
    added to every /readyz answer, ready or not (the gateway: `callers_left_out`)."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or new_registry()
        self.nc: Any = None
        self.checks: list[Check] = []
        self.url: str | None = None  # http://HOST:PORT once served
        self.notes: dict[str, Any] = {}


    async def reason(self) -> str | None:
        """Why the process is not ready (None: ready)."""
        if self.nc is None:
            return "not connected to NATS yet"
        if not self.nc.is_connected:
            return "NATS connection lost; reconnecting"
        for check in self.checks:
            try:
                with anyio.fail_after(CHECK_TIMEOUT_S):
                    found = await check()
            except TimeoutError:
                found = f"readiness check timed out after {CHECK_TIMEOUT_S} s"
            except Exception as exc:  # noqa: BLE001 - a failing check means not ready, never a 500
                found = f"readiness check failed ({type(exc).__name__})"
            if found:
                return found
        return None

    def routes(self, *, healthz: bool = True) -> list[Route]:
        """/metrics, /healthz (unless the app has its own), /readyz, to serve alone (`app`)
        or beside other routes (the gateway)."""

        async def healthz_route(_request: Request) -> Response:
            return JSONResponse({"ok": True})

        async def readyz(_request: Request) -> Response:
            why = await self.reason()
            if why is None:
                return JSONResponse({"ready": True, **self.notes})
            return JSONResponse({"ready": False, "reason": why, **self.notes}, status_code=503)

        routes: list[Route] = [Route("/readyz", readyz, methods=["GET"]),
                                       Route("/metrics", _AsgiApp(make_asgi_app(self.registry)), methods=["GET"])]
        return [Route("/healthz", healthz_route, methods=["GET"]), *routes] if healthz else routes

    def app(self) -> Starlette:
        return Starlette(routes=self.routes())


class _AsgiApp:
    """An ASGI app as a Route endpoint (starlette calls a plain function with a Request, an
    object with the ASGI signature), so /metrics answers without a redirect to /metrics/."""

    def __init__(self, app: Callable[..., Awaitable[None]]) -> None:
        self.app = app

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        await self.app(scope, receive, send)


class _QuietServer(uvicorn.Server):
    """uvicorn.Server that leaves the signals to the role that owns the loop."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


async def serve_probes(probes: Probes, address: str, *, task_status=anyio.TASK_STATUS_IGNORED) -> None:
    """Serve `probes` on `address` until cancelled; `task_status.started(url)` once listening
    (the real port when 0 was asked for). Raises ConfigError when the address cannot be
    bound (port in use, no such address)."""
    host, port = parse_http(address)
    sock = bind_http(host, port, address)
    http = "httptools" if importlib.util.find_spec("httptools") else "h11"
    config = uvicorn.Config(probes.app(), host=host, port=port, http=http, ws="none", loop="asyncio",
                            lifespan="off", log_level="warning", access_log=False, timeout_graceful_shutdown=1)
    server = _QuietServer(config)
    shown = f"[{host}]" if ":" in host else host
    url = f"http://{shown}:{sock.getsockname()[1]}"
    try:
        async with anyio.create_task_group() as tg:
            tg.start_soon(server.serve, [sock])
            while not server.started:
                await anyio.sleep(0.02)
            log.info("probes listening", url=url)
            task_status.started(url)
            await anyio.sleep_forever()
    finally:
        server.should_exit = True
        sock.close()


def bind_http(host: str, port: int, address: str) -> socket.socket:
    """`bind_listener` for `--http ADDRESS`: ConfigError says how to pick another."""
    return bind_listener(host, port, f"--http {address}",
                         instead="pass another --http HOST:PORT (port 0: any free port)")


def bind_listener(host: str, port: int, what: str, *, instead: str) -> socket.socket:
    """A listening TCP socket on host:port (non-blocking, SO_REUSEADDR), for a uvicorn server's
    `serve([sock])`. Raises ConfigError naming `what` (the flag and its value) when the address
    does not exist or cannot be listened on (e.g. the port is in use): one line, not the
    server's startup traceback, ending with `instead` (how to give another address)."""
    try:
        family, kind, proto, _, sockaddr = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
        sock = socket.socket(family, kind, proto)
    except OSError as exc:
        raise ConfigError(f"{what}: no such address ({exc.strerror or exc}); {instead}") from None
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(sockaddr)
        sock.listen(128)
    except OSError as exc:
        sock.close()
        raise ConfigError(f"{what}: cannot listen there ({exc.strerror or exc}); {instead}") from None
    sock.setblocking(False)
    return sock
