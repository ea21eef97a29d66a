"""The `ratefleet` commands that run a fleet process: `up`, `dispatcher`, `worker`, `gateway`.

They are also commands of the whole command line (ratefleet/cli.py registers these functions),
and `python -m ratefleet` (ratefleet/__main__.py) runs them through `role_app`, an app of these
commands alone, so a role process does not import the client commands' modules it never runs
(the batch, results, keys and config commands, tomlkit, the Client): about 55 ms of CPU a
process, 11 % of a worker's or a dispatcher's imports (timed in-process, 9 interleaved rounds;
README, "thirteenth session"). The options and errors are the
same either way: the commands are the same functions.
"""

from __future__ import annotations

import sys
from pathlib import Path

import typer

from ratefleet.cli_support import RatefleetApp, fail, fleet_config, plain_output, run_async
from ratefleet.runtime.gctune import imports_without_gc
from ratefleet.runtime.logs import configure_logging

ROLE_COMMANDS = frozenset({"up", "dispatcher", "worker", "gateway"})  # what `role_app` runs
MARKUP = None if plain_output() else "rich"  # NO_COLOR / not a terminal: click's plain help and errors

ConfigOpt = typer.Option(None, "--config", "-c", help="TOML config (else $RATEFLEET_CONFIG, else ./ratefleet.toml)")
NatsOpt = typer.Option(None, "--nats", envvar="RATEFLEET_NATS_URL",
                       help="NATS URL, over the config's [nats].url (default nats://127.0.0.1:4222)")
HttpOpt = typer.Option(None, "--http", metavar="HOST:PORT",
                       help="serve /metrics (Prometheus), /healthz and /readyz here (port 0: any free port)")


def _http_or_fail(address: str | None) -> str | None:
    """`--http` checked before anything starts: exit 2 with why when it is not HOST:PORT or
    cannot be listened on (a port in use: the gateway's `--listen` is refused the same way;
    a role found it only once started, and exited 1)."""
    from ratefleet.runtime.probes import bind_http, parse_http
    from ratefleet.schemas.errors import ConfigError

    if address is not None:
        try:
            host, port = parse_http(address)
            if port:  # (port 0: any free port, nothing to check)
                bind_http(host, port, address).close()
        except ConfigError as exc:
            fail(str(exc))
    return address


def Flag(default: bool, *names: str, help: str, **extra):  # noqa: N802 - reads like typer.Option
    """A boolean option shown as a flag (`--wait`), not as `--wait <bool>` (typer's rich help shows the type)."""
    return typer.Option(default, *names, is_flag=True, metavar="", help=help, **extra)


def _version(value: bool) -> None:
    if value:
        from importlib.metadata import PackageNotFoundError, version  # (~20 ms of imports: only when asked)

        try:
            typer.echo(f"ratefleet {version('ratefleet')}")
        except PackageNotFoundError:
            typer.echo("ratefleet (not installed)")
        raise typer.Exit()


def _main(_version_flag: bool = Flag(False, "--version", is_eager=True, callback=_version,
                                    help="print the version and exit")):
    """ratefleet: rate-limited API calls at scale over NATS JetStream."""


def run_command(coro_fn, *args, term_as_interrupt: bool = False):
    """Run a coroutine; RatefleetError (or a NATS/httpx failure) -> one line, exit 1; Ctrl-C -> exit 130
    (SIGTERM too with `term_as_interrupt`: cli_support.run_async)."""
    return run_async(coro_fn, *args, term_as_interrupt=term_as_interrupt)


def up(config: Path | None = ConfigOpt, nats: str | None = NatsOpt,
       workers: int = typer.Option(2, "--workers", "-w", min=0, help="worker processes"),
       dispatchers: int = typer.Option(1, "--dispatchers", min=1, help="dispatcher processes (leader + standbys)"),
       gateway: bool = Flag(False, "--gateway", help="also run `ratefleet gateway` (on [gateway].listen)"),
       http_host: str = typer.Option("127.0.0.1", "--http-host", metavar="HOST",
                                     help="where each process serves /metrics, /healthz, /readyz ('' for none)"),
       http_base_port: int = typer.Option(9464, "--http-base-port", min=0, max=65535, metavar="PORT",
                                          help="first probe port; each process takes the next free one "
                                               "(0: ports the system picks); printed at start")):
    """The whole fleet here: embedded NATS if none answers, dispatchers, N workers. Ctrl-C drains and stops."""
    with imports_without_gc():
        from ratefleet.roles import log_and_ignore_sighup
        from ratefleet.supervisor import run_fleet

    log_and_ignore_sighup()  # until run_fleet installs its own handler, which logs each one
    cfg, path = fleet_config(config, nats, "up")
    configure_logging()
    sys.exit(run_fleet(cfg, config_path=path, workers=workers, dispatchers=dispatchers, gateway=gateway,
                       http_host=http_host or None, http_base_port=http_base_port))


def dispatcher(config: Path | None = ConfigOpt, nats: str | None = NatsOpt,
               id: str | None = typer.Option(None, "--id", help="dispatcher id (default random)"),
               http: str | None = HttpOpt):
    """Run one dispatcher (run two or more for failover)."""
    with imports_without_gc():
        from ratefleet.roles import dispatcher_main, log_and_ignore_sighup

    http = _http_or_fail(http)
    cfg, _ = fleet_config(config, nats, "dispatcher")
    configure_logging()
    log_and_ignore_sighup()
    run_command(dispatcher_main, cfg, id, http)


def worker(config: Path | None = ConfigOpt, nats: str | None = NatsOpt,
           slots: int | None = typer.Option(None, "--slots", min=1, help="concurrent upstream calls"),
           id: str | None = typer.Option(None, "--id", help="worker id (default random)"),
           http: str | None = HttpOpt):
    """Run one worker process."""
    with imports_without_gc():
        from ratefleet.roles import log_and_ignore_sighup, worker_main

    http = _http_or_fail(http)
    cfg, _ = fleet_config(config, nats, "worker")
    configure_logging()
    log_and_ignore_sighup()
    run_command(worker_main, cfg, slots, id, http)


def register_roles(app: typer.Typer) -> None:
    """Add `up`, `dispatcher` and `worker` to `app`, in that order (`gateway` is added by
    ratefleet/gateway/command.py)."""
    for command in (up, dispatcher, worker):
        app.command()(command)


def new_app() -> RatefleetApp:
    """The `ratefleet` app with its `--version` option and no command yet."""
    app = RatefleetApp(add_completion=False, no_args_is_help=True, rich_markup_mode=MARKUP,
                       pretty_exceptions_enable=False,
                       help="ratefleet: rate-limited API calls at scale over NATS JetStream.")
    app.callback()(_main)
    return app


def role_app() -> RatefleetApp:
    """An app of the fleet-process commands alone (ROLE_COMMANDS)."""
    from ratefleet.gateway.command import register as register_gateway

    app = new_app()
    register_roles(app)
    register_gateway(app)
    return app


def main() -> None:
    """`ratefleet up|dispatcher|worker|gateway ...` (sys.argv), as ratefleet/cli.py's `main` runs it."""
    configure_logging()
    role_app()(prog_name="ratefleet")
