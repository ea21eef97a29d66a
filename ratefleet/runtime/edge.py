"""The one edge where nats-py and httpx exceptions become ratefleet errors.

The Client's public methods (`@translated`) and the CLI's runner (`translate`) pass every
exception through here, so a user of either sees RatefleetError subclasses only (the
tree: schemas/errors.py) for the failures ratefleet knows about:

    nats-py: the connection is gone or never came        -> NatsUnavailable
             (NoServersError, ConnectionClosedError, ConnectionReconnectingError,
              ConnectionDrainingError, StaleConnectionError, OutboundBufferLimitError,
              UnexpectedEOF, nats' TimeoutError and FlushTimeoutError)
    nats-py: a stream or consumer that does not exist     -> NatsError (saying to start the fleet)
    nats-py: any other error (JetStream API errors, no responders...) -> NatsError
    httpx:   HTTPError, InvalidURL                        -> UpstreamUnavailable
    an exception group (a task group) whose first leaf is one of these -> that leaf, translated

Anything else (a bug, a cancellation, KeyboardInterrupt) passes unchanged. The translated
error names the original type; the original stays reachable as `__cause__` for debugging.
Inside the fleet the roles handle these errors where they occur (reconnecting, requeueing),
and the upstream calls of jobs become outcomes (workers/executor.py), never exceptions.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any, TypeVar

import httpx
import nats.errors
import nats.js.errors

from ratefleet.schemas.errors import NatsError, NatsUnavailable, RatefleetError, UpstreamUnavailable

_GONE = (nats.errors.NoServersError, nats.errors.ConnectionClosedError, nats.errors.ConnectionReconnectingError,
         nats.errors.ConnectionDrainingError, nats.errors.StaleConnectionError, nats.errors.OutboundBufferLimitError,
         nats.errors.UnexpectedEOF, nats.errors.TimeoutError, nats.errors.FlushTimeoutError)
F = TypeVar("F", bound=Callable[..., Any])


NO_ANSWER = "NATS did not answer in time"  # how a timeout's error begins (cli_support reads it)
_TIMEOUTS = (nats.errors.TimeoutError, nats.errors.FlushTimeoutError)


def translate(exc: BaseException, what: str = "talking to NATS") -> RatefleetError | None:
    """The ratefleet error for `exc` (`exc` itself when it is one); None when ratefleet does
    not know the failure. `what` completes "... while <what>" in the message."""
    if isinstance(exc, RatefleetError):
        return exc
    if isinstance(exc, BaseExceptionGroup):
        return translate(exc.exceptions[0], what) if exc.exceptions else None
    name = type(exc).__name__
    if isinstance(exc, _GONE):
        gone = NO_ANSWER if isinstance(exc, _TIMEOUTS) else "The connection to NATS was lost"
        return NatsUnavailable(f"{gone} while {what} ({name}); "
                               "check that NATS runs (`ratefleet up`) and that --nats (Client.connect's url) names it")
    if isinstance(exc, nats.js.errors.NotFoundError):
        return NatsError(f"NATS has no such stream or consumer ({name}) while {what}; the fleet creates its streams "
                         "when it starts (`ratefleet up` or `ratefleet dispatcher`)")
    if isinstance(exc, nats.errors.Error):
        detail = getattr(exc, "description", None)  # JetStream API errors; str() of the others is a repr
        return NatsError(f"NATS refused {what} ({name}{': ' + str(detail)[:200] if detail else ''})")
    if isinstance(exc, (httpx.HTTPError, httpx.InvalidURL)):
        return UpstreamUnavailable(f"HTTP call failed while {what} ({name}: {str(exc)[:200]})")
    return None


@contextlib.contextmanager
def translating(what: str) -> Iterator[None]:
    """Raise the ratefleet error for whatever `translate` knows of; the rest unchanged."""
    try:
        yield
    except Exception as exc:  # BaseExceptionGroup of Exceptions is an ExceptionGroup, an Exception
        ours = translate(exc, what)
        if ours is None or ours is exc:
            raise
        raise ours from exc


def translated(what: str) -> Callable[[F], F]:
    """Decorate a coroutine function or an async generator function of the public API so
    that it raises only ratefleet errors for NATS and HTTP failures (`translate`)."""

    def decorate(fn: F) -> F:
        if inspect.isasyncgenfunction(fn):
            @functools.wraps(fn)
            async def generator(*args: Any, **kwargs: Any) -> AsyncIterator[Any]:
                with translating(what):
                    async with contextlib.aclosing(fn(*args, **kwargs)) as inner:
                        async for item in inner:
                            yield item
            return generator  # type: ignore[return-value]  # same signature as fn (functools.wraps)

        @functools.wraps(fn)
        async def coroutine(*args: Any, **kwargs: Any) -> Any:
            with translating(what):
                return await fn(*args, **kwargs)
        return coroutine  # type: ignore[return-value]  # same signature as fn (functools.wraps)

    return decorate
