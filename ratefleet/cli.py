"""The `ratefleet` command line. Every command takes --nats URL (or $RATEFLEET_NATS_URL)."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Optional

import anyio
import typer

from ratefleet.errors import RatefleetError
from ratefleet.runtime.logs import configure_logging
from schemas import ConfigError, load_config

app = typer.Typer(add_completion=False, no_args_is_help=True,
                  help="ratefleet: rate-limited API calls at scale over NATS JetStream.")
dlq_app = typer.Typer(no_args_is_help=True, help="Inspect and replay dead letters.")
app.add_typer(dlq_app, name="dlq")

ConfigOpt = typer.Option(None, "--config", "-c", help="TOML config (else $RATEFLEET_CONFIG, else ./ratefleet.toml)")
NatsOpt = typer.Option(None, "--nats", envvar="RATEFLEET_NATS_URL", help="NATS URL (default nats://127.0.0.1:4222)")


def fail(message: str, code: int = 2) -> None:
    typer.secho(f"error: {message}", fg=typer.colors.RED, err=True)
    raise typer.Exit(code)


def _config(config: Optional[Path], nats_url: Optional[str]):
    try:
        return load_config(config, nats_url=nats_url)
    except ConfigError as exc:
        fail(str(exc))


def _run(coro_fn, *args):
    try:
        return anyio.run(coro_fn, *args)
    except RatefleetError as exc:
        fail(str(exc), 1)
    except BaseExceptionGroup as group:  # raised inside a task group: report the first of ours
        ours = group.subgroup(lambda e: isinstance(e, RatefleetError))
        if ours is None:
            raise
        first = ours.exceptions[0]
        while isinstance(first, BaseExceptionGroup):
            first = first.exceptions[0]
        fail(str(first), 1)
    except KeyboardInterrupt:
        raise typer.Exit(130)


@app.command()
def up(config: Optional[Path] = ConfigOpt, nats: Optional[str] = NatsOpt,
       workers: int = typer.Option(2, "--workers", "-w", min=0, help="worker processes"),
       dispatchers: int = typer.Option(1, "--dispatchers", min=1, help="dispatcher processes (leader + standbys)")):
    """The whole fleet here: embedded NATS if none answers, dispatchers, N workers. Ctrl-C drains and stops."""
    from ratefleet.runtime.supervisor import run_fleet

    cfg = _config(config, nats)
    configure_logging()
    sys.exit(run_fleet(cfg, config_path=config, workers=workers, dispatchers=dispatchers))


@app.command()
def dispatcher(config: Optional[Path] = ConfigOpt, nats: Optional[str] = NatsOpt,
               id: Optional[str] = typer.Option(None, "--id", help="dispatcher id (default random)")):
    """Run one dispatcher (run two or more for failover)."""
    from ratefleet.runtime.roles import dispatcher_main

    cfg = _config(config, nats)
    configure_logging()
    _run(dispatcher_main, cfg, id)


@app.command()
def worker(config: Optional[Path] = ConfigOpt, nats: Optional[str] = NatsOpt,
           slots: Optional[int] = typer.Option(None, "--slots", min=1, help="concurrent upstream calls"),
           id: Optional[str] = typer.Option(None, "--id", help="worker id (default random)")):
    """Run one worker process."""
    from ratefleet.runtime.roles import worker_main

    cfg = _config(config, nats)
    configure_logging()
    _run(worker_main, cfg, slots, id)


@app.command()
def submit(file: Path = typer.Argument(..., help="JSONL file, one Job per line ('-' for stdin)"),
           tier: str = typer.Option(..., "--tier", "-t"), batch: Optional[str] = typer.Option(None, "--batch", "-b"),
           wait: bool = typer.Option(False, "--wait", help="follow results until every job has one"),
           out: Optional[Path] = typer.Option(None, "--out", "-o", help="write Results here (JSONL)"),
           skip_invalid: bool = typer.Option(False, "--skip-invalid", help="submit the valid lines, report the rest"),
           nats: Optional[str] = NatsOpt, prefix: str = typer.Option("ratefleet", "--prefix")):
    """Submit a batch of jobs with a progress bar; --wait collects their Results."""
    from ratefleet.submit_cmd import run_submit

    code = _run(run_submit, file, tier, batch, wait, out, skip_invalid, nats or _default_url(), prefix)
    raise typer.Exit(code or 0)


@app.command()
def request(job: str = typer.Argument(..., help="Job JSON, or @FILE"), tier: str = typer.Option(..., "--tier", "-t"),
            timeout: float = typer.Option(30.0, "--timeout"), nats: Optional[str] = NatsOpt,
            prefix: str = typer.Option("ratefleet", "--prefix")):
    """One job over request/reply; prints the Result; exit 0 only if it succeeded."""
    from ratefleet.client import Client

    text = Path(job[1:]).read_text() if job.startswith("@") else job
    try:
        payload = json.loads(text)
    except ValueError as exc:
        fail(f"the job is not valid JSON: {exc}")

    async def go():
        async with await Client.connect(nats or _default_url(), prefix=prefix) as client:
            return await client.request(payload, tier, timeout=timeout)

    result = _run(go)
    typer.echo(result.model_dump_json(by_alias=True, indent=2))
    raise typer.Exit(0 if result.ok else 1)


@app.command()
def status(nats: Optional[str] = NatsOpt, prefix: str = typer.Option("ratefleet", "--prefix"),
           as_json: bool = typer.Option(False, "--json", help="raw JSON instead of tables")):
    """Tiers (queued, pending, in flight), keys (tokens, in flight, breaker, 429s), workers."""
    from ratefleet.client import Client
    from ratefleet.status_view import render_status

    async def go():
        async with await Client.connect(nats or _default_url(), prefix=prefix) as client:
            return await client.status()

    answer = _run(go)
    if as_json:
        typer.echo(json.dumps(answer, indent=2))
    else:
        render_status(answer)


@app.command("mock-upstream")
def mock_upstream(port: int = typer.Option(8900, "--port"), host: str = typer.Option("127.0.0.1", "--host"),
                  key: list[str] = typer.Option([], "--key", help="id=SECRET:rps=20:burst=5[:concurrency=N][:cost_per_minute=N]"),
                  rps: float = typer.Option(20.0, "--rps", help="limit for keys not listed"),
                  burst: float = typer.Option(5.0, "--burst"),
                  latency_ms: float = typer.Option(0.0, "--latency-ms"),
                  latency_jitter_ms: float = typer.Option(0.0, "--latency-jitter-ms"),
                  fail_rate: float = typer.Option(0.0, "--fail-rate", min=0.0, max=1.0),
                  fail_status: int = typer.Option(500, "--fail-status")):
    """A local OpenAI-style upstream enforcing per-key limits (429 + Retry-After, x-ratelimit headers)."""
    from ratefleet.mock import MockSettings, parse_key_spec, serve_forever

    try:
        keys = [parse_key_spec(spec) for spec in key]
    except ValueError as exc:
        fail(str(exc))
    settings = MockSettings(host=host, port=port, keys=keys, default_rps=rps, default_burst=burst,
                            latency_ms=latency_ms, latency_jitter_ms=latency_jitter_ms, fail_rate=fail_rate,
                            fail_status=fail_status)
    typer.echo(f"mock upstream on http://{host}:{port} (stats: /_mock/stats)")
    serve_forever(settings)


@app.command()
def demo(jobs: int = typer.Option(400, "--jobs", help="guest flood size"), vip: int = typer.Option(20, "--vip"),
         workers: int = typer.Option(2, "--workers")):
    """Embedded NATS + mock upstream + fleet; a guest flood and some vip jobs; live progress and a summary."""
    from ratefleet.demo import run_demo

    configure_logging("WARNING")
    raise typer.Exit(run_demo(guest_jobs=jobs, vip_jobs=vip, workers=workers))


@dlq_app.command("list")
def dlq_list(tier: Optional[str] = typer.Option(None, "--tier"), limit: int = typer.Option(50, "--limit"),
             nats: Optional[str] = NatsOpt, prefix: str = typer.Option("ratefleet", "--prefix"),
             as_json: bool = typer.Option(False, "--json")):
    """List dead letters: job id, tier, reason, attempts."""
    from ratefleet.dlq import list_dead

    _run(list_dead, nats or _default_url(), prefix, tier, limit, as_json)


@dlq_app.command("replay")
def dlq_replay(tier: Optional[str] = typer.Option(None, "--tier"), id: Optional[str] = typer.Option(None, "--id"),
               nats: Optional[str] = NatsOpt, prefix: str = typer.Option("ratefleet", "--prefix"),
               purge: bool = typer.Option(True, "--purge/--keep", help="remove replayed letters from the DLQ")):
    """Resubmit dead letters (those holding a job) under a new id that names the original."""
    from ratefleet.dlq import replay_dead

    count = _run(replay_dead, nats or _default_url(), prefix, tier, id, purge)
    typer.echo(f"replayed {count} dead letter(s)")


from ratefleet.results_cmd import register as _register_results  # noqa: E402 - `results`, `result`

_register_results(app)


def _default_url() -> str:
    from schemas.config import DEFAULT_NATS_URL

    return DEFAULT_NATS_URL
