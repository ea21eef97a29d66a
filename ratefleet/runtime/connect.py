"""Connecting to NATS: one place that sets reconnect policy, credentials and TLS, and
translates errors. No URL, password, token or seed leaves here unredacted: the disconnect,
reconnect and error callbacks and every error message pass through `redact_url`/`_Scrubber`.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import ssl
import types
from urllib.parse import urlparse

import anyio
import nats.errors
from nats.aio.client import Client as NatsClient

from ratefleet.runtime.logs import get_logger, redact_text
from ratefleet.runtime.nats_auth import connect_options, secret_values
from ratefleet.schemas.config import nats_url_problem
from ratefleet.schemas.config_nats import NatsAuthConfig
from ratefleet.schemas.errors import ConfigError, NatsRefused, NatsUnavailable

log = get_logger("ratefleet.nats")


def redact_url(url: str) -> str:
    """`url` with its credentials masked, for messages and logs: `nats://user:***@host:4222`,
    `nats://***@host:4222` (a token). Every URL of a comma-separated list is masked, with or
    without a scheme (nats-py takes `user:password@host:4222` too)."""
    parts = []
    for part in url.split(","):
        if "@" in part and "://" not in part:  # scheme-less: everything before the last "@" is user info
            info, _, host = part.rpartition("@")
            lead = info[: len(info) - len(info.lstrip())]
            user, colon, _ = info.strip().partition(":")
            part = f"{lead}{user}:***@{host}" if colon else f"{lead}***@{host}"
        parts.append(redact_text(part))
    return ",".join(parts)


class _Scrubber:
    """Masks the URL's credentials and the configured secrets in a text from nats-py."""

    def __init__(self, url: str, secrets: list[str]):
        self.url, self.redacted = url, redact_url(url)
        self.secrets = sorted((s for s in secrets if s), key=len, reverse=True)

    def __call__(self, text: str) -> str:
        text = text.replace(self.url, self.redacted)
        for secret in self.secrets:
            text = text.replace(secret, "***")
        return redact_url(text)


def _url_secrets(url: str) -> list[str]:
    """The user-info parts of every URL in `url` (password, token), for the scrubber."""
    found = []
    for part in url.split(","):
        if "@" in part:
            info = part.split("://", 1)[-1].rpartition("@")[0]
            found += [p for p in (info.partition(":")[2] if ":" in info else info,) if p]
    return found


def check_url(url: str) -> list[str]:
    """The servers of `url` (`server_list`); ConfigError when it is no NATS URL (a scheme other
    than nats://, tls://, ws://, wss://, no host, a port outside 1-65535: `nats_url_problem`),
    at once: before, a port of 99999 raised a bare ValueError, `http://...` retried for 30 s."""
    problem = nats_url_problem(url)
    if problem:
        raise ConfigError(f"NATS URL {redact_url(url)!r}: {problem}")
    return server_list(url)


def server_list(url: str) -> list[str]:
    """The servers of `url`, a comma-separated list (`nats://a:4222,nats://b:4222`, the form
    of the nats CLI and the Go client), as nats-py wants them: one string per server (it
    rejects a comma-separated string). Empty parts are dropped; order is kept (nats-py
    shuffles the pool, then moves to the next server on a disconnect)."""
    return [part.strip() for part in url.split(",") if part.strip()]


async def _any_answers(urls: list[str], timeout: float) -> bool:
    """True when something accepts TCP connections at the host:port of one of the nats://
    `urls`, each tried in order for up to `timeout` seconds. Awaited, not blocking the loop
    (as `socket.create_connection` did): a Ctrl-C (a cancel) ends the wait at once."""
    for url in urls:
        parsed = urlparse(url if "://" in url else f"nats://{url}")
        with anyio.move_on_after(timeout):
            try:
                stream = await anyio.connect_tcp(parsed.hostname or "127.0.0.1", parsed.port or 4222)
            except OSError:
                continue
            await stream.aclose()
            return True
    return False


