"""What every `ratefleet` command shares: finding the config, one-line errors, plain output.

Exit codes (the README's "Exit codes"): 0 all succeeded, 1 some failed (or the fleet could
not do it), 2 usage or input error (bad flag, missing file, bad config), 130 interrupted, 141 the
reader of stdout went away (a closed pipe: quiet, like a standard Unix tool).
"""

from __future__ import annotations

import contextlib
import math
import os
import signal
import sys
import threading
import time
import tomllib
import warnings
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NoReturn, TypeVar

import anyio
import typer
from rich.console import Console

from ratefleet.runtime.edge import NO_ANSWER, translate
from ratefleet.runtime.logs import redact_text
from ratefleet.schemas.config import (
    DEFAULT_NATS_URL,
    DEFAULT_TIERS,
    Config,
    ConfigError,
    NatsConfig,
    config_path,
    load_config,
    load_nats_only,
)
from ratefleet.schemas.errors import NatsRefused, NatsUnavailable

T = TypeVar("T")
EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_INTERRUPTED = 0, 1, 2, 130
PIPE_WIDTH = 200  # columns of a console that is not a terminal and has no $COLUMNS
EXIT_BROKEN_PIPE = 141  # 128 + SIGPIPE: what the shell reports for a standard tool whose reader went away
LOOKED_AT = "--config FILE, $RATEFLEET_CONFIG, ./ratefleet.toml"
START_HINT = ("copy examples/local.toml (with `ratefleet mock-upstream` as the upstream) or examples/openai.toml "
              "to ratefleet.toml, or pass --config FILE")


def plain_output() -> bool:
    """True when output must carry no ANSI styling: $NO_COLOR set (any value but empty) or not a terminal.

    Source: https://no-color.org ("when present and not an empty string ... prevents the
    addition of ANSI color").
    """
    if os.environ.get("NO_COLOR"):
        return True
    return not (sys.stdout.isatty() and sys.stderr.isatty())


class _Console(Console):
    """rich's Console, except that a reader that went away (`ratefleet status | head -1`) ends the
    command with 141 like every other ratefleet command and a standard Unix tool: rich's own
    `on_broken_pipe` exits 1, which reads as a failure."""

    def on_broken_pipe(self) -> None:
        self.quiet = True
        raise SystemExit(quiet_broken_pipe())


def make_console(*, stderr: bool = False) -> Console:
    """A rich Console that prints no escape codes at all when `plain_output()` (colours, bold, cursor moves)."""
    stream = sys.stderr if stderr else sys.stdout
    # not a terminal (a pipe, a file, a CI log): $COLUMNS if set, else 200 columns so tables keep whole ids
    width = None if os.environ.get("COLUMNS") or stream.isatty() else PIPE_WIDTH
    if plain_output():
        return _Console(stderr=stderr, color_system=None, no_color=True, force_terminal=False, highlight=False,
                        emoji=False, width=width)
    return _Console(stderr=stderr, highlight=False, width=width)


def one_line(message: str) -> str:
    """A possibly multi-line message as one line (`; ` between its lines)."""
    parts = [line.strip() for line in str(message).splitlines() if line.strip()]
    return "; ".join(parts).replace(":;", ":")


def fail(message: str, code: int = EXIT_USAGE) -> NoReturn:
    """Print `error: <message>` as one line on stderr and exit with `code` (2 unless said otherwise).
    After NATS refused this user a subject, an answer the command read as "none" (exit 2: no Result
    stored) is not one: the refusal is the cause, exit 1 (NATS could not be used)."""
    from ratefleet.runtime.connect import permission_denials

    _print_error(one_line(message))
    raise typer.Exit(EXIT_FAILED if code == EXIT_USAGE and permission_denials() else code)


def _as_ctrl_c(signum: int, frame: object) -> None:
    """SIGTERM handled as SIGINT: the event loop's runner then cancels the command's task as it
    does on Ctrl-C, so the command's own cleanup runs (raising KeyboardInterrupt here would cut
    it wherever the loop happened to be)."""
    signal.raise_signal(signal.SIGINT)


