"""Helpers for the fault-injection end-to-end tests (tests/e2e/test_faults_*.py).

- `Tracker`: its own NATS connection (reconnects forever, so it survives a NATS restart)
  that watches every Result publish (arrival time per job) and reads the RESULTS stream's
  per-subject counts, which is how the tests check "each job id exactly once".
- `restartable_nats`: an EmbeddedNats whose port is pinned after the first start, so
  `stop()`/`start()` comes back on the same port with the same store dir.
- small bounded waits (`until`, `wait_workers`, `wait_leader_is`) and mock helpers.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlparse

import nats
from fleetkit import FleetKit, mock_keys

from ratefleet import Client
from ratefleet.mock import MockSettings, running_mock
from ratefleet.runtime.embedded import EmbeddedNats
from ratefleet.schemas import Result, Subjects

SUBJECTS = Subjects()


# -- nats ---------------------------------------------------------------------------------


def pinned(server: EmbeddedNats) -> EmbeddedNats:
    """Pin an already started EmbeddedNats to the port it got, so a restart reuses it."""
    server.port = urlparse(server.url).port
    return server


def restartable_nats(store_dir: Path) -> EmbeddedNats:
    """A started EmbeddedNats on a free port, pinned to it for stop()/start()."""
    return pinned(EmbeddedNats(store_dir).start())


# -- waiting ------------------------------------------------------------------------------


async def until(predicate, timeout: float, interval: float = 0.1, what: str = "condition", logs=None):
    """Await `predicate()` (sync or async) until truthy; AssertionError after `timeout`, with
    the last 60 lines above debug of `logs()` (e.g. FleetKit.logs: what the fleet said)."""
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        try:
            last = predicate()
            if asyncio.iscoroutine(last):
                last = await last
            if last:
                return last
        except Exception as exc:  # noqa: BLE001 - transient (NATS away, no leader yet)
            last = exc
        await asyncio.sleep(interval)
    said = ""
    if logs is not None:
        lines = [line for line in logs().splitlines() if '"level": "debug"' not in line]
        said = "\nthe fleet's logs (last 60 lines above debug):\n" + "\n".join(lines[-60:])
    raise AssertionError(f"{what} not reached within {timeout}s (last: {last!r}){said}")


async def status_or_none(client, timeout: float = 1.0) -> dict | None:
    try:
        return await client.status(timeout=timeout)
    except Exception:  # noqa: BLE001
        return None


async def read_dead_letters(js, tier: str = "*") -> list[dict]:
    """Every dead letter in RATEFLEET_DEAD (optionally of one tier), oldest first, each with its
    `_subject` and `_seq`; none when the stream is not there."""
    try:
        info = await js.stream_info(SUBJECTS.dead_stream)
    except Exception:  # noqa: BLE001 - no stream: no letters
        return []
    letters = []
    for seq in range(info.state.first_seq, info.state.last_seq + 1):
        try:
            msg = await js.get_msg(SUBJECTS.dead_stream, seq)
        except Exception:  # noqa: BLE001 - deleted
            continue
        if tier == "*" or msg.subject == SUBJECTS.dead(tier):
            letters.append({"_subject": msg.subject, "_seq": seq, **json.loads(msg.data)})
    return letters


def worker_entry(status: dict | None, worker: str) -> dict | None:
    """Worker `worker`'s entry in a status answer (None: no answer, or not listed)."""
    return next((w for w in (status or {}).get("workers", []) if w.get("id") == worker), None)


async def wait_workers(client, names: set[str] | int, timeout: float = 25.0) -> dict:
    """Until a leader answers status listing these workers (or this many)."""

    async def ok():
        status = await status_or_none(client)
        if not status or not status.get("leader"):
            return None
        ids = {w["id"] for w in status.get("workers", []) if not w.get("draining")}
        want = len(ids) >= names if isinstance(names, int) else names <= ids
        return status if want else None

    return await until(ok, timeout, 0.2, f"leader with workers {names}")


async def wait_leader_is(client, predicate, timeout: float) -> dict:
    async def ok():
        status = await status_or_none(client, 0.5)
        return status if status and predicate(status.get("leader")) else None

    return await until(ok, timeout, 0.05, "leader change")


def worker_in_flight(status: dict | None, worker: str) -> int:
    for entry in (status or {}).get("workers", []):
        if entry.get("id") == worker:
            return int(entry.get("in_flight") or 0)
    return 0