PING_INTERVAL_S = 10.0  # long-running roles: a PING this often; MAX_OUTSTANDING_PINGS unanswered = stale
MAX_OUTSTANDING_PINGS = 3  # (nats-py's defaults, 120 s x 2, left a half-dead connection unnoticed for ~5 min)
PATIENT_FLUSH_S = 600.0  # how long a timed-out `flush` still waits for its PONG in the background
GIVE_UP_ATTEMPTS = 60  # reconnects, 0.5 s apart, of a connection that gives up (`forever=False`): ~30 s down


async def close_away(nc: NatsClient) -> None:
    """Close a connection that is not connected (reconnecting, or lost while draining) without
    raising. What it buffered while away can never be sent once it is closed, yet nats-py's
    close writes that buffer to the dead socket and awaits it: ConnectionResetError, raised
    half way through the close (its subscriptions' tasks left running). So the buffer is
    dropped first; an OSError of the dead socket is logged, not raised."""
    if hasattr(nc, "_pending") and hasattr(nc, "_pending_data_size"):
        nc._pending = []
        nc._pending_data_size = 0
    try:
        await nc.close()
    except OSError as exc:
        log.debug("closing a connection that was away", error=type(exc).__name__)


async def flush(nc: NatsClient, timeout: float) -> None:
    """`nc.flush()` (a PING, then wait for the PONG: what was written reached the server),
    given up after `timeout` seconds with nats.errors.FlushTimeoutError, without breaking
    the connection. nats-py 2.16's own timeout cancels the PING's future but leaves it
    queued; the late PONG then raises InvalidStateError in the read loop, which ends it while
    the client still reports itself connected (nats-io/nats.py#914): nothing is read until the
    stale-connection check. Here the PING is waited for in a shielded task, so its future is
    resolved when the PONG comes, whatever the caller stopped waiting for."""
    waiting = asyncio.ensure_future(nc.flush(timeout=int(PATIENT_FLUSH_S)))
    waiting.add_done_callback(lambda done: done.cancelled() or done.exception())  # (retrieved: never logged)
    try:
        await asyncio.wait_for(asyncio.shield(waiting), timeout)
    except TimeoutError:
        raise nats.errors.FlushTimeoutError from None


