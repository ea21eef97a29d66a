"""Randomized crash soak: real processes, seeded SIGKILL / SIGSTOP chaos, every job checked.

Each round starts a fresh fleet of real processes: an embedded nats-server (or, with
`--cluster`, three servers in a JetStream cluster with R3 streams), two dispatchers (leader
and standby), W workers and a counting upstream (bench/counting_upstream.py: records every
call with the job id the soak writes into the body, its start and end times). Traffic for
`--duration` seconds: batches of random size and tier sent with `Client.submit_many` (a
refused or interrupted submit is sent again with the same ids until it returns), one in
`--cli-every` through `ratefleet submit`, and `--requesters` concurrent `Client.request`
callers. Chaos at exponentially distributed moments (`--kill-rate` per second, seeded):
SIGKILL or SIGSTOP a random process (the dispatcher leader, the standby, a worker, a
nats-server), wait a random down time, then restart it (SIGCONT a stopped one). Chaos
events do not overlap: one process is down at a time.

Then every process runs again, the soak waits until every job has a Result (`--settle`
seconds at most) and checks, per job id:
- exactly one stored Result; no submitted job without one (a batch whose submit never
  returned counts as submitted too, reported apart);
- upstream calls: a second call of a job is *explained* when a chaos event (kill or stop)
  began between the two calls' starts: a crash or stall hit while the first call was in
  flight or its Result not yet stored. One that only overlaps an event begun earlier is
  reported apart (outage_only); any other repeat is *unexplained*, a break (the upstream
  never fails, so the fleet has no reason of its own to call twice). A call that starts
  after the job's Result was stored is a break too, unless it is an explained repeat
  starting within AFTER_STORE_RACE_S of the store (handed out again while the crashed
  call's Result was on its way: raced_the_store);
- the stored Result carries one of that job's calls (the upstream echoes its call number);
- every request caller got a Result equal to the stored one (same call), or a
  RequestTimeout whose job has its Result by the end;
- dead letters: each names a job with a non-succeeded Result, counted by reason.

Prints a table per round and writes bench/results/soak.json. Replay a round with its seed.
Run: .venv/bin/python bench/soak.py [--duration S] [--seed N] [--rounds R] [--kill-rate K]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import platform
import random
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import structlog
from rich.console import Console
from rich.table import Table

HERE = Path(__file__).parent
sys.path.insert(0, str(HERE.parent / "tests" / "e2e"))
from clusterkit import NatsCluster, wait_jetstream_ready  # noqa: E402
from faultkit import read_dead_letters  # noqa: E402
from fleetkit import FleetKit  # noqa: E402

from ratefleet.client import Client  # noqa: E402
from ratefleet.runtime.connect import connect  # noqa: E402
from ratefleet.runtime.embedded import EmbeddedNats  # noqa: E402
from ratefleet.schemas import Subjects  # noqa: E402
from ratefleet.schemas.errors import RatefleetError, RequestTimeout  # noqa: E402

TIERS = ("vip", "premium", "normal", "guest")
# a repeat explained by a crash in flight may start this long after the crashed call's Result was stored: the
# job was handed out again (its first worker silent, its Result on its way) just before the store, not after
AFTER_STORE_RACE_S = 0.5
SUBJECTS = Subjects()


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--duration", type=float, default=60.0, help="seconds of traffic and chaos per round")
    parser.add_argument("--seed", type=int, default=None, help="seed of the first round (default: random, printed)")
    parser.add_argument("--rounds", type=int, default=1, help="rounds, seeds seed, seed+1, ...")
    parser.add_argument("--kill-rate", type=float, default=0.2, help="chaos events per second (mean)")
    parser.add_argument("--targets", nargs="+", default=["leader", "standby", "worker", "nats"],
                        choices=("leader", "standby", "worker", "nats"))
    parser.add_argument("--actions", nargs="+", default=["kill", "stop"], choices=("kill", "stop"))
    parser.add_argument("--max-down", type=float, default=5.0, help="longest down time of an event, seconds")
    parser.add_argument("--long-stops", type=float, default=0.1,
                        help="share of SIGSTOPs held 12-20 s (past ack_wait_s 10 and the lease)")
    parser.add_argument("--chaos-streams", type=int, default=1,
                        help="independent chaos loops (2+: events overlap, never on the same process)")
    parser.add_argument("--workers", type=int, default=3)
    parser.add_argument("--slots", type=int, default=8)
    parser.add_argument("--requesters", type=int, default=4)
    parser.add_argument("--batch-max", type=int, default=120, help="largest batch")
    parser.add_argument("--cli-every", type=int, default=5, help="every Nth batch through `ratefleet submit` (0: never)")
    parser.add_argument("--cluster", action="store_true", help="three nats-servers, R3 streams")
    parser.add_argument("--settle", type=float, default=240.0, help="seconds to wait for every Result at the end")
    parser.add_argument("--out", type=Path, default=HERE / "results" / "soak.json")
    parser.add_argument("--keep", type=Path, default=None, help="copy each round's logs under this folder")
    return parser.parse_args(argv)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def now() -> float:
    return time.monotonic()


# -- the fleet ----------------------------------------------------------------------------


@dataclass
class Fleet:
    """The processes of one round, by name: n (or n1..n3), d1, d2, w1..wN, upstream."""

    tmp: Path
    args: argparse.Namespace
    nats: dict[str, EmbeddedNats] = field(default_factory=dict)
    procs: dict = field(default_factory=dict)
    upstream_url: str = ""
    nats_url: str = ""
    kit: FleetKit | None = None
    _cluster: NatsCluster | None = None
    _upstream: subprocess.Popen | None = None

    def start(self) -> Fleet:
        if self.args.cluster:
            self._cluster = NatsCluster(self.tmp / "cluster").start()
            asyncio.run(wait_jetstream_ready(self._cluster.urls))
            self.nats, self.nats_url = dict(self._cluster.servers), self._cluster.url
        else:
            server = EmbeddedNats(self.tmp / "nats").start()
            server.port = int(server.url.rsplit(":", 1)[1])  # pinned: a restart comes back at the same URL
            self.nats, self.nats_url = {"n": server}, server.url
        port = free_port()
        self.upstream_url = f"http://127.0.0.1:{port}"
        log = open(self.tmp / "upstream.log", "ab")
        self._upstream = subprocess.Popen([sys.executable, str(HERE / "counting_upstream.py"), str(port)],
                                          stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        log.close()
        overrides = {"workers": {"slots": self.args.slots, "heartbeat_s": 0.5, "grace_s": 5},
                     "dispatcher": {"lease_ttl_s": 2.0, "worker_timeout_s": 2.0}}
        if self.args.cluster:
            overrides["streams"] = {"replicas": 3, "ack_wait_s": 10}
        self.kit = FleetKit(self.tmp, self.nats_url, self.upstream_url,
                            keys=[{"id": "k1", "rps": 200, "burst": 20}, {"id": "k2", "rps": 200, "burst": 20}],
                            overrides=overrides)
        for name in ["d1", "d2", *[f"w{i + 1}" for i in range(self.args.workers)]]:
            self.spawn(name)
        return self

    def spawn(self, name: str) -> None:
        assert self.kit is not None
        self.procs[name] = self.kit.dispatcher(name) if name.startswith("d") else self.kit.worker(name)

    def pid(self, name: str) -> int:
        return self.nats[name].process.pid if name in self.nats else self.procs[name].pid

    def kill(self, name: str) -> None:
        if name in self.nats:
            self.nats[name].kill()
        else:
            self.procs[name].kill()
            self.procs[name].wait()

    def restart(self, name: str) -> None:
        if name in self.nats:
            self.nats[name].start(timeout=30)
        else:
            self.spawn(name)

    def signal(self, name: str, sig: int) -> None:
        try:
            os.kill(self.pid(name), sig)
        except ProcessLookupError:
            pass

    def restore(self) -> None:
        """Every process running and not stopped (the end of a round)."""
        for name in list(self.nats) + list(self.procs):
            self.signal(name, signal.SIGCONT)
        for name, server in self.nats.items():
            if server.process is None or server.process.poll() is not None:
                self.restart(name)
        for name, proc in list(self.procs.items()):
            if proc.poll() is not None:
                self.restart(name)

    def stop(self) -> None:
        for name in list(self.nats) + list(self.procs):
            self.signal(name, signal.SIGCONT)
        if self.kit is not None:
            self.kit.stop()
        if self._upstream is not None:
            self._upstream.terminate()
            try:
                self._upstream.wait(10)
            except subprocess.TimeoutExpired:
                self._upstream.kill()
                self._upstream.wait()
        for server in self.nats.values():
            server.stop()

    async def calls(self) -> list[list]:
        async with httpx.AsyncClient(trust_env=False, timeout=30) as http:
            return (await http.get(self.upstream_url + "/_calls")).json()


# -- traffic ------------------------------------------------------------------------------


def job(job_id: str, rng: random.Random) -> dict:
    roll = rng.random()
    delay = rng.uniform(0, 50) if roll < 0.7 else rng.uniform(200, 1500) if roll < 0.95 else rng.uniform(3000, 6000)
    return {"id": job_id, "request": {"method": "POST", "path": "/v1/chat/completions",
            "json": {"model": "m", "messages": [], "soak_id": job_id, "delay_ms": round(delay)}}}


@dataclass
class Ledger:
    """What the soak's producers and callers did, and were told."""

    accepted: set = field(default_factory=set)  # ids whose submit returned (they must have a Result)
    unconfirmed: set = field(default_factory=set)  # ids of a submit that never returned
    submit_errors: Counter = field(default_factory=Counter)
    batches: int = 0
    cli_batches: int = 0
    requests: dict = field(default_factory=dict)  # id -> {"outcome", "call", "error"}


