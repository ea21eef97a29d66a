"""`run_async(term_as_interrupt=True)` arms SIGTERM as Ctrl-C also when SIGTERM already raises
KeyboardInterrupt (`ratefleet demo` sets Python's default_int_handler for its synchronous start):
raised inside the event loop, KeyboardInterrupt landed wherever the loop was."""

from __future__ import annotations

import signal

from ratefleet.cli_support import _as_ctrl_c, run_async


async def _handler_now() -> object:
    return signal.getsignal(signal.SIGTERM)


def test_a_sigterm_that_raises_keyboardinterrupt_takes_ctrl_cs_path_inside_the_loop():
    previous = signal.signal(signal.SIGTERM, signal.default_int_handler)
    try:
        assert run_async(_handler_now, term_as_interrupt=True) is _as_ctrl_c
        assert signal.getsignal(signal.SIGTERM) is signal.default_int_handler  # given back as it was
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        assert run_async(_handler_now, term_as_interrupt=True) is _as_ctrl_c
        assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL
        assert run_async(_handler_now) == signal.SIG_DFL  # not asked for: left alone
    finally:
        signal.signal(signal.SIGTERM, previous)