async def connect(url: str, *, name: str, connect_timeout: float = 5.0, forever: bool = True,
                  auth: NatsAuthConfig | None = None, fail_fast: bool | None = None) -> NatsClient:
    """Connect to `url` (one server, or a comma-separated list of a cluster's servers: a
    disconnect moves on to another) with the credentials and TLS of `auth` (`[nats]`; None: the
    URL's only; user info in the URL wins over its user/password and token). `forever`: once
    connected, reconnect for as long as NATS is away (long-running roles, an application's
    Client); False: give up after GIVE_UP_ATTEMPTS reconnects, ~30 s down (CLI commands), the
    connection is closed then. `fail_fast` (default: `not forever`): the first connect raises
    when nothing answers or no NATS handshake comes, instead of waiting for a server to appear
    as the roles do. Raises NatsUnavailable (nothing answers; NatsRefused, a subclass, when the
    server refused our credentials or TLS failed) and
    ConfigError (a credential reference cannot be resolved), both without any credential in
    the message."""
    servers = check_url(url)
    options = connect_options(auth)
    scrub = _Scrubber(url, secret_values(options) + _url_secrets(url))
    if any("@" in part for part in url.split(",")):
        # the URL's user info is the more specific setting (`--nats` over the config file's [nats]):
        # nats-py sends its `user`/`password` or `token` options before a URL's (Client._connect_command)
        for name in ("user", "password", "token"):
            options.pop(name, None)
    fail_fast = not forever if fail_fast is None else fail_fast

    if fail_fast:
        if not await _any_answers(servers, connect_timeout):
            raise NatsUnavailable(f"nothing answers at {redact_url(url)}; start NATS with `ratefleet up`, "
                                  "or pass its URL (--nats URL; Client.connect(url) in Python)")
    holder: list[NatsClient] = []
    first_failures = 0  # failed tries of the first connect
    # set once the first connect returned: a later handshake error is a reconnect try's, whatever the
    # client's status says (nats-py reports CONNECTING during each reconnect's handshake, and raising
    # from this callback there ended its reconnect task for good: a nightly-batch trial's Client never
    # reconnected after `up` restarted a SIGKILLed nats-server, and `submit --wait` hung)
    connected_once = False
    # while disconnected, each reconnect try's error is logged once, its repeats counted (every 0.5 s they
    # were one warning each: 64 lines on a CLI user's screen in 30 s of an outage, a trial's finding)
    away: dict[tuple[str, str], int] | None = None

    async def on_disconnect() -> None:
        nonlocal away
        if holder and (holder[0].is_closed or holder[0].is_draining):
            return  # our own close
        away = {}
        log.warning("nats disconnected; reconnecting", url=redact_url(url))

    async def on_reconnect() -> None:
        from ratefleet.runtime.store import interrupt_ack_waits  # (store imports the layers above this one)

        nonlocal away
        repeated, away = sum((away or {}).values()), None
        interrupted = interrupt_ack_waits(holder[0])  # their acks went through the server that went away
        log.info("nats reconnected", url=redact_url(url), publishes_resent=interrupted, errors_repeated=repeated)

    async def on_error(exc: Exception) -> None:
        nonlocal first_failures
        if not connected_once:  # the first connect
            first_failures += 1
            if _refused(exc):
                raise _FirstConnectFailed(exc)  # wrong credentials or TLS fail now, not retried forever
            if fail_fast and first_failures >= len(servers):
                # each server tried once: something answered TCP (checked above) but no NATS handshake
                # came (a wrong port: an HTTP server, NATS' monitoring port): 60 more tries took 5.5 min
                raise _FirstConnectFailed(exc)
        # also where exceptions escaping a subscription callback end up
        if _expected_denial(str(exc)):
            log.debug("nats refused an optional read", detail=scrub(str(exc))[:300])
            _REFUSED_OPTIONAL.add((_denied_subject(str(exc)) or "").lower())
            return
        _note_denial(scrub(str(exc)))
        detail = scrub(str(exc))[:300]
        if away is not None:  # a reconnect try's: the same error again is counted, not logged
            key = (type(exc).__name__, detail)
            if key in away:
                away[key] += 1
                log.debug("nats error", error=key[0], detail=detail, repeated=away[key])
                return
            away[key] = 0
        log.warning("nats error", error=type(exc).__name__, detail=detail)

    holder.append(NatsClient())
    try:
        await holder[0].connect(
            servers, name=name, connect_timeout=connect_timeout, allow_reconnect=True,
            max_reconnect_attempts=-1 if forever else GIVE_UP_ATTEMPTS, reconnect_time_wait=0.5,
            disconnected_cb=on_disconnect, reconnected_cb=on_reconnect, error_cb=on_error,
            pending_size=64 * 1024 * 1024, **options,
            **({"ping_interval": PING_INTERVAL_S, "max_outstanding_pings": MAX_OUTSTANDING_PINGS} if forever else {}),
        )
    except Exception as exc:  # nats raises several unrelated types for "nobody there"
        cause = exc.cause if isinstance(exc, _FirstConnectFailed) else exc
        with contextlib.suppress(Exception):
            await holder[0].close()
        kind = NatsRefused if _refused(cause) else NatsUnavailable
        raise kind(f"cannot reach NATS at {redact_url(url)} ({type(cause).__name__}: "
                   f"{scrub(str(cause))}); {_hint(cause)}") from None
    connected_once = True
    tolerate_late_pongs(holder[0])
    return holder[0]


async def _process_pong_tolerant(self: NatsClient) -> None:
    """nats-py 2.16's `Client._process_pong`, which skips a PING's future that is done already
    (its flush timed out or was cancelled) instead of calling `set_result` on it."""
    if len(self._pongs) > 0:
        future = self._pongs.pop(0)
        if not future.done():
            future.set_result(True)
        self._pongs_received += 1
        self._pings_outstanding = 0