async def producer(client: Client, fleet: Fleet, ledger: Ledger, rng: random.Random, until: float) -> None:
    k = 0
    while now() < until:
        k += 1
        batch, tier = f"b{k}", rng.choice(TIERS)
        jobs = [job(f"{batch}-{i}", rng) for i in range(rng.randint(5, fleet.args.batch_max))]
        ids = [j["id"] for j in jobs]
        ledger.unconfirmed.update(ids)
        via_cli = fleet.args.cli_every > 0 and k % fleet.args.cli_every == 0
        ok = await (submit_cli(fleet, jobs, tier, batch, ledger) if via_cli else submit_sdk(client, jobs, tier, batch, ledger))
        if ok:
            ledger.unconfirmed.difference_update(ids)
            ledger.accepted.update(ids)
        ledger.batches += 1
        ledger.cli_batches += via_cli
        await asyncio.sleep(rng.uniform(0.2, 1.5))


async def submit_sdk(client: Client, jobs: list[dict], tier: str, batch: str, ledger: Ledger) -> bool:
    deadline = now() + 120
    while now() < deadline:
        try:
            await asyncio.wait_for(client.submit_many(jobs, tier, batch=batch), 60)
            return True
        except (RatefleetError, TimeoutError) as exc:
            ledger.submit_errors[type(exc).__name__] += 1
            await asyncio.sleep(0.5)
    return False