async def wait_exit(proc: subprocess.Popen, timeout: float) -> int | None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            return proc.returncode
        await asyncio.sleep(0.05)
    return None


# -- results ------------------------------------------------------------------------------


@dataclass
class Tracker:
    """Watches results (core subscription: arrival times, publish attempts) and the stream."""

    url: str
    nc: object = None
    js: object = None
    first_seen: dict[str, float] = field(default_factory=dict)  # job id -> monotonic time
    publishes: Counter = field(default_factory=Counter)  # job id -> result publishes seen
    batch_of: dict[str, str] = field(default_factory=dict)
    worker_of: dict[str, str] = field(default_factory=dict)  # job id -> worker of its first Result seen
    _sub: object = None

    async def start(self) -> Tracker:
        self.nc = await nats.connect(self.url, max_reconnect_attempts=-1, reconnect_time_wait=0.2,
                                     connect_timeout=5, name="faultkit-tracker")
        self.js = self.nc.jetstream(timeout=5)

        async def on_result(msg):
            parts = msg.subject.split(".")
            job_id = parts[-1]
            self.publishes[job_id] += 1
            self.first_seen.setdefault(job_id, time.monotonic())
            self.batch_of.setdefault(job_id, parts[-2])
            if job_id not in self.worker_of:
                try:
                    self.worker_of[job_id] = json.loads(msg.data).get("worker") or ""
                except ValueError:
                    self.worker_of[job_id] = ""

        self._sub = await self.nc.subscribe(SUBJECTS.results("*", "*"), cb=on_result)
        return self

    async def close(self) -> None:
        if self.nc is not None and not self.nc.is_closed:
            await self.nc.close()

    async def __aenter__(self) -> Tracker:
        return await self.start()

    async def __aexit__(self, *exc) -> None:
        await self.close()

    def seen(self, ids) -> int:
        return sum(1 for i in ids if i in self.first_seen)

    async def stored(self, batch: str | None) -> dict[str, int]:
        """{job id: stored result count} for one batch, from the RESULTS stream."""
        info = await self.js.stream_info(SUBJECTS.results_stream, subjects_filter=SUBJECTS.batch_results(batch))
        return {subject.split(".")[-1]: count for subject, count in (info.state.subjects or {}).items()}

    async def wait_stored(self, batch: str | None, ids, timeout: float) -> dict[str, int]:
        """Until every id has a stored result (or the timeout); returns the last counts."""
        want = set(ids)
        deadline = time.monotonic() + timeout
        counts: dict[str, int] = {}
        while time.monotonic() < deadline:
            try:
                counts = await self.stored(batch)
                if want <= set(counts):
                    return counts
            except Exception:  # noqa: BLE001 - NATS away for a moment
                pass
            await asyncio.sleep(0.25)
        return counts

    async def result(self, job_id: str, batch: str | None = "*") -> Result | None:
        try:
            msg = await self.js.get_last_msg(SUBJECTS.results_stream, SUBJECTS.results(batch, job_id))
        except Exception:  # noqa: BLE001 - none
            return None
        return Result.from_json(msg.data)

    async def results(self, ids, batch: str | None = "*") -> dict[str, Result]:
        out = {}
        for job_id in ids:
            found = await self.result(job_id, batch)
            if found is not None:
                out[job_id] = found
        return out

    async def dead_letters(self, tier: str = "*") -> list[dict]:
        """Every dead letter (optionally of one tier), oldest first (`read_dead_letters`)."""
        return await read_dead_letters(self.js, tier)

    async def letters_of(self, job_ids, timeout: float = 15.0) -> dict[str, dict]:
        """The dead letters of `job_ids` by job id, waiting up to `timeout` seconds for each
        to appear: a job's letter is written after its Result is stored and acked
        (dispatcher/shell/refusals.py), so seeing the Result does not mean the letter is there.
        Ids still without a letter at the timeout are missing from the answer."""
        want = set(job_ids)
        deadline = time.monotonic() + timeout
        while True:
            letters = {x["job_id"]: x for x in await self.dead_letters() if x.get("job_id") in want}
            if set(letters) == want or time.monotonic() >= deadline:
                return letters
            await asyncio.sleep(0.1)

    async def jobs_in_stream(self) -> int:
        info = await self.js.stream_info(SUBJECTS.jobs_stream)
        return info.state.messages


