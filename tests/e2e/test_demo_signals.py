"""`ratefleet demo` stopped by a signal takes its local fleet with it (a new user's finding:
after SIGTERM, nats-server, the dispatcher, both workers and the mock upstream kept running with
no parent, and the fleet's temporary directory stayed). Real processes: the demo's children."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.timeout(120)


def _children(pid: int) -> list[int]:
    """Live (not zombie) processes whose parent is `pid`."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid and fields[0] != "Z":
            found.append(int(entry.name))
    return found


def _alive(pids: list[int]) -> list[int]:
    left = []
    for pid in pids:
        try:
            state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if state != "Z":
            left.append(pid)
    return left


def _start_demo(tmp: Path) -> tuple[subprocess.Popen, list[int]]:
    """`ratefleet demo` with its temporary files under `tmp`, once its fleet runs; with the
    fleet's process ids (nats-server, the mock upstream, the dispatcher, two workers)."""
    demo = subprocess.Popen([sys.executable, "-m", "ratefleet", "demo", "--jobs", "3000", "--vip", "2"],
                            env={**os.environ, "TMPDIR": str(tmp)}, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)
    deadline = time.monotonic() + 60
    while len(fleet := _children(demo.pid)) < 5:
        assert demo.poll() is None, demo.communicate()[0][-3000:]
        assert time.monotonic() < deadline, "the demo's fleet did not start"
        time.sleep(0.2)
    return demo, fleet


def _until_gone(pids: list[int], seconds: float) -> list[int]:
    deadline = time.monotonic() + seconds
    while (left := _alive(pids)) and time.monotonic() < deadline:
        time.sleep(0.2)
    return left


def test_sigterm_ends_the_demo_like_ctrl_c_and_its_fleet_with_it(tmp_path):
    demo, fleet = _start_demo(tmp_path)
    time.sleep(1.0)  # (its jobs being sent or run)
    demo.send_signal(signal.SIGTERM)
    output = demo.communicate(timeout=30)[0]
    assert demo.returncode == 130, output[-3000:]
    assert _until_gone(fleet, 5) == []
    assert not list(tmp_path.glob("ratefleet-local-*")), "the fleet's temporary directory was left"


def test_a_killed_demo_takes_its_fleet_processes_with_it(tmp_path):
    demo, fleet = _start_demo(tmp_path)
    demo.kill()
    demo.communicate(timeout=10)
    assert _until_gone(fleet, 15) == []  # each child is sent SIGTERM when its parent dies


@pytest.mark.parametrize("args", [["--jobs", "-5"], ["--jobs", "0"], ["--workers", "0"], ["--vip", "-1"]])
def test_impossible_demo_sizes_are_refused_before_anything_starts(args, tmp_path):
    done = subprocess.run([sys.executable, "-m", "ratefleet", "demo", *args], capture_output=True, text=True,
                          timeout=30, env={**os.environ, "TMPDIR": str(tmp_path)})
    assert done.returncode == 2, done.stdout + done.stderr
    assert args[0] in done.stderr and not list(tmp_path.glob("ratefleet-local-*"))


def test_a_fleet_started_from_another_thread_outlives_that_thread():
    """die_with_parent follows the thread that forked (prctl(2)): a LocalFleet started from a
    thread pool lost its whole fleet when that thread ended (a reviewer's finding). Off the main
    thread the children are not armed."""
    import threading

    from ratefleet.localfleet import KeyLimit, LocalFleet

    fleet = LocalFleet([KeyLimit("k1", 10, 2)], workers=1, slots=2)
    starter = threading.Thread(target=fleet.__enter__)
    starter.start()
    starter.join(60)
    try:
        time.sleep(1.0)  # (an armed child gets its SIGTERM at once)
        assert fleet.procs and [p.poll() for p in fleet.procs] == [None] * len(fleet.procs)
        assert fleet._nats is not None and fleet._nats.process.poll() is None
    finally:
        fleet.__exit__(None, None, None)
