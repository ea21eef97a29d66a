"""`ratefleet gateway`: the OpenAI-compatible front door as a process."""

from __future__ import annotations

from pathlib import Path

import anyio
import typer

from ratefleet.cli_support import EXIT_FAILED, EXIT_INTERRUPTED, fail, load_config_or_fail
from ratefleet.runtime.gctune import imports_without_gc
from ratefleet.runtime.logs import configure_logging
from ratefleet.schemas.config import config_path
from ratefleet.schemas.config_env import EnvOverrides
from ratefleet.schemas.errors import ConfigError, RatefleetError


def gateway(config: Path | None = typer.Option(None, "--config", "-c",
                                               help="TOML config with [callers.<name>] (else $RATEFLEET_CONFIG, "
                                                    "else ./ratefleet.toml)"),
            nats: str | None = typer.Option(None, "--nats", envvar="RATEFLEET_NATS_URL",
                                            help="NATS URL, over the config's [nats].url"),
            listen: str | None = typer.Option(None, "--listen", metavar="HOST:PORT",
                                              help="where to serve (default: [gateway].listen, 127.0.0.1:8080)")):
    """Serve the upstream's HTTP API (OpenAI SDK: base_url http://HOST:PORT/v1) as jobs on each caller's tier."""
    with imports_without_gc():
        from ratefleet.gateway.server import gateway_main, parse_listen
        from ratefleet.roles import log_and_ignore_sighup

    found = config_path(config)
    if found is None:
        fail("`ratefleet gateway` found no config file; pass --config FILE with [callers.<name>] "
             "(key, tier) sections")
    cfg = load_config_or_fail(found, nats)
    address = listen or cfg.gateway.listen
    try:
        parse_listen(address)
    except ConfigError as exc:
        fail(str(exc))
    if listen:
        source = f"--listen {address}"
    elif EnvOverrides().gateway_listen:
        source = f"RATEFLEET_GATEWAY_LISTEN={address}"
    else:
        source = f"[gateway] listen {address}"
    configure_logging()
    log_and_ignore_sighup()
    try:
        anyio.run(gateway_main, cfg, address, source)
    except ConfigError as exc:
        fail(str(exc))
    except RatefleetError as exc:
        fail(str(exc), EXIT_FAILED)
    except KeyboardInterrupt:
        raise typer.Exit(EXIT_INTERRUPTED) from None


def register(app: typer.Typer) -> None:
    """Add `gateway` to the `ratefleet` command line."""
    app.command("gateway")(gateway)