async def submit_cli(fleet: Fleet, jobs: list[dict], tier: str, batch: str, ledger: Ledger) -> bool:
    path = fleet.tmp / f"{batch}.jsonl"
    path.write_text("".join(json.dumps(j) + "\n" for j in jobs))
    deadline = now() + 180
    while now() < deadline:
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "ratefleet", "submit", str(path), "--tier", tier, "--batch", batch,
            "--config", str(fleet.kit.config_path), stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE,
            env={**fleet.kit.env(), "RATEFLEET_LOG_LEVEL": "WARNING"})
        _, err = await proc.communicate()
        if proc.returncode == 0:
            return True
        ledger.submit_errors[f"cli exit {proc.returncode}"] += 1
        (fleet.tmp / f"{batch}.cli-err").write_bytes(err[-4000:])
        await asyncio.sleep(0.5)
    return False


async def requester(client: Client, c: int, ledger: Ledger, rng: random.Random, until: float) -> None:
    i = 0
    while now() < until:
        i += 1
        job_id = f"rq{c}-{i}"
        entry = ledger.requests[job_id] = {"outcome": "pending", "call": None, "error": None}
        try:
            result = await client.request(job(job_id, rng), rng.choice(TIERS), timeout=rng.uniform(3, 15))
            body = (result.response.json_body if result.response else None) or {}
            entry.update(outcome="result", call=body.get("call"), status=result.status, job_id=result.job_id)
        except RequestTimeout:
            entry["outcome"] = "timeout"
        except RatefleetError as exc:
            entry.update(outcome="error", error=f"{type(exc).__name__}: {str(exc)[:200]}")
        await asyncio.sleep(rng.uniform(0, 0.3))