WAIT_NATS_ENV = "RATEFLEET_WAIT_NATS_S"
WAIT_NATS_S = 300.0  # seconds a --wait rides out NATS being away (a restart of `ratefleet up` takes a few)


def wait_nats_s() -> float:
    """How long a --wait rides out NATS being away, in seconds: $RATEFLEET_WAIT_NATS_S when set
    (unset or empty: WAIT_NATS_S). Raises ValueError, naming the variable, for a value that is
    not a finite number of seconds above 0 (before, `RATEFLEET_WAIT_NATS_S=5m` silently meant
    300 s: a pipeline meant to give up after five minutes waited five minutes by luck, and one
    set to `30s` waited ten times longer than asked)."""
    raw = os.environ.get(WAIT_NATS_ENV, "").strip()
    if not raw:
        return WAIT_NATS_S
    try:
        value = float(raw)
    except ValueError:
        value = math.nan
    if not math.isfinite(value) or value <= 0:
        raise ValueError(f"${WAIT_NATS_ENV}={raw!r} is not a number of seconds above 0 (how long a --wait rides "
                         f"out NATS being away; unset, {WAIT_NATS_S:g}); set e.g. {WAIT_NATS_ENV}=600 or unset it")
    return value


def check_wait_nats_s() -> None:
    """`fail` (exit 2) when $RATEFLEET_WAIT_NATS_S is set to something `wait_nats_s` refuses: said
    before anything is sent, not when NATS first goes away in the middle of a night's wait."""
    try:
        wait_nats_s()
    except ValueError as exc:
        fail(str(exc))


class WaitOutage(NatsUnavailable):
    """NATS away longer than a --wait rides out (`ride_out_nats`)."""


async def ride_out_nats(client: Any, say: Callable[[str], None], limit_s: float | None = None) -> None:
    """Run beside a --wait (whose Client reconnects for ever) until cancelled: say once when NATS
    goes away and when it is back, and raise WaitOutage when it has been away for `limit_s`
    seconds (default `wait_nats_s()`). A trial: a restart of `ratefleet up` ended `results --wait`
    after 5 s and `submit --wait` after 30 s, a nightly pipeline's wait with them."""
    limit = wait_nats_s() if limit_s is None else limit_s
    away_since: float | None = None
    while True:
        await anyio.sleep(0.25)
        nc = client.nc
        if nc.is_connected:
            if away_since is not None:
                say("NATS is back; the wait goes on")
                away_since = None
            continue
        if nc.is_closed:
            raise WaitOutage("the connection to NATS was closed")
        now = time.monotonic()
        if away_since is None:
            away_since = now
            say(f"NATS is away (reconnecting; a restart of `ratefleet up` looks like this): the wait goes on for up "
                f"to {limit:g} s (${WAIT_NATS_ENV}); Ctrl-C stops it, the jobs keep running")
        elif now - away_since > limit:
            raise WaitOutage(f"NATS has been away for {limit:g} s")


def nats_lost(exc: BaseException) -> str | None:
    """When `exc` (also a task group's ExceptionGroup) stands for NATS going away or not answering
    (runtime/edge.py `translate` gives a NatsUnavailable), a short cause for a CLI user, else None.
    The wait commands print it with the commands to carry on (a trial: `results --wait` ended 5 s
    into a restart of `ratefleet up` with Python Client advice and no command to resume)."""
    if isinstance(exc, BaseExceptionGroup):
        return next((cause for leaf in exc.exceptions if (cause := nats_lost(leaf)) is not None), None)
    if isinstance(exc, WaitOutage):
        return str(exc)
    ours = translate(exc)
    if not isinstance(ours, NatsUnavailable) or isinstance(ours, NatsRefused):
        return None
    answered = NO_ANSWER in str(ours)  # (edge.translate's words for a timeout)
    return ("NATS stopped answering" if answered else "the connection to NATS was lost") + f" ({type(exc).__name__})"


