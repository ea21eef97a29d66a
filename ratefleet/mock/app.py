"""The Starlette app of the mock upstream: /v1 API plus the /_mock control plane.

Control plane (no auth; refused with 403 unless the caller is on loopback or
``control_allow_remote`` is set):

- ``GET /_mock/stats``   counters per key and per Host header
- ``GET /_mock/log?limit=N``  the last N requests (bounded ring buffer)
- ``GET|POST /_mock/config``  read or change latency, failures and forced key statuses
- ``POST /_mock/reset``  zero counters and log, refill every bucket
"""

from __future__ import annotations

import ipaddress
import json
import time
from collections.abc import Awaitable, Callable

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from ratefleet.mock.api import MockApi, error
from ratefleet.mock.settings import MockSettings
from ratefleet.mock.state import MockState

ALL_METHODS = ["GET", "POST", "PUT", "PATCH", "DELETE"]
DEFAULT_LOG_LIMIT = 1000

Handler = Callable[[Request], Awaitable[Response]]


def _is_loopback(request: Request) -> bool:
    host = request.client.host if request.client else ""
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return host == "localhost"
    mapped = getattr(address, "ipv4_mapped", None)
    return (mapped or address).is_loopback


KEY_HEADERS = ("authorization", "api-key", "x-api-key", "x-goog-api-key")  # where upstreams take a key


class ControlPlane:
    """Handlers of /_mock/*: read and steer the state of one mock upstream."""

    def __init__(self, state: MockState, clock: Callable[[], float]) -> None:
        self.state = state
        self.clock = clock

    def guarded(self, handler: Handler) -> Handler:
        async def guarded_handler(request: Request) -> Response:
            if not (self.state.settings.control_allow_remote or _is_loopback(request)):
                return error(403, "The mock control plane only answers loopback clients.")
            if any(name in request.headers for name in KEY_HEADERS):
                # a call carrying an API key comes through a fleet (a worker on loopback calling for a
                # gateway caller): a trial's caller changed the mock's latency through the gateway
                return error(403, "The mock control plane does not answer requests carrying an API key (they come "
                                  "through a fleet); call it directly, without the key.")
            return await handler(request)

        return guarded_handler

    async def stats(self, request: Request) -> Response:
        return JSONResponse(self.state.stats())

    async def log(self, request: Request) -> Response:
        raw = request.query_params.get("limit", str(DEFAULT_LOG_LIMIT))
        try:
            limit = int(raw)
        except ValueError:
            return error(400, "limit must be a whole number")
        return JSONResponse(self.state.recent(limit))

    async def config(self, request: Request) -> Response:
        if request.method == "GET":
            return JSONResponse(self.state.configuration())
        try:
            changes = json.loads(await request.body())
            if not isinstance(changes, dict):
                raise ValueError("the config body must be a JSON object")
            return JSONResponse(self.state.configure(changes))
        except ValueError as exc:
            return error(400, str(exc))

    async def reset(self, request: Request) -> Response:
        self.state.reset(self.clock())
        return JSONResponse({"reset": True})

    def routes(self) -> list[Route]:
        return [
            Route("/_mock/stats", self.guarded(self.stats), methods=["GET"]),
            Route("/_mock/log", self.guarded(self.log), methods=["GET"]),
            Route("/_mock/config", self.guarded(self.config), methods=["GET", "POST"]),
            Route("/_mock/reset", self.guarded(self.reset), methods=["POST"]),
        ]


async def _http_error(request: Request, exc: Exception) -> Response:
    """Starlette's own 404/405 (paths outside /v1 and /_mock) as OpenAI-style JSON."""
    status = exc.status_code if isinstance(exc, HTTPException) else 500
    return error(status, f"{status} for {request.method} {request.url.path}")


def create_app(settings: MockSettings, *, clock: Callable[[], float] = time.monotonic) -> Starlette:
    """Build a fresh mock upstream; its state is reachable as ``app.state.mock``."""
    state = MockState(settings, clock())
    control = ControlPlane(state, clock)
    api = MockApi(state, clock)
    routes = [*control.routes(), Route("/v1/{path:path}", api.handle, methods=ALL_METHODS)]
    app = Starlette(routes=routes, exception_handlers={HTTPException: _http_error})
    app.state.mock = state
    return app