# -- chaos --------------------------------------------------------------------------------


async def leader_of(client: Client) -> str | None:
    try:
        return (await client.status(timeout=1.0)).get("leader")
    except Exception:  # noqa: BLE001 - no leader answers just now
        return None


async def chaos(client: Client, fleet: Fleet, rng: random.Random, until: float, events: list, t0: float,
                busy: set) -> None:
    """Chaos events until `until`, one at a time in this loop; `busy`: the names another loop
    has down just now (skipped: an event never hits a process that is already down)."""
    dispatchers = sorted(n for n in fleet.procs if n.startswith("d"))
    workers = sorted(n for n in fleet.procs if n.startswith("w"))
    while True:
        await asyncio.sleep(rng.expovariate(fleet.args.kill_rate))
        if now() >= until:
            return
        target, action = rng.choice(fleet.args.targets), rng.choice(fleet.args.actions)
        down, long_stop, pick = rng.uniform(0.3, fleet.args.max_down), rng.random(), rng.random()
        if action == "stop" and long_stop < fleet.args.long_stops:
            down = rng.uniform(12.0, 20.0)
        if target in ("leader", "standby"):
            leader = await leader_of(client)
            if leader not in dispatchers:
                leader = dispatchers[int(pick * len(dispatchers))]
            name = leader if target == "leader" else next(d for d in dispatchers if d != leader)
        elif target == "worker":
            name = workers[int(pick * len(workers))]
        else:
            names = sorted(fleet.nats)
            name = names[int(pick * len(names))]
        if name in busy:
            continue
        busy.add(name)
        event = {"t": round(now() - t0, 2), "target": target, "name": name, "action": action, "down_s": round(down, 2),
                 "start": now()}
        print(f"  chaos t={event['t']:7.2f} {action:4} {target:7} {name:3} down {down:.2f}s", flush=True)
        if action == "kill":
            await asyncio.to_thread(fleet.kill, name)
            await asyncio.sleep(down)
            await asyncio.to_thread(fleet.restart, name)
        else:
            fleet.signal(name, signal.SIGSTOP)
            await asyncio.sleep(down)
            fleet.signal(name, signal.SIGCONT)
        event["end"] = now()
        events.append(event)
        busy.discard(name)


# -- checks -------------------------------------------------------------------------------


async def stored_results(client: Client) -> dict[str, list[dict]]:
    """Every stored Result by job id (a list: more than one is a break)."""
    out: dict[str, list[dict]] = defaultdict(list)
    info = await client.js.stream_info(SUBJECTS.results_stream)
    if not info.state.messages:
        return out
    sub = await client.js.subscribe(SUBJECTS.results("*", "*"), stream=SUBJECTS.results_stream, ordered_consumer=True)
    try:
        while True:
            msg = await sub.next_msg(timeout=10)
            data = json.loads(msg.data)
            data["_stored_at"] = msg.metadata.timestamp.timestamp()  # the server's clock: this machine's
            out[data["job_id"]].append(data)
            if msg.metadata.num_pending == 0:
                return out
    finally:
        await sub.unsubscribe()


async def wait_settled(client: Client, want: set, timeout: float) -> tuple[set, float]:
    """Until every id of `want` has a stored Result and the JOBS stream is empty; (missing, s)."""
    started, missing = now(), set(want)
    while now() - started < timeout:
        try:
            info = await client.js.stream_info(SUBJECTS.results_stream, subjects_filter=SUBJECTS.results("*", "*"))
            have = {s.rsplit(".", 1)[1] for s in (info.state.subjects or {})}
            missing = want - have
            queued = (await client.js.stream_info(SUBJECTS.jobs_stream)).state.messages
            if not missing and queued == 0:
                break
        except Exception:  # noqa: BLE001 - NATS still coming back
            pass
        await asyncio.sleep(1.0)
    return missing, now() - started


