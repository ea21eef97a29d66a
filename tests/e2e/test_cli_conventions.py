"""The `ratefleet` command as a user meets it, run as a real process: one-line errors with exit 2,
a refusal to start without a config, --version, flags shown as flags, plain output under
NO_COLOR, --config on client commands, SIGHUP ignored by a running fleet, exit codes."""

from __future__ import annotations

import contextlib
import json
import os
import pty
import re
import select
import signal
import socket
import subprocess
import sys
import time
from importlib.metadata import version
from pathlib import Path

import pytest
import tomli_w
from fleetkit import SECRETS, FleetKit, chat_job, mock_keys

from ratefleet.mock import MockSettings, running_mock

pytestmark = [pytest.mark.timeout(180)]
ANSI = re.compile(r"\x1b\[")


def clean_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if k not in ("RATEFLEET_CONFIG", "RATEFLEET_NATS_URL", "NO_COLOR", "FORCE_COLOR", "TTY_COMPATIBLE")}
    return {**env, "RATEFLEET_LOG_FORMAT": "json", **extra}


def cli(*args: str, cwd: Path, env=None, timeout=60) -> subprocess.CompletedProcess:
    """Run `ratefleet ARGS` in its own session; on timeout the whole group goes (a fleet it started too)."""
    proc = subprocess.Popen([sys.executable, "-m", "ratefleet", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, cwd=cwd, env=env or clean_env(),
                            start_new_session=True)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        kill_group(proc.pid)
        out, err = proc.communicate()
        raise AssertionError(f"`ratefleet {' '.join(args)}` still running after {timeout}s: {err[-2000:]}") from None
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


def kill_group(pgid: int) -> None:
    try:
        os.killpg(pgid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def in_terminal(*args: str, cwd: Path, env: dict[str, str], timeout: float = 60) -> tuple[int, str]:
    """Run the command with stdout and stderr on a pseudo-terminal; (exit code, everything it printed)."""
    master, slave = pty.openpty()
    proc = subprocess.Popen([sys.executable, "-m", "ratefleet", *args], stdin=slave, stdout=slave, stderr=slave,
                            cwd=cwd, env={**env, "COLUMNS": "120", "TERM": "xterm-256color"}, close_fds=True)
    os.close(slave)
    chunks, deadline = [], time.monotonic() + timeout
    while time.monotonic() < deadline:
        ready, _, _ = select.select([master], [], [], 0.2)
        if ready:
            try:
                data = os.read(master, 65536)
            except OSError:  # EIO: the terminal's other side is closed
                break
            if not data:
                break
            chunks.append(data)
        elif proc.poll() is not None:
            break
    os.close(master)
    return proc.wait(timeout=10), b"".join(chunks).decode(errors="replace")


def assert_one_line_error(done: subprocess.CompletedProcess, *needles: str) -> None:
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert done.returncode == 2, (done.returncode, done.stderr)
    assert len(lines) == 1 and lines[0].startswith("error: "), done.stderr
    assert "Traceback" not in done.stderr + done.stdout
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])


def test_missing_input_files_end_in_one_line_and_exit_2(tmp_path):
    assert_one_line_error(cli("submit", "jobs.jsonl", "--tier", "normal", cwd=tmp_path), "jobs.jsonl", "does not exist")
    assert_one_line_error(cli("request", "@job.json", "--tier", "vip", cwd=tmp_path), "job.json", "does not exist")
    (tmp_path / "jobs.jsonl").write_text("{}\n")
    assert_one_line_error(cli("submit", "jobs.jsonl", "--tier", "normal", "--out", "no/such/r.jsonl", cwd=tmp_path),
                          "folder no/such does not exist")
    for command in (["status"], ["dlq", "list"], ["up"], ["worker"]):
        assert_one_line_error(cli(*command, "--config", "nope.toml", cwd=tmp_path), "nope.toml", "does not exist")
    env = clean_env(RATEFLEET_CONFIG=str(tmp_path / "gone.toml"))
    assert_one_line_error(cli("status", cwd=tmp_path, env=env), "gone.toml")
    (tmp_path / "bad.toml").write_text('[pools.a]\nkeys = [{ id = "k1", secret = "env:X", rps = 0 }]\n[nats]\nurll = 1\n')
    assert_one_line_error(cli("up", "--config", "bad.toml", cwd=tmp_path), "pools.a.keys.0.rps", "nats.urll")
    (tmp_path / "job.json").write_text("{not json")
    assert_one_line_error(cli("request", "@job.json", "--tier", "vip", cwd=tmp_path), "not valid JSON")