def assert_exactly_once(counts: dict[str, int], ids) -> None:
    """Each submitted id has exactly one stored result, and nothing else is in the batch."""
    ids = list(ids)
    missing = [i for i in ids if i not in counts]
    doubled = {i: n for i, n in counts.items() if n != 1}
    extra = set(counts) - set(ids)
    assert not missing, f"{len(missing)} of {len(ids)} jobs have no result, e.g. {missing[:5]}"
    assert not doubled, f"jobs with more than one stored result: {doubled}"
    assert not extra, f"results for ids nobody submitted: {sorted(extra)[:5]}"
    assert sum(counts.values()) == len(ids)


# -- mock upstream ------------------------------------------------------------------------


@contextmanager
def upstream(**settings):
    """The real mock upstream with generous limits for k1..k4 (so it never 429s on its own)."""
    keys = settings.pop("keys", None) or mock_keys(rps=1000, burst=200, ids=("k1", "k2", "k3", "k4"))
    with running_mock(MockSettings(keys=keys, accept_unknown=False, **settings)) as mock:
        yield mock


def calls(mock, *, path: str | None = None, status: int | None = None, key: str | None = None) -> int:
    """Upstream requests in the mock's log matching path/status/key."""
    return sum(1 for row in mock.log(100_000)
               if (path is None or row["path"] == path) and (status is None or row["status"] == status)
               and (key is None or row["key"] == key))


def assert_only_host(mock) -> None:
    """The upstream saw no Host header other than its own address."""
    hosts = set(mock.stats()["hosts"])
    expected = urlparse(mock.url).netloc
    assert hosts <= {expected}, f"the upstream saw other hosts: {hosts} (expected only {expected})"


@asynccontextmanager
async def one_worker_fleet(tmp_path: Path, url: str, overrides: dict | None = None):
    """The mock upstream, a dispatcher d1 and a worker w1 on the NATS at `url`, a raw nats-py
    connection and a ratefleet Client, once the leader lists w1: yields (mock, raw, client).
    `overrides`: config sections merged into the fleet's (FleetKit.overrides)."""
    with upstream() as mock:
        kit = FleetKit(tmp_path, url, mock.url, keys=fast_keys(), overrides=overrides or {})
        raw = await nats.connect(url)
        try:
            kit.dispatcher("d1")
            kit.worker("w1")
            async with await Client.connect(url) as client:
                await wait_workers(client, {"w1"})
                yield mock, raw, client
        finally:
            await raw.close()
            kit.stop()


def fast_keys(rps: float = 200, burst: float = 20, ids=("k1", "k2")) -> list[dict]:
    return [{"id": k, "rps": rps, "burst": burst} for k in ids]


# -- CLI ----------------------------------------------------------------------------------


def cli(*args: str, env: dict | None = None, timeout: float = 60.0, stdin: str | None = None) -> subprocess.CompletedProcess:
    """`python -m ratefleet ARGS` as a subprocess; returns the CompletedProcess (text). `timeout`
    is a hang guard only (seconds): at load 25-30 a `submit` of a few lines ran out of 30 s, most
    of it the interpreter's start-up."""
    full_env = {**os.environ, "RATEFLEET_LOG_FORMAT": "json", **(env or {})}
    full_env.pop("RATEFLEET_NATS_URL", None)
    return subprocess.run([sys.executable, "-m", "ratefleet", *args], capture_output=True, text=True,
                          timeout=timeout, env=full_env, input=stdin)


def cli_side_by_side(*calls: tuple[str, ...], timeout: float = 30.0) -> list[subprocess.CompletedProcess]:
    """Independent `cli` calls run at once, their CompletedProcesses in order. On a loaded 2-core
    machine one interpreter's start-up and imports took 11-29 s (0.8 s of CPU): a test making
    five calls one after the other spent its whole pytest timeout starting Pythons."""
    with ThreadPoolExecutor(max_workers=len(calls)) as pool:
        return list(pool.map(lambda args: cli(*args, timeout=timeout), calls))


# imports ratefleet.cli (and what its main imports lazily), says so by creating $RF_TEST_READY,
# then waits for a line on stdin before running the same main() as `python -m ratefleet`
_WARM_CLI = ("import os, sys; from ratefleet.cli import main; import anyio._backends._asyncio, ratefleet.submit_cmd; "
             "open(os.environ['RF_TEST_READY'], 'w').close(); sys.stdin.readline(); sys.argv[0] = 'ratefleet'; main()")


