"""`ratefleet dlq replay` with neither --id nor --tier replays every dead letter, each called (and
paid for) again: at a terminal it asks first (a new user's finding: it replayed everything
without a word); --yes, or a script (no terminal), is not asked."""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import nats
import pytest
from faultkit import cli

from ratefleet.runtime.streams import ensure_topology
from ratefleet.schemas.config import parse_config

# a hang guard: four CLI runs side by side, each up to 40 s (30 s to the prompt's answer, 10 to
# exit); one interpreter start-up alone took 11-29 s on a loaded 2-core machine
pytestmark = [pytest.mark.anyio, pytest.mark.timeout(120)]


def at_a_terminal(args: list[str], answer: str) -> tuple[int, str]:
    """Run `ratefleet ARGS` with a pseudo-terminal for stdin/stdout/stderr; type `answer`."""
    main, child = os.openpty()
    proc = subprocess.Popen([sys.executable, "-m", "ratefleet", *args], stdin=child, stdout=child, stderr=child,
                            close_fds=True)
    os.close(child)
    seen, deadline = b"", time.monotonic() + 30
    answered = False
    while proc.poll() is None and time.monotonic() < deadline:
        try:
            chunk = os.read(main, 4096)
        except OSError:
            break
        seen += chunk
        if not answered and b"[y/N]" in seen:
            os.write(main, answer.encode() + b"\n")
            answered = True
    proc.wait(timeout=10)
    # what it wrote after the deadline (a start-up of 30 s on a loaded machine used it up; the
    # answer to "n" was then cut off: 'nothing replayed' not in '...? [y/N]:')
    with contextlib.suppress(OSError):
        while chunk := os.read(main, 4096):
            seen += chunk
    os.close(main)
    return proc.returncode, seen.decode(errors="replace")


async def test_replaying_every_letter_is_asked_at_a_terminal(nats_server):
    nc = await nats.connect(nats_server.url)
    try:
        await ensure_topology(nc.jetstream(), parse_config({}))
    finally:
        await nc.close()
    url = ["--nats", nats_server.url]
    # five independent runs (nothing is in the DLQ: each replays 0), side by side: one after the
    # other, their interpreters' start-ups (11-29 s each on a loaded 2-core machine) outlasted
    # the test's timeout
    with ThreadPoolExecutor(max_workers=5) as pool:
        asked_no = pool.submit(at_a_terminal, ["dlq", "replay", *url], "n")
        asked_yes = pool.submit(at_a_terminal, ["dlq", "replay", *url], "y")
        given_up = pool.submit(at_a_terminal, ["dlq", "replay", "--given-up", *url], "n")  # still every batch
        told_yes = pool.submit(at_a_terminal, ["dlq", "replay", "--yes", *url], "n")
        scripted = pool.submit(cli, "dlq", "replay", *url, timeout=60)  # no terminal: not asked
    code, out = asked_no.result()
    assert code == 1 and "replay every dead letter holding a job, of every batch (each is called again)?" in out, out
    assert "nothing replayed (pass --id JOB_ID, --batch B or --tier T for some, --yes for all)" in out, out
    code, out = asked_yes.result()
    assert code == 0 and "replayed 0 dead letter(s)" in out, out
    code, out = given_up.result()
    assert code == 1 and ("replay every dead letter holding a job with code attempts_exhausted or no_key_available "
                          "or poison_message or rate_limited, of every batch") in out, out
    code, out = told_yes.result()
    assert code == 0 and "[y/N]" not in out, out
    script = scripted.result()
    assert script.returncode == 0 and "replayed 0 dead letter(s)" in script.stdout, script.stderr