def test_up_without_a_config_says_where_it_looked_and_what_to_do(tmp_path):
    done = cli("up", cwd=tmp_path, timeout=20)
    assert_one_line_error(done, "no config file", "./ratefleet.toml", "$RATEFLEET_CONFIG", str(tmp_path),
                          "examples/local.toml", "mock-upstream")
    (tmp_path / "ratefleet.toml").write_text('[nats]\nurl = "nats://127.0.0.1:4222"\n')
    assert_one_line_error(cli("up", cwd=tmp_path, timeout=30), "ratefleet.toml defines no API keys")


def test_version_usage_errors_and_flags(tmp_path):
    done = cli("--version", cwd=tmp_path)
    assert done.returncode == 0 and done.stdout.strip() == f"ratefleet {version('ratefleet')}"
    assert_one_line_error(cli("submit", "x.jsonl", "--tier", "normal", "--bogus", cwd=tmp_path),
                          "No such option: --bogus", "see `ratefleet submit --help`")
    assert_one_line_error(cli("submit", "x.jsonl", cwd=tmp_path), "Missing option '--tier'")
    for terminal in (False, True):
        for command, flags in ((["submit"], ["--wait", "--skip-invalid"]), (["status"], ["--json"]),
                               (["dlq", "replay"], ["--purge"])):
            if terminal:
                _code, text = in_terminal(*command, "--help", cwd=tmp_path, env=clean_env())
                text = re.sub(r"\x1b\[[0-9;]*m", "", text)
            else:
                text = cli(*command, "--help", cwd=tmp_path).stdout
            for flag in flags:
                line = next(line for line in text.splitlines() if re.search(rf"(^|\s){flag}\b", line)
                            and "Usage" not in line)
                assert "<bool>" not in line and "BOOLEAN" not in line, (terminal, line)


def test_tier_help_lists_the_configured_tiers(tmp_path):
    assert "one of vip, premium, normal, guest" in cli("submit", "--help", cwd=tmp_path).stdout
    (tmp_path / "mine.toml").write_text(
        '[upstreams.u]\nbase_url = "http://127.0.0.1:1"\n[pools.p]\nkeys = [{ id = "k1", secret = "env:X", rps = 1 }]\n'
        '[tiers.urgent]\nweight = 5\n[tiers.bulk]\nweight = 1\n')
    for args, env in ((["--config", "mine.toml"], None), ([], clean_env(RATEFLEET_CONFIG="mine.toml"))):
        text = " ".join(cli("submit", "--help", *args, cwd=tmp_path, env=env).stdout.split())
        assert "one of urgent, bulk" in text, text