def explained(prev_start: float, start: float, events: list[dict]) -> tuple[str, dict | None]:
    """Why a job was called again at `start` after a call at `prev_start`: ("crash", event) when
    a chaos event began between the two starts (the earlier call was in flight, or its outcome
    not yet stored, when a process died or stalled); ("outage", event) when an event only
    overlaps the span, having begun before the earlier call (e.g. a stalled leader that resumes
    after a standby took over: suspect, reported apart); ("none", None) otherwise."""
    for event in events:
        if prev_start <= event["start"] <= start:
            return "crash", event
    for event in events:
        if event["start"] <= start and event.get("end", float("inf")) >= prev_start:
            return "outage", event
    return "none", None


def job_detail(stored: list[dict], calls: list, t0: float) -> dict:
    """A flagged job's calls and stored Result(s), times in seconds from the start of traffic."""
    wall0 = time.time() - (now() - t0)
    return {"calls": [{"t": round(c[0] - t0, 2), "end": None if c[1] is None else round(c[1] - t0, 2), "call": c[2]}
                      for c in sorted(calls)],
            "stored": [{"t": round(r["_stored_at"] - wall0, 2), "status": r["status"], "worker": r.get("worker"),
                        "attempts": r.get("attempts"),
                        "call": ((r.get("response") or {}).get("json") or {}).get("call")} for r in stored]}


def event_name(event: dict) -> str:
    return f"{event['action']} {event['target']} {event['name']} at t={event['t']} for {event['down_s']}s"


