"""`ratefleet status --watch` as a real process on a pseudo-terminal against a running
fleet: it redraws while a batch runs, the numbers move, and Ctrl-C (SIGINT) exits 0."""

from __future__ import annotations

import asyncio
import os
import pty
import re
import select
import signal
import subprocess
import sys
import threading
import time

import pytest
from fleetkit import FleetKit, chat_job, collect, mock_keys, wait_for_leader

from ratefleet import Client
from ratefleet.mock import MockSettings, running_mock

pytestmark = [pytest.mark.timeout(150), pytest.mark.anyio]
STYLE = re.compile(r"\x1b\[[0-9;?]*m|\x1b[()][A-Za-z0-9]|\x1b\[\?[0-9;]*[hl]")
CURSOR = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]|\r")  # a cursor move or erase starts a new line of text


class Terminal:
    """A child process on a pseudo-terminal whose output a thread reads all the time (a
    terminal's buffer is a few KiB: a child not read from blocks on its next frame)."""

    def __init__(self, args: list[str], env: dict[str, str]) -> None:
        self.master, slave = pty.openpty()
        self.proc = subprocess.Popen(args, stdin=slave, stdout=slave, stderr=slave, env=env, start_new_session=True)
        os.close(slave)
        self.output = b""
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        while True:
            ready, _, _ = select.select([self.master], [], [], 0.2)
            if ready:
                try:
                    chunk = os.read(self.master, 65536)
                except OSError:  # the child closed the terminal
                    return
                if not chunk:
                    return
                self.output += chunk
            elif self.proc.poll() is not None:
                return

    def text(self) -> str:
        return CURSOR.sub("\n", STYLE.sub("", self.output.decode(errors="replace")))

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        self._reader.join(5)
        os.close(self.master)


def tier_rows(text: str, tier: str) -> list[tuple[str, ...]]:
    """(queued, in flight, done/s) of `tier` in each frame drawn so far."""
    rows = []
    for line in text.splitlines():
        cells = [c.strip() for c in re.split(r"[│┃|]", line) if c.strip()]
        if len(cells) >= 4 and cells[0] == tier:
            rows.append(tuple(cells[1:4]))
    return rows


@pytest.fixture
def fleet(tmp_path, nats_server):
    with running_mock(MockSettings(keys=mock_keys(rps=100, burst=10, ids=("k1",)), latency_ms=150)) as mock:
        kit = FleetKit(tmp_path, nats_server.url, mock.url, keys=[{"id": "k1", "rps": 8, "burst": 2}])
        kit.dispatcher("d1")
        kit.worker("w1")
        yield kit
        kit.stop()


async def test_watch_redraws_while_jobs_run_and_ctrl_c_exits_0(fleet, nats_server):
    env = {**fleet.env(), "COLUMNS": "160", "LINES": "60", "TERM": "xterm-256color"}
    env.pop("NO_COLOR", None)
    async with await Client.connect(nats_server.url) as client:
        await wait_for_leader(client)
        term = Terminal([sys.executable, "-m", "ratefleet", "status", "--watch", "--interval", "0.5",
                         "--config", str(fleet.config_path)], env)
        try:
            deadline = time.monotonic() + 30
            while "leader d1" not in term.text():  # the first frame (the command starts in ~1-3 s)
                assert time.monotonic() < deadline and term.proc.poll() is None, term.text()[-2000:]
                await asyncio.sleep(0.1)
            await client.submit_many([chat_job(i) for i in range(80)], "normal", batch="watched")
            results = await collect(client, "watched", 80, timeout=90)  # 8 req/s: ~10 s of frames
            assert len(results) == 80
            await asyncio.sleep(1.5)
            term.proc.send_signal(signal.SIGINT)
            code = await asyncio.to_thread(term.proc.wait, 15)
        finally:
            term.close()
    text = term.text()
    rows = tier_rows(text, "normal")
    assert code == 0, text[-2000:]
    assert "Traceback" not in text and "leader d1" in text and "config revision" in text
    assert "k1" in text and "w1" in text
    busy = [row for row in rows if row[0] != "0" or row[1] != "0"]  # frames drawn while the batch ran
    assert len(busy) >= 5, text[-3000:]  # refreshed every 0.5 s (plus the answer time), not drawn once
    assert text.count("leader d1") >= len(rows)  # each frame whole
    # the numbers moved while the jobs ran, and jobs were done per second
    assert len(set(busy)) >= 3, busy
    assert any(done != "-" and float(done) > 0 for _, _, done in busy), busy
    assert rows[-1][:2] == ("0", "0"), rows[-1]  # the last frame: nothing queued or in flight
    # redrawn in place on a terminal: the cursor goes back up over the last frame
    assert re.search(r"\x1b\[\d*A", term.output.decode(errors="replace"))