def run_async(coro_fn: Callable[..., Awaitable[T]], *args: object, term_as_interrupt: bool = False) -> T:
    """Run a command's coroutine. A ratefleet error, or a NATS/httpx failure it stands for
    (runtime/edge.py), becomes one line and exit 1 (the first one of a task group's errors);
    Ctrl-C exits 130; anything else (a bug) keeps its traceback.

    `term_as_interrupt` (the client commands that wait and write as they go: `submit`, `results`,
    `request`): SIGTERM (a job scheduler's or `timeout`'s stop) takes Ctrl-C's path, so what was
    received is written and the command to go on printed (an operator's trial: `submit --wait
    --out` killed by SIGTERM lost the 9 Results shown as received). Only while SIGINT has Python's
    own handler, which the event loop's runner replaces: a process started with SIGINT ignored (a
    `cmd &` in a script) keeps SIGTERM's default, else it would not stop at all (a reviewer's
    finding). The roles keep SIGTERM's default until their own drain handler is in place. A SIGTERM
    that raises KeyboardInterrupt already (`ratefleet demo` sets Python's default_int_handler for it,
    for its synchronous start) is armed too: raised inside the event loop, KeyboardInterrupt landed
    wherever the loop was (a demo sent SIGTERM 1 s after its fleet started did not end within 30 s
    once, in a loaded CI run; not reproduced since, so this is the likely cause, not a proven one)."""
    previous = signal.getsignal(signal.SIGTERM)
    armed = (term_as_interrupt and threading.current_thread() is threading.main_thread()
             and previous in (signal.SIG_DFL, signal.default_int_handler)
             and signal.getsignal(signal.SIGINT) is signal.default_int_handler)
    if armed:
        signal.signal(signal.SIGTERM, _as_ctrl_c)
    try:
        return anyio.run(coro_fn, *args)
    except KeyboardInterrupt:
        raise typer.Exit(EXIT_INTERRUPTED) from None
    except BaseException as exc:
        known: BaseException | None = exc
        if isinstance(exc, BaseExceptionGroup):  # raised inside a task group: the first error we know
            known = exc.subgroup(lambda e: not isinstance(e, BaseExceptionGroup) and translate(e) is not None)
        ours = translate(known, "running the command") if known is not None else None
        if ours is None:
            raise
        fail(str(ours), EXIT_FAILED)
    finally:
        if armed:
            signal.signal(signal.SIGTERM, previous)


def batch_value(value: str | None) -> str | None:
    """The `--batch` callback: a value starting with "--" is an option the shell left there
    when a variable was empty (`--batch $B --wait` with B unset took "--wait" as the name, and a
    nightly-batch trial's submit stored 20,000 jobs again under that new batch). Raises
    typer.BadParameter (exit 2, before anything is sent)."""
    if value is not None and value.startswith("--"):
        raise typer.BadParameter(f"{value!r} is an option, not a batch name: was a variable after --batch empty? "
                                 "(batch names cannot start with '--')")
    return value


def require_file(path: Path, what: str = "input file") -> Path:
    """`path` when it is a readable file; otherwise exit 2 with one line saying what to do next."""
    if path.is_file() and os.access(path, os.R_OK):
        return path
    if not path.exists():
        fail(f"{what} {path} does not exist; check the path (relative paths start at {Path.cwd()})")
    if path.is_dir():
        fail(f"{what} {path} is a directory; pass a file")
    if not path.is_file():
        fail(f"{what} {path} is not a regular file (a pipe, socket or device); pass a regular file, or feed "
             "it on standard input as '-' where the command takes that")
    fail(f"{what} {path} cannot be read; check its permissions")