def check(ledger: Ledger, results: dict, calls: list[list], events: list[dict], letters: list[dict],
          missing_at_settle: set, t0: float) -> dict:
    by_job: dict[str, list] = defaultdict(list)
    for job_id, number, start, end, wall in calls:
        by_job[job_id].append((start, end, number, wall))
    submitted = ledger.accepted | ledger.unconfirmed | set(ledger.requests)
    breaks: dict[str, list] = defaultdict(list)
    statuses: Counter = Counter()
    repeats = {"explained": 0, "outage_only": 0, "unexplained": 0, "jobs_called_twice_or_more": 0, "raced_the_store": 0,
               "by_target": Counter(), "outage_detail": []}
    for job_id in sorted(submitted):
        stored = results.get(job_id, [])
        request = ledger.requests.get(job_id)
        must_have = job_id in ledger.accepted or (request and request["outcome"] in ("result", "timeout"))
        if not stored:
            if must_have:
                breaks["lost (no Result)"].append(job_id)
            continue
        if len(stored) > 1:
            breaks["more than one stored Result"].append(job_id)
        result = stored[0]
        statuses[result["status"]] += 1
        mine = sorted(by_job.get(job_id, []))
        call = ((result.get("response") or {}).get("json") or {}).get("call")
        if result["status"] == "succeeded" and call not in {c[2] for c in mine}:
            breaks["stored Result carries no call of its job"].append(job_id)
        if len(mine) > 1:
            repeats["jobs_called_twice_or_more"] += 1
        after = [i for i, c in enumerate(mine) if c[3] > result["_stored_at"] + 0.01]  # 10 ms: clocks read apart
        for i in after:  # a call after the job's Result was stored: never decided after it, or a break
            why = explained(mine[i - 1][0], mine[i][0], events)[0] if i else "none"
            if why == "crash" and mine[i][3] <= result["_stored_at"] + AFTER_STORE_RACE_S:
                repeats["raced_the_store"] += 1  # handed out while the crashed call's Result was on its way
            else:
                breaks["called after its Result was stored"].append(job_id)
                break
        for prev, cur in zip(mine, mine[1:]):
            why, event = explained(prev[0], cur[0], events)
            if why == "none":
                repeats["unexplained"] += 1
                breaks["called again with no crash in flight"].append(job_id)
            elif why == "outage":
                repeats["outage_only"] += 1
                repeats["outage_detail"].append({"job": job_id, "prev_t": round(prev[0] - t0, 2),
                                                 "t": round(cur[0] - t0, 2), "event": event_name(event)})
            else:
                repeats["explained"] += 1
                repeats["by_target"][f"{event['action']} {event['target']}"] += 1
        if request and request["outcome"] == "result" and request["call"] != call:
            breaks["request answer is not the stored Result"].append(job_id)
    for job_id in set(by_job) - submitted:
        breaks["calls for a job nobody submitted"].append(job_id)
    for job_id in set(results) - submitted:
        breaks["Result for a job nobody submitted"].append(job_id)
    letter_reasons: Counter = Counter()
    for letter in letters:
        reason = letter.get("reason") or (letter.get("error") or {}).get("code") or "?"
        letter_reasons[str(reason)] += 1
        stored = results.get(letter.get("job_id") or "", [])
        if stored and stored[0]["status"] == "succeeded":
            breaks["dead letter for a job that succeeded"].append(letter.get("job_id"))
    not_ok = {j: r[0].get("error") for j, r in results.items() if r and r[0]["status"] != "succeeded"}
    flagged = {j for ids in breaks.values() for j in ids} | set(not_ok)
    detail = {j: job_detail(results.get(j, []), by_job.get(j, []), t0) for j in sorted(flagged)[:40]}
    outcomes = Counter(r["outcome"] for r in ledger.requests.values())
    request_errors = Counter((r["error"] or "").split(":")[0] for r in ledger.requests.values() if r["outcome"] == "error")
    return {"jobs": len(submitted), "accepted": len(ledger.accepted), "unconfirmed": len(ledger.unconfirmed),
            "requests": dict(outcomes), "request_errors": dict(request_errors), "statuses": dict(statuses),
            "not_succeeded": {j: e for j, e in list(not_ok.items())[:20]}, "not_succeeded_count": len(not_ok),
            "calls": len(calls), "repeats": {**repeats, "by_target": dict(repeats["by_target"]),
                                                  "outage_detail": repeats["outage_detail"][:20]},
            "dead_letters": dict(letter_reasons), "missing_at_settle": len(missing_at_settle),
            "breaks": {k: sorted(v)[:20] for k, v in breaks.items()}, "detail": detail,
            "break_counts": {k: len(v) for k, v in breaks.items()}}


# -- a round ------------------------------------------------------------------------------


async def drive(fleet: Fleet, seed: int) -> dict:
    args = fleet.args
    nc = await connect(fleet.nats_url, name="soak", forever=True)
    client = Client(nc)
    try:
        deadline = now() + 90
        while now() < deadline:
            try:
                status = await client.status(timeout=1.0)
                if status.get("leader") and len(status.get("workers") or []) >= args.workers:
                    break
            except Exception:  # noqa: BLE001 - starting
                pass
            await asyncio.sleep(0.3)
        else:
            raise RuntimeError("the fleet did not come up within 90 s")
        ledger, events, busy = Ledger(), [], set()
        t0 = now()
        until = t0 + args.duration
        traffic = random.Random(seed * 7919 + 1)
        tasks = [producer(client, fleet, ledger, random.Random(traffic.random()), until),
                 *[chaos(client, fleet, random.Random(seed * 1000 + k), until, events, t0, busy)
                   for k in range(args.chaos_streams)],
                 *[requester(client, c, ledger, random.Random(traffic.random()), until) for c in range(args.requesters)]]
        await asyncio.gather(*tasks)
        await asyncio.to_thread(fleet.restore)
        want = ledger.accepted | {j for j, r in ledger.requests.items() if r["outcome"] in ("result", "timeout")}
        missing, settle_s = await wait_settled(client, want, args.settle)
        await asyncio.sleep(2.0)  # a Result stored twice at the very end shows up as well
        results = await stored_results(client)
        letters = await read_dead_letters(client.js)
        calls = await fleet.calls()
        summary = check(ledger, results, calls, events, letters, missing, t0)
        summary.update(seed=seed, duration_s=args.duration, settle_s=round(settle_s, 1), batches=ledger.batches,
                       cli_batches=ledger.cli_batches, submit_errors=dict(ledger.submit_errors),
                       chaos=Counter(f"{e['action']} {e['target']}" for e in events),
                       events=[{k: v for k, v in e.items() if k not in ("start", "end")} for e in events])
        return summary
    finally:
        await nc.close()


