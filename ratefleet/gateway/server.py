"""Running the gateway: NATS connection, streams, callers, then uvicorn until SIGTERM/Ctrl-C.

`ratefleet gateway` runs this as a role (`roles.run_role`: signals, drain on exit); uvicorn's
own signal handling is turned off so that the role owns Ctrl-C.
"""

from __future__ import annotations

import contextlib
import importlib.util
import socket
import time
from collections.abc import Iterator

import anyio
import uvicorn

from ratefleet.client import Client
from ratefleet.gateway.app import Gateway, create_app
from ratefleet.gateway.batch_book import BatchBook
from ratefleet.gateway.batch_routes import BatchApi
from ratefleet.gateway.batch_runner import BatchRunner
from ratefleet.gateway.callers import Caller, CallerTable
from ratefleet.gateway.files import FileStore
from ratefleet.gateway.metrics import GatewayMetrics
from ratefleet.gateway.streaming import STOP_GRACE_S
from ratefleet.runtime.cache import ResultCache
from ratefleet.runtime.config_kv import ConfigFollower, startup_config
from ratefleet.runtime.logs import get_logger
from ratefleet.runtime.metrics import register_cache
from ratefleet.runtime.probes import Probes, bind_listener
from ratefleet.runtime.streams import ensure_topology
from ratefleet.schemas import Config
from ratefleet.schemas.config import split_listen
from ratefleet.schemas.errors import ConfigError
from ratefleet.schemas.job import job_size_limit

log = get_logger("ratefleet.gateway")
LISTEN_INSTEAD = "pass another --listen HOST:PORT (or set [gateway] listen)"


def parse_listen(listen: str) -> tuple[str, int]:
    """`HOST:PORT` (or `[IPv6]:PORT`) -> (host, port); ConfigError saying what to give when it
    is neither (schemas/config.py `split_listen`)."""
    try:
        return split_listen(listen)
    except ValueError as exc:
        raise ConfigError(f"--listen {listen!r}: {exc}") from None