def require_out_path(path: Path | None, what: str = "--out") -> Path | None:
    """`path` when a file can be written there (its folder exists and is not a directory itself); else exit 2."""
    if path is None:
        return None
    if path.is_dir():
        fail(f"{what} {path} is a directory; pass a file path")
    if not path.parent.is_dir():
        fail(f"{what} {path}: folder {path.parent} does not exist; create it or pass another path")
    return path


def read_text_file(path: Path, what: str = "input file") -> str:
    """The text of `path`, or exit 2 with one line (missing, a directory, unreadable, not UTF-8)."""
    require_file(path, what)
    try:
        return path.read_text()
    except (OSError, UnicodeDecodeError) as exc:
        fail(f"{what} {path} cannot be read ({exc.__class__.__name__}: {exc}); pass a readable UTF-8 file")


def _nats_only_or_fail(found: Path | None, nats: str | None, error: ConfigError) -> Config:
    """A client command whose config has an error outside `[nats]` goes on with `[nats]` alone,
    saying so on stderr; exit 2 with the error when `[nats]` itself cannot be read."""
    try:
        cfg = load_nats_only(found, nats_url=nats)
    except ConfigError:
        fail(str(error))
    _print_warning(f"{one_line(str(error))}; this command needs only [nats] and goes on with it "
                   "(fix the file before the fleet reads it: `ratefleet config check`)")
    return cfg


@dataclass(frozen=True)
class ClientTarget:
    """Where a client command (submit, request, status, dlq, results) sends: NATS URL(s) and subject prefix.

    Credentials ride in the URL (`nats://user:password@host:4222`, `nats://token@host:4222`) or
    in the config's [nats] (user/password, token, nkey_seed, creds, tls_*): `nats`.
    """

    url: str
    prefix: str
    tiers: tuple[str, ...]
    source: str  # the config file used, or "<defaults>"
    nats: NatsConfig | None = None

    @property
    def config_args(self) -> tuple[str, ...]:
        """`--config FILE` for the commands a client prints to run next (collect, resume) when the
        file's [nats] carries credentials, TLS or an inbox prefix that no URL can say: without it
        the printed command connects as nobody (the server refuses it) and reads no reply."""
        n = self.nats
        if n is None or self.source == "<defaults>":
            return ()
        if (n.user or n.password or n.token or n.nkey_seed or n.creds or n.tls or n.tls_ca or n.tls_cert
                or n.tls_key or n.inbox_prefix != "_INBOX"):
            return ("--config", self.source)
        return ()


def connection_args(url: str, prefix: str, config_args: tuple[str, ...] = ()) -> list[str]:
    """What a command printed to run next needs to reach the same fleet: `config_args`
    (ClientTarget.config_args), `--nats URL` unless the default (password masked), `--prefix P`
    unless the default."""
    from ratefleet.runtime.connect import redact_url

    return [*config_args, *([] if url == DEFAULT_NATS_URL else ["--nats", redact_url(url)]),
            *([] if prefix == "ratefleet" else ["--prefix", prefix])]


def client_target(config: Path | None, nats: str | None, prefix: str | None = None) -> ClientTarget:
    """Resolve a client command's target: --nats / $RATEFLEET_NATS_URL over [nats].url of the config
    (--config, else $RATEFLEET_CONFIG, else ./ratefleet.toml if present, else defaults); --prefix over
    [nats].prefix. Exits 2 with one line when the named config is missing or invalid."""
    found = config_path(config)
    if found is not None:
        require_file(found, "config file")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # a literal secret warns on the roles that use it, not on every client call
            cfg = load_config(found, nats_url=nats)
    except ConfigError as exc:
        cfg = _nats_only_or_fail(found, nats, exc)
    return ClientTarget(url=cfg.nats.url, prefix=prefix or cfg.nats.prefix, tiers=tuple(cfg.tiers),
                        source=str(found) if found else "<defaults>", nats=cfg.nats)