def one_round(args: argparse.Namespace, seed: int) -> dict:
    with tempfile.TemporaryDirectory(prefix=f"ratefleet-soak-{seed}-") as tmp:
        fleet = Fleet(Path(tmp), args)
        try:
            fleet.start()
            summary = asyncio.run(drive(fleet, seed))
        finally:
            fleet.stop()
            if args.keep is not None:
                dest = args.keep / f"seed-{seed}"
                dest.mkdir(parents=True, exist_ok=True)
                for log in Path(tmp).rglob("*.log"):
                    (dest / log.name).write_bytes(log.read_bytes())
        return summary


def report(rounds: list[dict]) -> None:
    console = Console(width=170)
    table = Table("seed", "jobs", "req ok/timeout/err", "chaos", "calls", "repeats crash/outage/none", "not ok",
                  "dead letters", "settle s", "breaks", title="ratefleet crash soak")
    for r in rounds:
        req = r["requests"]
        table.add_row(str(r["seed"]), str(r["jobs"]), f"{req.get('result', 0)}/{req.get('timeout', 0)}/{req.get('error', 0)}",
                      str(sum(r["chaos"].values())), str(r["calls"]),
                      "/".join(str(r["repeats"][k]) for k in ("explained", "outage_only", "unexplained")),
                      str(r["not_succeeded_count"]),
                      json.dumps(r["dead_letters"]), str(r["settle_s"]), json.dumps(r["break_counts"]) or "-")
    console.print(table)
    for r in rounds:
        if r["breaks"]:
            console.print(f"seed {r['seed']}: {json.dumps(r['breaks'])}")
        if r["repeats"]["outage_detail"]:
            console.print(f"seed {r['seed']} repeats after an outage only: {json.dumps(r['repeats']['outage_detail'])}")
        if r["not_succeeded"]:
            console.print(f"seed {r['seed']} not succeeded: {json.dumps(r['not_succeeded'])[:1500]}")
        for job_id, detail in list(r["detail"].items())[:10]:
            console.print(f"seed {r['seed']} {job_id}: {json.dumps(detail)}")


def interrupted(signum: int, frame: object) -> None:
    """Ctrl-C: out of the round at once, through `one_round`'s finally (the fleet is stopped)."""
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    signal.signal(signal.SIGINT, interrupted)  # asyncio.run's own handler only cancels: a task may absorb that
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.ERROR))  # (reconnect noise)
    first = args.seed if args.seed is not None else random.SystemRandom().randrange(1, 1_000_000)
    rounds = []
    for seed in range(first, first + args.rounds):
        print(f"round seed={seed} (replay: --seed {seed} --rounds 1 --duration {args.duration:g} "
              f"--kill-rate {args.kill_rate:g})", flush=True)
        rounds.append(one_round(args, seed))
        r = rounds[-1]
        print(f"  seed {seed}: {r['jobs']} jobs, {sum(r['chaos'].values())} chaos events, breaks {r['break_counts']}",
              flush=True)
    report(rounds)
    out = {"benchmark": "soak", "command": " ".join(sys.argv), "rounds": rounds,
           "totals": {"rounds": len(rounds), "seeds": [r["seed"] for r in rounds],
                      "jobs": sum(r["jobs"] for r in rounds), "chaos_events": sum(sum(r["chaos"].values()) for r in rounds),
                      "breaks": sum(sum(r["break_counts"].values()) for r in rounds)},
           "machine": {"nproc": os.cpu_count(), "python": platform.python_version(), "loadavg": os.getloadavg()}}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(out, indent=1, default=str))
    return 1 if out["totals"]["breaks"] else 0


if __name__ == "__main__":
    raise SystemExit(main())
