"""The `ratefleet` command line.

Every command that talks to NATS takes --config FILE (else $RATEFLEET_CONFIG, else ./ratefleet.toml),
read through one helper (cli_support.client_target / fleet_config), and --nats URL (or
$RATEFLEET_NATS_URL, over the config's [nats].url). Errors are one line with what to do next;
exit codes: 0 all succeeded, 1 some failed, 2 usage or input error, 130 interrupted.
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import typer

from ratefleet.cli_roles import MARKUP, ConfigOpt, Flag, NatsOpt, new_app, register_roles
from ratefleet.cli_roles import run_command as _run
from ratefleet.cli_support import (
    EXIT_FAILED,
    EXIT_INTERRUPTED,
    batch_value,
    check_wait_nats_s,
    client_target,
    fail,
    make_console,
    read_text_file,
    require_file,
    require_out_path,
    tier_help,
)
from ratefleet.config_cmd import config_app
from ratefleet.keys_cmd import keys_app
from ratefleet.runtime.logs import configure_logging

app = new_app()
dlq_app = typer.Typer(no_args_is_help=True, rich_markup_mode=MARKUP,
                      pretty_exceptions_enable=False, help="Inspect and replay dead letters.")
app.add_typer(dlq_app, name="dlq")
app.add_typer(keys_app, name="keys")
app.add_typer(config_app, name="config")

PrefixOpt = typer.Option(None, "--prefix", help="subject prefix, over the config's [nats].prefix (default ratefleet)")
TierOpt = typer.Option(..., "--tier", "-t", help=tier_help())
JsonOpt = Flag(False, "--json", help="raw JSON instead of tables")


def _traced_from_environment():
    """$TRACEPARENT (W3C Trace Context) as the parent of the jobs a command sends."""
    import os

    from ratefleet.runtime.tracing import environment_carrier, remote_parent

    return remote_parent(environment_carrier(os.environ))


register_roles(app)  # `up`, `dispatcher`, `worker` (ratefleet/cli_roles.py)


@app.command()
def submit(file: Path = typer.Argument(..., help="JSONL file, one Job per line ('-' for stdin)"),
           tier: str = TierOpt,
           batch: str | None = typer.Option(None, "--batch", "-b", metavar="NAME", callback=batch_value,
                                               help="batch name (default: a new submit-<time>-<hex>); the same "
                                                    "name again resumes and sends only lines not stored yet"),
           wait: bool = Flag(False, "--wait", help="follow results until every job has one (written to --out)"),
           out: Path | None = typer.Option(None, "--out", "-o", metavar="FILE",
                                              help="write Results here (JSONL; '-' for stdout)"),
           skip_invalid: bool = Flag(False, "--skip-invalid", help="submit the valid lines, report the rest"),
           rejects: Path | None = typer.Option(None, "--rejects", metavar="FILE",
                                               help="write every invalid line here: its number and error, and "
                                                    "its id / custom_id (JSONL; the screen lists the first 20)"),
           out_format: str = typer.Option("ratefleet", "--out-format", metavar="FORMAT",
                                          help="ratefleet (Result JSON) or openai (OpenAI Batch output lines)"),
           order: str = typer.Option("arrival", "--order", help="--out order: arrival or input (the file's line order)"),
           upstream: str | None = typer.Option(None, "--upstream", "-u", metavar="NAME",
                                               help="upstream of the lines that name none (OpenAI Batch API lines "
                                                    "never do); a line's own upstream wins"),
           config: Path | None = ConfigOpt, nats: str | None = NatsOpt, prefix: str | None = PrefixOpt):
    """Submit a batch of jobs (Job lines or OpenAI Batch API lines) with a progress bar; --wait collects their Results."""
    from ratefleet.submit_cmd import run_submit

    if out_format not in ("ratefleet", "openai"):
        fail(f"--out-format must be 'ratefleet' or 'openai', not {out_format!r}")
    if order not in ("arrival", "input"):
        fail(f"--order must be 'arrival' or 'input', not {order!r}")

    if str(file) != "-":
        require_file(file, "jobs file")
        import shlex

        from ratefleet.batchfile import packed_problem
        again = shlex.join(["ratefleet", *("-" if Path(arg) == file else arg for arg in sys.argv[1:])])
        if (problem := packed_problem(file, str(file), again)) is not None:
            fail(problem)
    if out is None or str(out) != "-":  # `--out -`: stdout
        require_out_path(out)
    if out is not None and str(out) != "-" and str(file) != "-" and out.exists() and out.samefile(file):
        fail(f"--out {out} is the jobs file itself: writing Results there would erase the jobs before they are "
             "sent; pass another path")
    if rejects is not None:
        if str(rejects) == "-":  # not stdout (as for --out): the Results may go there, and a file named '-' surprises
            fail("--rejects takes a file path ('-' is not stdout here); pass e.g. --rejects rejects.jsonl")
        require_out_path(rejects, "--rejects")
        for other, what in ((file, "the jobs file"), (out, "the --out file")):
            # neither may exist yet (a first run's --out): the same path is the same file all the same
            if other is not None and str(other) != "-" and (
                    rejects.samefile(other) if rejects.exists() and other.exists()
                    else rejects.resolve() == other.resolve()):
                fail(f"--rejects {rejects} is {what} itself: it would be overwritten; pass another path")
    if wait:
        check_wait_nats_s()
    target = client_target(config, nats, prefix)
    if out is not None and not wait:  # (a new user's finding: the file never came, and nothing said why)
        typer.echo(f"note: --out is written while --wait follows the Results; without --wait nothing is written to "
                   f"{out} now, and the last line prints the `ratefleet results` command that writes it", err=True)
    with _traced_from_environment():
        code = _run(run_submit, file, tier, batch, wait, out, skip_invalid, target.url, target.prefix, out_format,
                    order == "input", target.nats, upstream, target.config_args, rejects, term_as_interrupt=True)
    raise typer.Exit(code or 0)


@app.command()
def request(job: str = typer.Argument(..., help="Job JSON, @FILE, or - (standard input)"), tier: str = TierOpt,
            timeout: float = typer.Option(30.0, "--timeout", help="seconds to wait for the Result"),
            config: Path | None = ConfigOpt, nats: str | None = NatsOpt, prefix: str | None = PrefixOpt):
    """One job over request/reply; prints the Result; exit 0 only if it succeeded, 2 for a bad job or tier."""
    from ratefleet.client import Client, as_job
    from ratefleet.schemas.errors import JobInvalid
    from ratefleet.schemas.job import upstream_problem
    from ratefleet.submit_report import check_tier, fleet_upstreams

    if not math.isfinite(timeout) or timeout <= 0:  # checked before the job is stored (and paid for)
        fail(f"--timeout must be a number of seconds above 0, not {timeout:g}")
    if job in ("-", "@-"):
        raw = sys.stdin.buffer.read()
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as exc:  # (as a file is: before, a lone surrogate U+DCFF was named)
            fail(f"the job on standard input is not UTF-8 (byte 0x{raw[exc.start]:02x} at byte {exc.start + 1}); "
                 "send it as UTF-8")
    else:
        text = read_text_file(Path(job[1:]), "job file") if job.startswith("@") else job
    try:
        model = as_job(json.loads(text))
    except (ValueError, RecursionError) as exc:
        fail(f"the job is not valid JSON ({type(exc).__name__}: {exc}); pass one JSON object or @FILE")
    except (JobInvalid, AttributeError, TypeError) as exc:  # an input error, like a bad line in `submit`
        fail(f"invalid job: {exc}")
    target = client_target(config, nats, prefix)
    sent = False

    async def go():
        nonlocal sent
        async with await Client.connect(target.url, prefix=target.prefix, auth=target.nats, reconnect_forever=False) as client:
            problem = await check_tier(client, tier)
            if problem:
                return problem
            # as `submit` checks every line: a job the fleet's live config cannot route is refused
            # here (exit 2), not stored to end `invalid` with a dead letter no replay can help
            upstreams = await fleet_upstreams(client, warn=lambda text: typer.echo(text, err=True), tier=tier)
            if upstreams is not None and (routed := upstream_problem(model, upstreams)) is not None:
                return f"invalid job: {routed[1]} (the fleet's live config); nothing was stored"
            sent = True  # from here the job may be stored: Ctrl-C says how to find it
            return await client.request(model, tier, timeout=timeout)

    try:
        with _traced_from_environment():
            result = _run(go, term_as_interrupt=True)
    except typer.Exit as stop:
        if stop.exit_code == EXIT_INTERRUPTED and sent:
            make_console(stderr=True).print(
                f"interrupted: job {model.id} may be stored and then keeps running; see its Result with "
                f"`ratefleet result {model.id}`", markup=False, highlight=False, soft_wrap=True)
        raise
    if isinstance(result, str):
        fail(result)
    typer.echo(result.model_dump_json(by_alias=True, indent=2))
    raise typer.Exit(0 if result.ok else EXIT_FAILED)


@app.command()
def status(config: Path | None = ConfigOpt, nats: str | None = NatsOpt, prefix: str | None = PrefixOpt,
           as_json: bool = JsonOpt,
           watch: bool = Flag(False, "--watch", help="a live view refreshed in place until Ctrl-C (tiers with done/s, "
                                                   "keys, workers, leader, config revision)"),
           interval: float = typer.Option(2.0, "--interval", min=0.2, metavar="S", help="--watch: seconds between refreshes")):
    """Tiers (queued, pending, in flight), keys (tokens, in flight, breaker, 429s), workers; --watch: live."""
    import contextlib

    import anyio

    from ratefleet.client import Client
    from ratefleet.config_applied import config_drift
    from ratefleet.runtime.config_kv import read_config
    from ratefleet.status_view import render_status

    target = client_target(config, nats, prefix)
    if watch:
        if as_json:
            fail("--json is one answer for scripts; use --watch without --json, or run --json on a schedule")
        from ratefleet.status_watch import run_watch

        raise typer.Exit(_run(run_watch, target.url, target.prefix, interval, make_console(), target.nats))

    async def go():
        async with await Client.connect(target.url, prefix=target.prefix, auth=target.nats, reconnect_forever=False) as client:
            answer = await client.status()
            stored = None
            if not as_json and target.source != "<defaults>" and answer.get("config_revision") is not None:
                with contextlib.suppress(Exception):  # a client may not read the config bucket
                    with anyio.fail_after(1.0):
                        found = await read_config(client.js, client.subjects)
                    stored = found[1] if found else None
            return answer, stored

    answer, stored = _run(go)
    if as_json:
        typer.echo(json.dumps(answer, indent=2))
    else:
        console = make_console()
        render_status(answer, console)
        if stored is not None and (note := config_drift(Path(target.source), answer.get("config_revision"), stored)):
            console.print(note, markup=False, highlight=False, soft_wrap=True)


@app.command("mock-upstream")
def mock_upstream(port: int = typer.Option(8900, "--port"), host: str = typer.Option("127.0.0.1", "--host"),
                  key: list[str] = typer.Option([], "--key", metavar="SPEC",
                                                  help="id=SECRET:rps=20:burst=5[:concurrency=N][:cost_per_minute=N]"),
                  rps: float = typer.Option(20.0, "--rps", help="limit for keys not listed"),
                  burst: float = typer.Option(5.0, "--burst"),
                  latency_ms: float = typer.Option(0.0, "--latency-ms"),
                  latency_jitter_ms: float = typer.Option(0.0, "--latency-jitter-ms"),
                  fail_rate: float = typer.Option(0.0, "--fail-rate", min=0.0, max=1.0),
                  fail_status: int = typer.Option(500, "--fail-status"),
                  tokens_per_call: int | None = typer.Option(
                      None, "--tokens-per-call", min=0,
                      help="charge and report every call this many tokens (default: by its size, the "
                           "prompt's characters / 4 plus max_tokens per choice, corrected to the answer's usage)")):
    """A local OpenAI-style upstream enforcing per-key limits (429 + Retry-After, x-ratelimit headers)."""
    from ratefleet.mock import MockSettings, parse_key_spec, serve_forever
    from ratefleet.mock.server import bind_socket

    try:
        keys = [parse_key_spec(spec) for spec in key]
    except ValueError as exc:
        fail(f"{exc}; the form is --key id=SECRET:rps=20:burst=5")
    settings = MockSettings(host=host, port=port, keys=keys, default_rps=rps, default_burst=burst,
                            latency_ms=latency_ms, latency_jitter_ms=latency_jitter_ms, fail_rate=fail_rate,
                            fail_status=fail_status, tokens_per_call=tokens_per_call)
    try:
        sock = bind_socket(host, port)
    except OSError as exc:  # a port in use, an address not on this machine: one line, not "unexpected OSError"
        fail(f"--host {host} --port {port}: cannot listen there ({exc.strerror or exc}); pass another --port "
             "(0: any free port) and point the fleet's [upstreams.<name>] base_url at it")
    serve_forever(settings, announce=typer.echo, sock=sock)  # one line, once bound (with --port 0 the port it got)


@app.command()
def demo(jobs: int = typer.Option(400, "--jobs", min=1, help="guest flood size"),
         vip: int = typer.Option(20, "--vip", min=0, help="vip jobs sent behind the flood"),
         workers: int = typer.Option(2, "--workers", min=1, max=16, help="worker processes")):
    """Embedded NATS + mock upstream + fleet; a guest flood and some vip jobs; live progress and a summary."""
    from ratefleet.demo import run_demo

    configure_logging("WARNING")
    raise typer.Exit(run_demo(guest_jobs=jobs, vip_jobs=vip, workers=workers))


CodeOpt = typer.Option(None, "--code", metavar="CODE",
                       help="only letters with this reason code (as `dlq list` shows it; repeat for several)")
GivenUpOpt = Flag(False, "--given-up", help="only letters of jobs the fleet gave up on (attempts_exhausted, "
                                            "no_key_available, poison_message, rate_limited): not the request's "
                                            "fault, unlike invalid ones")


def _letter_codes(code: list[str] | None, given_up: bool) -> frozenset[str] | None:
    """The reason codes --code and --given-up select (None: every letter); exit 2 on a code no
    part of ratefleet writes in a dead letter (`ErrorCode`, and UNKNOWN_LETTER_CODE)."""
    from ratefleet.results_replays import GAVE_UP
    from ratefleet.runtime.finish import UNKNOWN_LETTER_CODE
    from ratefleet.schemas.result import ErrorCode

    known = {str(member) for member in ErrorCode} | {UNKNOWN_LETTER_CODE}  # (a letter whose Result has no error)
    for one in code or ():
        if one not in known:
            fail(f"--code {one!r} is not a reason code ratefleet writes; one of: {', '.join(sorted(known))}")
    if not code and not given_up:
        return None
    return frozenset(code or ()) | (GAVE_UP if given_up else frozenset())


@dlq_app.command("list")
def dlq_list(tier: str | None = typer.Option(None, "--tier", help=tier_help("only this tier")),
             limit: int = typer.Option(50, "--limit", min=0, help="letters shown, oldest first (a note on stderr "
                                                                  "says how many more are stored)"),
             batch: str | None = typer.Option(None, "--batch", "-b", metavar="NAME", callback=batch_value,
                                              help="only letters of this batch's jobs"),
             code: list[str] | None = CodeOpt, given_up: bool = GivenUpOpt,
             config: Path | None = ConfigOpt,
             nats: str | None = NatsOpt, prefix: str | None = PrefixOpt, as_json: bool = JsonOpt):
    """List dead letters: job id, tier, reason, attempts."""
    from ratefleet.dlq import list_dead

    codes = _letter_codes(code, given_up)
    target = client_target(config, nats, prefix)
    _run(list_dead, target.url, target.prefix, tier, limit, as_json, target.nats, batch, codes)


@dlq_app.command("replay")
def dlq_replay(tier: str | None = typer.Option(None, "--tier", help=tier_help("only this tier")),
               id: str | None = typer.Option(None, "--id", metavar="JOB_ID",
                                                help="only the dead letter of this job id (as `dlq list` shows it)"),
               batch: str | None = typer.Option(None, "--batch", "-b", metavar="NAME", callback=batch_value,
                                                help="only the letters of this batch's jobs (a later `ratefleet "
                                                     "results --batch NAME` writes their new Results in place)"),
               code: list[str] | None = CodeOpt, given_up: bool = GivenUpOpt,
               config: Path | None = ConfigOpt,
               nats: str | None = NatsOpt, prefix: str | None = PrefixOpt,
               purge: bool = Flag(True, "--purge/--keep", help="remove replayed letters from the DLQ"),
               yes: bool = Flag(False, "--yes", "-y", help="replay every letter without asking (at a terminal, "
                                                          "without --id or --tier, it asks first)")):
    """Resubmit dead letters (those holding a job) under a new id that names the original; prints the new ids."""
    from ratefleet.dlq import replay_dead

    codes = _letter_codes(code, given_up)
    target = client_target(config, nats, prefix)
    if id is None and tier is None and batch is None and not yes and sys.stdin.isatty() and sys.stderr.isatty():
        # every letter (of every batch, also with --code or --given-up), each called (and paid for)
        # again: asked at a terminal; a script is not asked
        which = f" with code {' or '.join(sorted(codes))}" if codes else ""
        if not typer.confirm(f"replay every dead letter holding a job{which}, of every batch (each is called "
                             "again)?", default=False, err=True):
            typer.echo("nothing replayed (pass --id JOB_ID, --batch B or --tier T for some, --yes for all)", err=True)
            raise typer.Exit(1)
    replayed = _run(replay_dead, target.url, target.prefix, tier, id, purge, target.nats, batch, codes)
    for original, new_id in replayed:
        typer.echo(f"{original} -> {new_id}")
    typer.echo(f"replayed {len(replayed)} dead letter(s)")
    if not replayed and (id is not None or tier is not None or batch is not None or codes is not None):
        which = " and ".join(part for part in (f"job id {id!r}" if id else "", f"tier {tier!r}" if tier else "",
                                               f"batch {batch!r}" if batch else "",
                                               f"code {' or '.join(sorted(codes))}" if codes else "") if part)
        fail(f"no replayable dead letter with {which}; `ratefleet dlq list` shows the dead letters "
             "(a letter without its job cannot be replayed)", code=1)


from ratefleet.results_cmd import register as _register_results  # noqa: E402 - `results`, `result`

_register_results(app)

from ratefleet.cancel_cmd import register as _register_cancel  # noqa: E402 - `cancel`

_register_cancel(app)

from ratefleet.gateway.command import register as _register_gateway  # noqa: E402 - `gateway`

_register_gateway(app)


def _default_url() -> str:
    from ratefleet.schemas.config import DEFAULT_NATS_URL

    return DEFAULT_NATS_URL


def main() -> None:
    """The `ratefleet` program (the console script and `python -m ratefleet`). Its log lines go
    to stderr, JSON when that is not a terminal (a role sets them again with its level):
    structlog's default printed them to stdout, into a command's output (`ratefleet result ID >
    result.json`; `cancel` as a restricted NATS user got a permissions warning there)."""
    configure_logging()
    app(prog_name="ratefleet")  # messages name the command users type, not `python -m ratefleet`