class WarmCli:
    """`python -m ratefleet ARGS` started ahead, held after its imports until `run()`. A command
    a test times, or sends at a moment it waited for, must not carry the interpreter's start-up:
    11-29 s wall (0.8 s of CPU) on a loaded 2-core machine. `ready()` waits for the imports."""

    def __init__(self, *args: str, ready_dir: Path, env: dict | None = None, json_logs: bool = True) -> None:
        self.args = args
        self.ready_file = ready_dir / f"cli-ready-{os.getpid()}-{id(self)}"
        logs = {"RATEFLEET_LOG_FORMAT": "json"} if json_logs else {}  # (json: as `cli` runs it)
        full_env = {**os.environ, **logs, **(env or {}), "RF_TEST_READY": str(self.ready_file)}
        full_env.pop("RATEFLEET_NATS_URL", None)
        self.proc = subprocess.Popen([sys.executable, "-c", _WARM_CLI, *args], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=full_env)

    def ready(self, timeout: float = 90.0) -> None:
        deadline = time.monotonic() + timeout
        while not self.ready_file.exists():
            assert self.proc.poll() is None, f"ratefleet {' '.join(self.args)} exited {self.proc.returncode} while importing"
            assert time.monotonic() < deadline, f"ratefleet {' '.join(self.args)} not imported within {timeout}s"
            time.sleep(0.05)

    def run(self, timeout: float = 30.0) -> subprocess.CompletedProcess:
        """Let it run; its CompletedProcess once it exits (TimeoutExpired after `timeout`)."""
        try:
            out, err = self.proc.communicate("go\n", timeout=timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.communicate()
            raise
        return subprocess.CompletedProcess(["ratefleet", *self.args], self.proc.returncode, out, err)

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.communicate()


def embed_job(i: int, **extra) -> dict:
    """A job on /v1/embeddings (a path the tests keep apart from the chat jobs in the mock log)."""
    mock = extra.pop("mock", None)
    body = {"model": "e", "input": f"text {i}"}
    if mock is not None:
        body["mock"] = mock
    return {"request": {"method": "POST", "path": "/v1/embeddings", "json": body}, **extra}


async def start_d1_w1(kit, url: str, slots: int = 4) -> None:
    """Start dispatcher d1 and worker w1 (`slots`) of `kit` and wait until w1 takes jobs."""
    from ratefleet import Client

    kit.dispatcher("d1")
    kit.worker("w1", slots=slots)
    async with await Client.connect(url) as client:
        await wait_workers(client, {"w1"})


def write_chat_jobs(path: Path, n: int) -> Path:
    """A JSONL file of `n` chat jobs (chat(0) .. chat(n - 1)); returns `path`."""
    path.write_text("".join(json.dumps(chat(i)) + "\n" for i in range(n)))
    return path


def chat(i: int, mock: dict | None = None, **extra) -> dict:
    body = {"model": "m", "messages": [{"role": "user", "content": f"hello {i}"}]}
    if mock is not None:
        body["mock"] = mock
    return {"request": {"method": "POST", "path": "/v1/chat/completions", "json": body}, **extra}


def figure(name: str, **values) -> None:
    """Print a measured figure so `pytest -s` shows it."""
    parts = " ".join(f"{k}={round(v, 3) if isinstance(v, float) else v}" for k, v in values.items())
    print(f"\n[figure] {name}: {parts}", flush=True)


# -- a network path that stalls -------------------------------------------------------------


class PausableProxy:
    """A TCP relay from 127.0.0.1:`port` to 127.0.0.1:`target_port` whose traffic can be held
    (`pause()`) and let go (`resume()`) in both directions, connections kept open: a stalled
    network path or a frozen server, for the clients that connect through it only. Runs in the
    test's event loop: `await start()`, `await close()`."""

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self.port = 0
        self._open = asyncio.Event()
        self._open.set()
        self._server: asyncio.AbstractServer | None = None
        self._tasks: set[asyncio.Task] = set()

    @property
    def url(self) -> str:
        return f"nats://127.0.0.1:{self.port}"

    async def start(self) -> PausableProxy:
        self._server = await asyncio.start_server(self._relay, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    def pause(self) -> None:
        self._open.clear()

    def resume(self) -> None:
        self._open.set()

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    async def _relay(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.target_port)
        for source, sink in ((reader, up_writer), (up_reader, writer)):
            task = asyncio.ensure_future(self._pipe(source, sink))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _pipe(self, source: asyncio.StreamReader, sink: asyncio.StreamWriter) -> None:
        try:
            while data := await source.read(65536):
                await self._open.wait()
                sink.write(data)
                await sink.drain()
        except (ConnectionError, asyncio.CancelledError):
            pass
        finally:
            sink.close()