def fleet_config(config: Path | None, nats: str | None, role: str) -> tuple[Config, Path]:
    """The config of a fleet role (`up`, `dispatcher`, `worker`): a file must exist and define keys.

    Without one the fleet would run with zero keys and every job would fail; exit 2 instead,
    naming where it looked and what to do.
    """
    found = config_path(config)
    if found is None:
        fail(f"`ratefleet {role}` found no config file (looked at {LOOKED_AT} in {Path.cwd()}); {START_HINT}")
    require_file(found, "config file")
    cfg = load_config_or_fail(found, nats)
    if not cfg.keys():
        fail(f"{found} defines no API keys, so no job could be called; add [pools.NAME] with keys = [...] "
             "(see examples/local.toml)")
    return cfg, found


def load_config_or_fail(path: Path | None, nats: str | None) -> Config:
    """load_config, turning ConfigError into exit 2 with the file, the field and why on one line."""
    try:
        return load_config(path, nats_url=nats)
    except ConfigError as exc:
        fail(str(exc))


def configured_tiers(argv: list[str] | None = None) -> tuple[tuple[str, ...], str]:
    """(tier names, where from) for help texts: the config named on the command line or found as
    load_config would, else the default tiers. Never fails: help must always render."""
    argv = sys.argv[1:] if argv is None else argv
    explicit = None
    for i, arg in enumerate(argv):
        if arg in ("--config", "-c") and i + 1 < len(argv):
            explicit = argv[i + 1]
        elif arg.startswith("--config="):
            explicit = arg.split("=", 1)[1]
    defaults = tuple(name for name, _ in DEFAULT_TIERS)
    try:
        found = config_path(explicit)
        if found is None:
            return defaults, "default tiers"
        data = tomllib.loads(found.read_text())
        tiers = tuple(data.get("tiers") or {})
        return (tiers, str(found)) if tiers else (defaults, f"default tiers; {found} sets none")
    except (OSError, ValueError, AttributeError, TypeError):
        return defaults, "default tiers"


def tier_help(what: str = "priority tier") -> str:
    """`--tier` help listing the configured tiers, highest priority first."""
    tiers, source = configured_tiers()
    return f"{what}: one of {', '.join(tiers)} (highest first; {source})"


class RatefleetApp(typer.Typer):
    """typer.Typer whose errors are one line: usage errors (exit 2) name the help to read, and an
    unexpected exception ends as `error: unexpected ...` with exit 1, not a traceback, or, when
    NATS refused this user a subject before it, as that refusal and what to do (exit 1).

    Set RATEFLEET_DEBUG=1 to get the traceback. Errors ratefleet expects (bad input, no NATS,
    a refused job) never get here: the commands report them with `fail()`.
    """

    def __call__(self, *args, **kwargs):
        try:
            code = super().__call__(*args, **{**kwargs, "standalone_mode": False})
            sys.stdout.flush()  # a reader that went away shows here, not as a warning at exit
        except SystemExit as stop:
            # typer's _main turns an EPIPE from the command's output into exit 1, even outside
            # standalone mode, after wrapping stdout in click's PacifyFlushWrapper (typer/core.py)
            if stop.code == 1 and type(sys.stdout).__name__ == "PacifyFlushWrapper":
                sys.exit(quiet_broken_pipe())
            raise
        except Exception as exc:  # noqa: BLE001 - the last edge: report, do not dump a stack
            sys.exit(self._report(exc))
        sys.exit(code if isinstance(code, int) else EXIT_OK)

    def _report(self, exc: Exception) -> int:
        """Print one line for `exc`; return the exit code. Click's classes are matched by name:
        typer vendors its own copy of click in some versions and uses click itself in others.

        A closed pipe (`ratefleet results ... | head -1`) ends quietly with 141 (128 + SIGPIPE),
        as a standard Unix tool does; a task group's ExceptionGroup of one error is named by that error."""
        if is_broken_pipe(exc):
            return quiet_broken_pipe()
        exc = unwrap_group(exc)
        kinds = {cls.__name__ for cls in type(exc).__mro__}
        if "NoArgsIsHelpError" in kinds:
            if self.rich_markup_mode is None:  # rich help was printed already, as typer does
                exc.show()
            return exc.exit_code
        if "ClickException" in kinds:
            ctx = getattr(exc, "ctx", None)
            command = ctx.command_path if ctx is not None else "ratefleet"
            _print_error(f"{one_line(exc.format_message())} (see `{command} --help`)")
            return exc.exit_code
        if "Abort" in kinds:  # end of input at a prompt
            return EXIT_INTERRUPTED
        if os.environ.get("RATEFLEET_DEBUG"):
            raise exc
        if _denial_hint():  # NATS refused this user a subject: what failed next (a request timing out, as
            _print_error("the command could not go on without it")  # nats-py tells only its error callback)
            return EXIT_FAILED                                      # is no "unexpected" error
        what = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
        _print_error(f"unexpected {one_line(what)} (set RATEFLEET_DEBUG=1 for the traceback)")
        return EXIT_FAILED