def tolerate_late_pongs(nc: NatsClient) -> bool:
    """Make a PONG that comes after its flush gave up harmless on `nc`, whichever flush it was.

    A flush waits for the PONG of its PING; when the wait ends first (nats-py's own timeout, or
    a cancellation: `Subscription.drain()` under a deadline, a task cancelled mid-flush), nats-py
    2.16 cancels the PING's future but leaves it queued, and the late PONG's `set_result` raises
    InvalidStateError in the read loop, which ends it while the client still reports itself
    connected: nothing is read until the stale-connection check (nats-io/nats.py#914). A break-it
    trial: a dispatcher stepping down after NATS stalled 8-10 s drained its pull subscriptions
    under a deadline, and read nothing for 25-30 s more (5 stalls of 5). `flush` above avoids it for
    its own callers; this covers every other path. Replaces a private method whose shape it
    checks first; with another nats-py it leaves the client as it is and returns False."""
    if not all(hasattr(nc, name) for name in ("_process_pong", "_pongs", "_pongs_received", "_pings_outstanding")):
        return False
    nc._process_pong = types.MethodType(_process_pong_tolerant, nc)  # type: ignore[method-assign]
    return True


_DENIED: list[str] = []  # subjects the server refused this process (permissions violation), for CLI hints
_EXPECTED: list[str] = []  # parts of subjects whose refusal a command expects and gets by without (lower case)
_REFUSED_OPTIONAL: set[str] = set()  # subjects of such expected refusals seen (lower case)


@contextlib.contextmanager
def denial_expected(part: str):
    """While inside, a permissions violation for a subject containing `part` (any case) is
    expected: the command reads something optional that a restricted user (e.g. the producer
    of examples/nats-accounts.conf) may not, and goes on without it. Such a refusal is logged
    at debug level only and not remembered for the CLI's error hints."""
    _EXPECTED.append(part.lower())
    try:
        yield
    finally:
        _EXPECTED.remove(part.lower())


_VIOLATION = re.compile(r'permissions violation for (?:publish|subscription) to "([^"]+)"', re.IGNORECASE)


def _denied_subject(text: str) -> str | None:
    """The subject of a `permissions violation for publish|subscription to "X"` error, else None."""
    match = _VIOLATION.search(text)
    return match.group(1) if match else None


def _expected_denial(text: str) -> bool:
    subject = _denied_subject(text)
    return subject is not None and any(part in subject.lower() for part in _EXPECTED)


def _note_denial(text: str) -> None:
    """Remember the subject of a permissions violation (`_denied_subject`)."""
    subject = _denied_subject(text)
    if subject is not None and subject not in _DENIED:
        _DENIED.append(subject)


def permission_denials() -> list[str]:
    """Subjects the NATS server refused this process so far (a permissions violation: the
    user's publish/subscribe allow lists, e.g. examples/nats-accounts.conf). nats-py reports
    these only to the error callback; the request itself then times out like a missing
    responder, so the CLI adds them to its error line."""
    return list(_DENIED)


def optional_read_refused(subject: str) -> bool:
    """True when the server refused this process `subject` inside `denial_expected` (the
    refusal was expected and not logged; a command can stop asking)."""
    return subject.lower() in _REFUSED_OPTIONAL


def refused(subject: str) -> bool:
    """True when the NATS server refused this process `subject` (a permissions violation;
    the server names it in lower case)."""
    return subject.lower() in (denied.lower() for denied in _DENIED)


class _FirstConnectFailed(Exception):
    """Raised from the error callback to end nats-py's first-connect loop (a refusal, or every
    server tried once without a NATS handshake)."""

    def __init__(self, cause: Exception):
        super().__init__(str(cause))
        self.cause = cause


def _refused(exc: Exception) -> bool:
    """True for the server refusing our credentials, or a TLS failure: retrying cannot help."""
    text = str(exc).lower()
    return (isinstance(exc, (nats.errors.AuthorizationError, ssl.SSLError))
            or "authorization violation" in text or "authentication" in text)


def _hint(exc: Exception) -> str:
    if _refused(exc) and not isinstance(exc, ssl.SSLError):
        return "the server refused the credentials: check [nats] user/password, token, nkey_seed, creds or the URL"
    if isinstance(exc, ssl.SSLError):
        return "TLS failed: check [nats] tls_ca, tls_cert, tls_key and the server's certificate"
    if isinstance(exc, (TimeoutError, nats.errors.Error)) and not isinstance(exc, nats.errors.NoServersError):
        return ("something accepts connections there but no NATS server answered: check the host and port "
                "(NATS clients connect to 4222 by default; 8222 is its monitoring port)")
    return "start one with `ratefleet up`, or pass its URL (--nats URL; Client.connect(url) in Python)"