class _Server(uvicorn.Server):
    """uvicorn.Server that leaves signals to the role (run_role) that owns the loop."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


def uvicorn_server(app, host: str, port: int) -> uvicorn.Server:
    http = "httptools" if importlib.util.find_spec("httptools") else "h11"
    config = uvicorn.Config(app, host=host, port=port, http=http, ws="none", loop="asyncio", lifespan="off",
                            log_level="warning", access_log=False, timeout_graceful_shutdown=STOP_GRACE_S + 2)
    return _Server(config)


async def serve_gateway(config: Config, nc, stop: anyio.Event, listen: str, probes: Probes | None = None,
                        sock: socket.socket | None = None, callers: CallerTable | None = None) -> None:
    """Serve until `stop` is set: `callers` (default: from `config`, see `load_callers`), jobs
    through `nc`'s fleet; with `probes`, also its /readyz and /metrics (runtime/probes.py) beside
    the gateway's /healthz. `sock`: `listen` bound already (else bound here; ConfigError when it
    cannot be)."""
    host, port = parse_listen(listen)
    if sock is None:
        sock = bind_listener(host, port, f"--listen {listen}", instead=LISTEN_INSTEAD)
    if callers is None:
        callers = load_callers(config, probes)
    await ensure_topology(nc.jetstream(), config)
    client = Client(nc, config.nats.prefix)
    cache = ResultCache.from_config(client.js, config)
    fleet, revision = await startup_config(client.js, client.subjects, config)
    body_limit, limit_source = job_size_limit(config.streams.max_job_bytes, nc.max_payload)
    gateway = Gateway(client, callers, max_body_bytes=body_limit, body_limit_source=limit_source,
                      cache=cache, default_upstream=fleet.implicit_upstream(),
                      upstreams=tuple(fleet.upstreams),
                      metrics=GatewayMetrics(probes.registry) if probes is not None else None)

    async def follow_upstreams(applied: int, live: Config) -> None:
        """The fleet's upstreams are live (`config push`): which one a request naming none runs
        on, and whether it must name one, follow them. Before, the gateway kept the ones of its
        start: after a push added a second upstream, every request naming none was refused by
        the dispatcher (`unknown_upstream`), with no advice, instead of the gateway's 400
        `upstream_required` saying how to name one (a new user's finding)."""
        gateway.default_upstream, gateway.upstreams = live.implicit_upstream(), tuple(live.upstreams)
        log.info("gateway follows the fleet's upstreams", revision=applied, upstreams=list(live.upstreams))

    follower = ConfigFollower(client.js, client.subjects, follow_upstreams, role="gateway", revision=revision)
    if probes is not None:
        register_cache(probes.registry, lambda: cache.stats)
    runner, batch_api = batch_service(config, client, callers)
    own = [*(probes.routes(healthz=False) if probes else []), *batch_api.routes()]
    server = uvicorn_server(create_app(gateway, own), host, port)
    async with anyio.create_task_group() as tg:
        runs = anyio.CancelScope()

        async def run_batches(*, task_status=anyio.TASK_STATUS_IGNORED) -> None:
            with runs:
                await runner.serve(task_status=task_status)

        await tg.start(run_batches)  # unfinished batches of an earlier gateway carry on
        tg.start_soon(server.serve, [sock])
        following = anyio.CancelScope()

        async def follow() -> None:
            with following:
                await follower.run()

        tg.start_soon(follow)
        while not server.started and not server.should_exit:
            await anyio.sleep(0.05)
        if server.started:
            log.info("gateway listening", url=f"http://{listen}", callers=len(callers),
                     **({"left_out": sorted(callers.left_out)} if callers.left_out else {}))
        await stop.wait()
        gateway.stop_at = time.monotonic() + STOP_GRACE_S  # open streams end by then, with an error event
        server.should_exit = True
        runs.cancel()  # a batch's state is in KV and JetStream: the next start carries on
        following.cancel()


def load_callers(config: Config, probes: Probes | None = None) -> CallerTable:
    """The callers of `config` (`CallerTable.from_config`; ConfigError when none can be used),
    each one left out logged as a warning with the reason and, with `probes`, listed in every
    /readyz answer (`callers_left_out`: {name: reason})."""
    callers = CallerTable.from_config(config)
    if not config.callers:
        log.warning("no [callers.<name>] in the config: every request will be refused with 401")
    for name, reason in callers.left_out.items():
        log.warning("caller left out: its key cannot be used here; its requests get 401 until the key is "
                    "set and the gateway restarted", caller=name, reason=reason)
    if probes is not None and callers.left_out:
        probes.notes["callers_left_out"] = dict(callers.left_out)
    return callers


def batch_service(config: Config, client: Client, callers: CallerTable) -> tuple[BatchRunner, BatchApi]:
    """The OpenAI Files and Batch API: files in the Object Store, batch records in KV, both
    kept as long as Results (`streams.results_max_age_s`). Batches already accepted run for
    every configured caller, those left out (key unusable here) included: a missing secret
    stops new requests, it does not fail the caller's earlier batches."""
    ttl = config.streams.results_max_age_s
    files = FileStore(client.js, client.subjects, ttl_s=ttl, replicas=config.streams.replicas)
    book = BatchBook(client.js, client.subjects, ttl_s=ttl, replicas=config.streams.replicas)
    configured = {name: Caller.from_config(name, caller, config.batch_tier(name))
                  for name, caller in config.callers.items()}
    runner = BatchRunner(client, book, files, configured)
    return runner, BatchApi(callers, files, book, runner)


async def gateway_main(config: Config, listen: str, source: str | None = None) -> None:
    """The `ratefleet gateway` process; `source` names where `listen` came from in an error
    (default `--listen LISTEN`)."""
    from ratefleet.roles import run_role

    probes = Probes()  # served on `listen` by the gateway's own app
    callers = load_callers(config, probes)  # no usable caller key stops the start, before NATS
    sock = bind_listener(*parse_listen(listen), source or f"--listen {listen}",  # a port in use: one line, before NATS
                         instead=LISTEN_INSTEAD)

    async def body(nc, stop):
        await serve_gateway(config, nc, stop, listen, probes, sock, callers)

    await run_role(config, "ratefleet-gateway", body, probes=probes)