def _denial_hint() -> str:
    """The subjects NATS refused this user, when it did: the real cause behind a timeout or
    "no dispatcher answered" (nats-py reports a permissions violation only to the error callback)."""
    from ratefleet.runtime.connect import permission_denials

    denied = permission_denials()
    if not denied:
        return ""
    if all(subject.lower().startswith("_inbox.") for subject in denied):  # replies, not the command's subjects
        return (f"NATS refused this user {', '.join(denied[:3])} (permissions violation): the user may read only "
                "its own reply inboxes, so no answer could arrive; set [nats] inbox_prefix in a --config file "
                "(examples/nats-accounts.conf: inbox_prefix = \"_INBOX.<user>\"; a URL cannot carry it)")
    return (f"NATS refused this user {', '.join(denied[:3])} (permissions violation): use a [nats] user the "
            "server allows it (examples/nats-accounts.conf: status, keys, dlq and config push|show|watch "
            "need the operator user)")


def unwrap_group(exc: BaseException) -> BaseException:
    """The one error inside (nested) ExceptionGroups of a single error; `exc` itself otherwise."""
    while isinstance(exc, BaseExceptionGroup) and len(exc.exceptions) == 1:
        exc = exc.exceptions[0]
    return exc


def is_broken_pipe(exc: BaseException) -> bool:
    """True for BrokenPipeError, or an ExceptionGroup holding nothing but BrokenPipeErrors (and cancellations)."""
    if isinstance(exc, BaseExceptionGroup):
        rest = exc.subgroup(lambda e: not isinstance(e, (BrokenPipeError, BaseExceptionGroup))
                            and type(e).__name__ != "CancelledError")
        return rest is None and exc.subgroup(lambda e: isinstance(e, BrokenPipeError)) is not None
    return isinstance(exc, BrokenPipeError)


def quiet_broken_pipe() -> int:
    """Point stdout at /dev/null (so the exit flush cannot fail again) and return EXIT_BROKEN_PIPE.

    Source: Python docs, "Note on SIGPIPE" (library/signal.html)."""
    with contextlib.suppress(OSError, ValueError):
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    return EXIT_BROKEN_PIPE


def _print_error(message: str) -> None:
    hint = _denial_hint()  # the cause first: what follows it ("no dispatcher answered") is its symptom
    if hint and message.startswith(NO_ANSWER):  # the refused request's timeout,
        message = "the command could not go on without it"  # not a NATS that is down (an operations trial read
        # "check that NATS runs"); a connection really lost keeps its own advice (a review)
    message = redact_text(f"{hint}; then: {message}" if hint else message)  # a NATS URL's password, a token: never on screen
    make_console(stderr=True).print(f"error: {message}", style="red", markup=False, highlight=False, soft_wrap=True)


def _print_warning(message: str) -> None:
    """`warning: <message>` as one line on stderr (credentials redacted), the command going on."""
    make_console(stderr=True).print(f"warning: {redact_text(message)}", style="yellow", markup=False,
                                    highlight=False, soft_wrap=True)