def test_no_color_gives_plain_output_in_a_terminal(tmp_path, nats_server):
    commands = (["--help"], ["submit", "missing.jsonl", "--tier", "normal"], ["bogus"],
                ["dlq", "list", "--nats", nats_server.url])
    for command in commands:
        code, coloured = in_terminal(*command, cwd=tmp_path, env=clean_env())
        assert ANSI.search(coloured), (command, coloured)  # a terminal does get styles ...
        code_plain, plain = in_terminal(*command, cwd=tmp_path, env=clean_env(NO_COLOR="1"))
        assert not ANSI.search(plain), (command, plain)  # ... and NO_COLOR removes every one
        assert code_plain == code
    assert "dead letters (0)" in plain


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.mark.anyio
async def test_client_commands_reach_the_server_named_only_in_the_config(tmp_path, nats_server):
    with running_mock(MockSettings(keys=mock_keys(rps=100, burst=10), accept_unknown=False)) as upstream:
        kit = FleetKit(tmp_path, nats_server.url, upstream.url)
        config = kit.write_config()
        kit.dispatcher("d1")
        env = clean_env()  # no $RATEFLEET_NATS_URL: the server is named in the file only
        try:
            deadline = time.monotonic() + 30
            while cli("status", "--json", "--config", str(config), cwd=tmp_path, env=env).returncode != 0:
                assert time.monotonic() < deadline, "status --config never reached the dispatcher"
                time.sleep(0.5)
            # no worker yet: a request waits; Ctrl-C ends it with 130
            waiting = subprocess.Popen([sys.executable, "-m", "ratefleet", "request", "--tier", "vip", "--config",
                                        str(config), json.dumps(chat_job(1))], cwd=tmp_path, env=env,
                                       stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            # Ctrl-C once the request is waiting: its job is stored (a fixed sleep could land
            # in the interpreter's start-up on a loaded machine)
            _wait_status(config, tmp_path, lambda s: _held(s, "vip") >= 1, timeout=30)
            waiting.send_signal(signal.SIGINT)
            _out, err = waiting.communicate(timeout=30)
            assert waiting.returncode == 130 and "Traceback" not in err, err
            kit.worker("w1")
            jobs = tmp_path / "jobs.jsonl"
            jobs.write_text("".join(json.dumps(chat_job(i)) + "\n" for i in range(5)))
            (tmp_path / "ratefleet.toml").write_text(config.read_text())  # ./ratefleet.toml, no flag at all
            done = cli("submit", str(jobs), "--tier", "normal", "--wait", "--out", "r.jsonl", cwd=tmp_path, env=env)
            assert done.returncode == 0, done.stderr
            assert [json.loads(line)["status"] for line in (tmp_path / "r.jsonl").read_text().splitlines()] == \
                ["succeeded"] * 5
            one = cli("request", "--tier", "vip", json.dumps(chat_job(9)), cwd=tmp_path,
                      env=clean_env(RATEFLEET_CONFIG=str(config)))
            assert one.returncode == 0 and json.loads(one.stdout)["status"] == "succeeded", one.stderr
            job = {"id": "fail-1", "max_attempts": 1, "request": {"path": "/v1/chat/completions",
                                                                  "json": {"mock": {"status": 503}}}}
            failing = cli("request", "--tier", "vip", "--config", str(config), json.dumps(job), cwd=tmp_path, env=env)
            assert failing.returncode == 1 and json.loads(failing.stdout)["status"] == "failed", failing.stderr
            deadline = time.monotonic() + 20
            while "fail-1" not in cli("dlq", "list", "--json", "--config", str(config), cwd=tmp_path, env=env).stdout:
                assert time.monotonic() < deadline, "no dead letter for fail-1"
                time.sleep(0.5)
            replay = cli("dlq", "replay", "--id", "fail-1", "--config", str(config), cwd=tmp_path, env=env)
            assert replay.returncode == 0, replay.stderr
            assert re.fullmatch(r"fail-1 -> fail-1-r[0-9a-f]{8}\nreplayed 1 dead letter\(s\)\n", replay.stdout), replay.stdout
            # --nats still wins over the file: nothing answers there
            elsewhere = cli("status", "--config", str(config), "--nats", f"nats://127.0.0.1:{free_port()}",
                            cwd=tmp_path, env=env)
            assert elsewhere.returncode == 1 and len(elsewhere.stderr.strip().splitlines()) == 1
            assert "nothing answers" in elsewhere.stderr
        finally:
            kit.stop()


def _fleet_config(tmp_path: Path, port: int, upstream_url: str) -> Path:
    config = {"nats": {"url": f"nats://127.0.0.1:{port}", "embedded_dir": str(tmp_path / "nats")},
              "upstreams": {"mock": {"base_url": upstream_url}},
              "pools": {"shared": {"keys": [{"id": "k1", "secret": "env:RF_TEST_K1", "rps": 100, "burst": 10}]}},
              "workers": {"heartbeat_s": 0.5, "grace_s": 5}}
    path = tmp_path / "fleet.toml"
    path.write_text(tomli_w.dumps(config))
    return path


def _status(config: Path, cwd: Path) -> dict | None:
    done = cli("status", "--json", "--config", str(config), cwd=cwd, timeout=20)
    return json.loads(done.stdout) if done.returncode == 0 else None


def _held(status: dict, tier: str) -> int:
    """Jobs of `tier` stored and not yet running: still in the stream, or in the leader's window."""
    entry = (status.get("tiers") or {}).get(tier) or {}
    return sum(v for v in (entry.get("queued"), entry.get("pending")) if isinstance(v, int))


def _wait_status(config: Path, cwd: Path, ready, timeout: float = 40) -> dict:
    deadline, last = time.monotonic() + timeout, None
    while time.monotonic() < deadline:
        last = _status(config, cwd)
        if last and ready(last):
            return last
        time.sleep(0.5)
    raise AssertionError(f"fleet not ready: {last}")


def _start_up(tmp_path: Path, config: Path, *, workers: int, env: dict[str, str]) -> subprocess.Popen:
    """`ratefleet up` with `config` in its own session, system-picked probe ports, its output in
    tmp_path/up.log."""
    with open(tmp_path / "up.log", "wb") as log:
        return subprocess.Popen([sys.executable, "-m", "ratefleet", "up", "--config", str(config), "--workers",
                                 str(workers), "--http-base-port", "0"], env=env, cwd=tmp_path, stdout=log,
                                stderr=subprocess.STDOUT, start_new_session=True)


@contextlib.contextmanager
def _up_with_one_worker(tmp_path: Path):
    """`ratefleet up --workers 1` against a mock upstream, once it has a leader and its worker:
    (the `up` process, its config, that status, its NATS port). Its process group is killed on
    the way out."""
    port = free_port()
    with running_mock(MockSettings(keys=mock_keys(rps=100, burst=10, ids=("k1",)), accept_unknown=False)) as upstream:
        config = _fleet_config(tmp_path, port, upstream.url)
        up = _start_up(tmp_path, config, workers=1, env=clean_env(RF_TEST_K1=SECRETS["k1"]))
        try:
            yield up, config, _wait_status(config, tmp_path, lambda s: s.get("leader") and len(s["workers"]) == 1), port
        finally:
            kill_group(up.pid)  # whatever it left (children of a supervisor that died)


def test_sighup_leaves_up_and_its_worker_running(tmp_path):
    with _up_with_one_worker(tmp_path) as (up, config, before, _):
        try:
            worker_pid = before["workers"][0]["pid"]
            os.kill(up.pid, signal.SIGHUP)                    # to the supervisor
            os.kill(worker_pid, signal.SIGHUP)                # to the worker itself
            time.sleep(1.5)
            os.killpg(up.pid, signal.SIGHUP)                  # to the whole group, as a closed terminal does
            time.sleep(3)
            assert up.poll() is None, (tmp_path / "up.log").read_text()[-3000:]
            after = _wait_status(config, tmp_path, lambda s: s.get("leader") and len(s["workers"]) == 1)
            assert [w["pid"] for w in after["workers"]] == [worker_pid]  # not restarted: the same process
            one = cli("request", "--tier", "vip", "--config", str(config), json.dumps(chat_job(1)), cwd=tmp_path)
            assert one.returncode == 0, one.stderr
        finally:
            up.send_signal(signal.SIGINT)
            up.wait(timeout=60)
    output = (tmp_path / "up.log").read_text()
    assert up.returncode == 0, output[-3000:]
    assert output.count("SIGHUP ignored") >= 4, output[-3000:]  # up twice, the worker twice (+ the dispatcher)
    assert "child exited" not in output


def test_credentials_in_the_nats_url_never_reach_the_terminal(tmp_path):
    (tmp_path / "creds.toml").write_text(f'[nats]\nurl = "nats://alice:s3cret-pw@127.0.0.1:{free_port()}"\n')
    done = cli("status", "--config", "creds.toml", cwd=tmp_path)
    assert done.returncode == 1 and "nothing answers at nats://alice:***@127.0.0.1:" in done.stderr, done.stderr
    assert "s3cret-pw" not in done.stderr + done.stdout


def test_mock_upstream_says_once_where_it_listens_with_the_port_it_got(tmp_path):
    """It printed two lines, the first before binding (`--port 0` showed port 0)."""
    import httpx

    mock = subprocess.Popen([sys.executable, "-m", "ratefleet", "mock-upstream", "--port", "0", "--key",
                             "k1=sk-x:rps=5"], cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        first = mock.stdout.readline()
        found = re.match(r"mock upstream listening on (http://127\.0\.0\.1:(\d+)) \(1 keys\)", first)
        assert found and int(found[2]) > 0, first
        assert httpx.get(found[1] + "/_mock/stats", timeout=10).status_code == 200
    finally:
        mock.terminate()
        out, err = mock.communicate(timeout=15)
    assert "listening" not in out + err, (out, err)  # no second announcement


@pytest.mark.parametrize("timeout", ["0", "-1", "nan", "inf"])
def test_request_refuses_a_timeout_it_could_not_wait_before_storing_the_job(tmp_path, timeout):
    # it stored the job (which then ran and was paid) and gave up at once: "no result ... within -1.0s"
    done = cli("request", '{"request": {"path": "/v1/x"}}', "--tier", "vip", "--timeout", timeout,
               "--nats", "nats://127.0.0.1:1", cwd=tmp_path)
    assert done.returncode == 2 and "--timeout must be a number of seconds above 0" in done.stderr, done.stderr
    assert "nothing answers" not in done.stderr  # refused before connecting


@pytest.mark.anyio
async def test_client_request_refuses_a_timeout_before_sending(nats_server):
    from ratefleet import Client

    async with await Client.connect(nats_server.url) as client:
        with pytest.raises(ValueError, match="timeout must be a number of seconds above 0"):
            await client.request({"request": {"path": "/v1/x"}}, "vip", timeout=0)  # (no stream even exists)


def test_request_reads_the_job_from_standard_input(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "ratefleet", "request", "-", "--tier", "vip", "--nats",
                           "nats://127.0.0.1:1"], input='{"request": {"path": "/v1/x"}}', capture_output=True,
                          text=True, cwd=tmp_path, env=clean_env(), timeout=60)
    # the job was read and is valid: the command got as far as connecting
    assert proc.returncode == 1 and "nothing answers at nats://127.0.0.1:1" in proc.stderr, proc.stderr


def _stat(pid: int) -> list[str]:
    """The fields of /proc/PID/stat after the command name (state, ppid, ...); [] when it is gone."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return []


def _alive(pid: int) -> bool:
    state = _stat(pid)[:1]
    return state not in ([], ["Z"])  # a zombie has ended; only its parent's wait is missing


def _nats_server_pids(port: int) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                argv = (entry / "cmdline").read_bytes().split(b"\0")
            except OSError:
                continue
            if argv and argv[0].endswith(b"nats-server") and str(port).encode() in argv:
                found.append(int(entry.name))
    return found


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG is Linux's")
def test_a_killed_up_takes_its_fleet_and_embedded_nats_with_it(tmp_path):
    # SIGKILL of `up` left nats-server, the dispatcher and the workers running with PPID 1; a
    # second `up` then joined the orphaned NATS and the orphaned dispatcher stayed leader
    with _up_with_one_worker(tmp_path) as (up, _, status, port):
        fleet = [status["workers"][0]["pid"], *_nats_server_pids(port)]
        fleet += [int(p.name) for p in Path("/proc").iterdir() if p.name.isdigit() and _child_of(int(p.name), up.pid)]
        assert len(set(fleet)) >= 4, fleet  # nats-server, dispatcher, worker, config-watch
        os.kill(up.pid, signal.SIGKILL)
        up.wait(timeout=10)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and any(_alive(pid) for pid in fleet):
            time.sleep(0.2)
        assert [pid for pid in set(fleet) if _alive(pid)] == [], (tmp_path / "up.log").read_text()[-3000:]


def _child_of(pid: int, parent: int) -> bool:
    return _stat(pid)[1:2] == [str(parent)]


def test_submit_refuses_the_no_batch_token_as_a_batch_name(tmp_path):
    jobs = tmp_path / "jobs.jsonl"
    jobs.write_text('{"request": {"path": "/v1/x"}}\n')
    done = cli("submit", str(jobs), "--tier", "normal", "--batch", "_", "--nats", "nats://127.0.0.1:1", cwd=tmp_path)
    assert done.returncode == 2 and "--batch _ is reserved" in done.stderr, done.stderr


@pytest.mark.anyio
async def test_dlq_replay_of_a_letter_that_is_not_there_says_so(tmp_path, nats_server):
    # it printed "replayed 0 dead letter(s)" and exited 0, as if the job had been sent again
    from ratefleet import Client
    from ratefleet.runtime.streams import ensure_topology
    from ratefleet.schemas.config import parse_config

    async with await Client.connect(nats_server.url) as client:
        await ensure_topology(client.js, parse_config({}))
    done = cli("dlq", "replay", "--id", "nosuch", "--nats", nats_server.url, cwd=tmp_path)
    assert done.returncode == 1, done.stderr
    assert "no replayable dead letter with job id 'nosuch'; `ratefleet dlq list` shows" in done.stderr
    everything = cli("dlq", "replay", "--nats", nats_server.url, cwd=tmp_path)  # nothing asked for: nothing to say
    assert everything.returncode == 0 and "replayed 0 dead letter(s)" in everything.stdout


def test_up_says_when_it_joins_a_nats_server_that_runs_already(tmp_path, nats_server):
    # it joined whatever fleet answered on the URL without a word, and pushed its file as that
    # fleet's live config (a new user's fleet on 4222 got another user's keys and limits)
    config = _fleet_config(tmp_path, int(nats_server.url.rsplit(":", 1)[1]), "http://127.0.0.1:9")
    up = _start_up(tmp_path, config, workers=0, env=clean_env())
    try:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and "joining it" not in (tmp_path / "up.log").read_text():
            time.sleep(0.2)
        output = (tmp_path / "up.log").read_text()
        assert f"a NATS server already answers at {nats_server.url}: joining it" in output, output[-2000:]
        assert f"this fleet's config file {config} becomes the live config" in output
        # an operations trial: a second `up` joined the first's embedded server and lost NATS with it, unsaid
        assert "this fleet runs while that server does, and waits for it when it stops" in output
        # and how to get a server of its own (the port may be another user's NATS)
        assert ("for a fleet of its own, stop this (Ctrl-C) and pass --nats nats://127.0.0.1:PORT with a free PORT: "
                "an embedded server starts there") in output
        assert "started embedded nats-server" not in output
    finally:
        up.send_signal(signal.SIGINT)
        try:
            up.wait(timeout=60)
        finally:
            kill_group(up.pid)


def test_client_commands_go_on_with_the_nats_section_when_another_section_is_broken(tmp_path):
    # a half-done edit of a key (rps = -1) locked the operator out of `status` and `results`,
    # which need only [nats] (a new user's trial)
    bad_key = tmp_path / "bad_key.toml"
    bad_key.write_text('[nats]\nurl = "nats://127.0.0.1:1"\n[upstreams.u]\nbase_url = "http://127.0.0.1:9"\n'
                       '[pools.p]\nkeys = [{id = "k1", rps = -1, secret = "env:X"}]\n')
    for command in (["status"], ["results", "--batch", "b1"]):
        done = cli(*command, "--config", str(bad_key), cwd=tmp_path)
        assert done.returncode == 1, done.stderr  # it went on, to the NATS named in [nats]
        assert "warning: invalid configuration" in done.stderr and "pools.p.keys.0.rps" in done.stderr
        assert "nothing answers at nats://127.0.0.1:1" in done.stderr
    bad_nats = tmp_path / "bad_nats.toml"
    bad_nats.write_text('[nats]\nurl = "foo://"\n')
    done = cli("status", "--config", str(bad_nats), cwd=tmp_path)
    assert done.returncode == 2 and "nats.url" in done.stderr and "warning" not in done.stderr


def test_gateway_on_a_port_in_use_says_so_in_one_line(tmp_path):
    # uvicorn's startup failure came out as ~80 lines of ExceptionGroup traceback, exit 3
    config = tmp_path / "gw.toml"
    config.write_text('[nats]\nurl = "nats://127.0.0.1:1"\n[upstreams.u]\nbase_url = "http://127.0.0.1:9"\n'
                      '[pools.p]\nkeys = [{id = "k1", rps = 1, secret = "env:UNUSED_K1"}]\n'
                      '[callers.app]\nkey = "env:RF_TEST_GW_KEY"\ntier = "normal"\n')
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        done = cli("gateway", "--config", str(config), "--listen", f"127.0.0.1:{port}", cwd=tmp_path,
                   env=clean_env(RF_TEST_GW_KEY="rk-test-0123456789abcdef"))
    assert done.returncode == 2, done.stderr
    assert done.stderr.strip() == (f"error: --listen 127.0.0.1:{port}: cannot listen there (Address already in use); "
                                   "pass another --listen HOST:PORT (or set [gateway] listen)")


@pytest.mark.parametrize("source", ["file", "env"])
def test_gateway_on_a_port_in_use_names_where_the_address_came_from(tmp_path, source):
    # without --listen the address is [gateway] listen or RATEFLEET_GATEWAY_LISTEN; the error said "--listen ..."
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        config = tmp_path / "gw.toml"
        config.write_text('[nats]\nurl = "nats://127.0.0.1:1"\n[upstreams.u]\nbase_url = "http://127.0.0.1:9"\n'
                          '[pools.p]\nkeys = [{id = "k1", rps = 1, secret = "env:UNUSED_K1"}]\n'
                          '[callers.app]\nkey = "env:RF_TEST_GW_KEY"\ntier = "normal"\n'
                          + (f'[gateway]\nlisten = "127.0.0.1:{port}"\n' if source == "file" else ""))
        extra = {"RATEFLEET_GATEWAY_LISTEN": f"127.0.0.1:{port}"} if source == "env" else {}
        done = cli("gateway", "--config", str(config), cwd=tmp_path,
                   env=clean_env(RF_TEST_GW_KEY="rk-test-0123456789abcdef", **extra))
    named = "[gateway] listen" if source == "file" else "RATEFLEET_GATEWAY_LISTEN="
    assert done.returncode == 2, done.stderr
    assert done.stderr.strip() == (f"error: {named}{' ' if source == 'file' else ''}127.0.0.1:{port}: cannot listen "
                                   "there (Address already in use); pass another --listen HOST:PORT (or set "
                                   "[gateway] listen)")


def test_mock_upstream_on_a_port_in_use_says_how_to_pick_another(tmp_path):
    # it printed "unexpected OSError: [Errno 98] Address already in use (set RATEFLEET_DEBUG=1 ...)", exit 1
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        done = cli("mock-upstream", "--port", str(port), cwd=tmp_path)
    assert done.returncode == 2, done.stderr
    assert done.stderr.strip() == (f"error: --host 127.0.0.1 --port {port}: cannot listen there (Address already in "
                                   "use); pass another --port (0: any free port) and point the fleet's "
                                   "[upstreams.<name>] base_url at it")


@pytest.mark.parametrize("role", ["dispatcher", "worker"])
def test_a_role_whose_http_port_is_taken_says_how_to_pick_another(tmp_path, role):
    # it said only "cannot listen there (Address already in use)", with nothing to do next
    config = tmp_path / "fleet.toml"
    config.write_text('[nats]\nurl = "nats://127.0.0.1:1"\n[upstreams.u]\nbase_url = "http://127.0.0.1:9"\n'
                      '[pools.p]\nkeys = [{id = "k1", rps = 1, secret = "env:UNUSED_K1"}]\n')
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        done = cli(role, "--config", str(config), "--http", f"127.0.0.1:{port}", cwd=tmp_path)
    assert done.returncode == 2, done.stderr  # an input error, as the gateway's --listen (it was 1)
    assert done.stderr.strip() == (f"error: --http 127.0.0.1:{port}: cannot listen there (Address already in use); "
                                   "pass another --http HOST:PORT (port 0: any free port)")


@pytest.mark.anyio
async def test_dlq_list_says_when_it_shows_only_some_of_the_dead_letters(tmp_path, nats_server):
    # with 58 dead letters stored it printed "dead letters (50)" and nothing else (the default
    # --limit 50): a user took 50 for the count and missed the rest
    from ratefleet import Client
    from ratefleet.runtime.streams import ensure_topology
    from ratefleet.schemas.config import parse_config

    async with await Client.connect(nats_server.url) as client:
        await ensure_topology(client.js, parse_config({}))
        for i in range(5):
            letter = {"job_id": f"dead-{i}", "tier": "normal", "attempts": 5, "job": chat_job(i, id=f"dead-{i}"),
                      "reason": {"code": "attempts_exhausted", "message": "gave up after 5 attempts; last: HTTP 503"}}
            await client.js.publish(client.subjects.dead("normal"), json.dumps(letter).encode())
    some = cli("dlq", "list", "--limit", "3", "--nats", nats_server.url, cwd=tmp_path)
    assert some.returncode == 0, some.stderr
    assert "dead letters (3 of 5)" in some.stdout and "dead-2" in some.stdout and "dead-3" not in some.stdout, some.stdout
    assert "2 more dead letter(s) not shown: pass --limit 5 to see them all" in some.stderr, some.stderr
    as_json = cli("dlq", "list", "--limit", "3", "--json", "--nats", nats_server.url, cwd=tmp_path)
    assert len(as_json.stdout.splitlines()) == 3 and "2 more dead letter(s)" in as_json.stderr
    every = cli("dlq", "list", "--nats", nats_server.url, cwd=tmp_path)
    assert "dead letters (5)" in every.stdout and "not shown" not in every.stderr, every.stderr
    # --limit 0, to see how many there are: the first letter read was left out of the count
    # ("dead letters (0 of 4)", "4 more dead letter(s) not shown: pass --limit 4")
    none = cli("dlq", "list", "--limit", "0", "--nats", nats_server.url, cwd=tmp_path)
    assert "dead letters (0 of 5)" in none.stdout, none.stdout
    assert "5 more dead letter(s) not shown: pass --limit 5 to see them all" in none.stderr, none.stderr
