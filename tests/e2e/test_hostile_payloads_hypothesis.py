"""Property over a running fleet: whatever bytes any NATS client publishes to the jobs
subjects (invalid UTF-8, lone surrogates, NaN, deep nesting, huge numbers, odd types, jobs
that are almost valid), the leader stays up, every message ends with exactly one terminal
Result (and a dead letter when refused), and the good jobs sent in between all succeed.

One fleet (nats-server, a dispatcher and a worker process, the mock upstream) serves every
example; an event loop of the test's own carries the NATS connections between examples."""

from __future__ import annotations

import asyncio
import itertools
import json

import nats
import pytest
from faultkit import Tracker, chat, fast_keys, upstream, wait_workers
from fleetkit import FleetKit
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ratefleet import Client

pytestmark = pytest.mark.timeout(240)
TIERS = ("vip", "premium", "normal", "guest")
TERMINAL = {"succeeded", "failed", "expired", "invalid"}

# text with lone surrogates (category Cs), which hypothesis leaves out unless asked
hostile_text = st.text(st.one_of(st.characters(), st.characters(categories=["Cs"])), max_size=8)
numbers = st.one_of(st.integers(min_value=-(10 ** 400), max_value=10 ** 400),
                    st.floats(allow_nan=True, allow_infinity=True))
json_values = st.recursive(
    st.one_of(st.none(), st.booleans(), numbers, hostile_text),
    lambda children: st.one_of(st.lists(children, max_size=3),
                               st.dictionaries(hostile_text, children, max_size=3)),
    max_leaves=8)


def _deep(depth: int) -> str:
    return "[" * depth + "]" * depth


def _almost_valid(field: str, value) -> str:
    """A chat job with one hostile part (JSON text as Python writes it: NaN bare, surrogates escaped)."""
    request = {"method": "POST", "path": "/v1/chat/completions",
               "json": {"model": "m", "messages": [{"role": "user", "content": "hi"}]}}
    job: dict = {"request": request}
    if field == "metadata":
        job["metadata"] = {"m": value}
    elif field == "header":
        request["headers"] = {str(value)[:20] if not isinstance(value, str) else value: "v"}
    elif field == "header_value":
        request["headers"] = {"X-Note": value if isinstance(value, str) else json.dumps(value)[:40]}
    elif field == "query":
        request["query"] = {"q": value}
    elif field == "path":
        request["path"] = "/v1/" + (value if isinstance(value, str) else json.dumps(value)[:20])
    else:
        request["json"] = {"model": "m", "messages": [{"role": "user", "content": value}]}
    return json.dumps(job)


payloads = st.one_of(
    st.binary(max_size=64),
    json_values.map(json.dumps),
    st.tuples(st.sampled_from(["metadata", "header", "header_value", "query", "path", "json"]),
              json_values).map(lambda pair: _almost_valid(*pair)),
    st.integers(min_value=1, max_value=4000).map(
        lambda d: '{"request": {"path": "/v1/chat/completions", "json": %s}}' % _deep(d)),
    st.sampled_from(['{"request": {"path": "/v1/x", "json": 1e999}}', '{"request": 1e999}', "NaN", "-Infinity",
                     '{"request": {"path": "/v1/x", "json": {"a": "\\ud83d"}}}', '{"request": {"path": "\\udc00"}}',
                     "\"\\ud800\"", '{"\\ud83d": 1}']),
).map(lambda p: p if isinstance(p, bytes) else p.encode("utf-8", "surrogatepass"))


class Fleet:
    """The running fleet and a loop to talk to it from hypothesis' synchronous examples."""

    def __init__(self, kit: FleetKit, url: str):
        self.kit, self.url = kit, url
        self.loop = asyncio.new_event_loop()
        self.ids = itertools.count()
        self.results_seen = 0

    def run(self, coro):
        return self.loop.run_until_complete(asyncio.wait_for(coro, 60))

    async def start(self) -> None:
        self.raw = await nats.connect(self.url)
        self.client = await Client.connect(self.url)
        self.tracker = await Tracker(self.url).start()
        await wait_workers(self.client, {"w1"})
        status = await self.client.status()
        self.leader = (status["leader"], status["leader_since"])

    async def close(self) -> None:
        await self.tracker.close()
        await self.client.close()
        await self.raw.close()


@pytest.fixture
def fleet(tmp_path, nats_server):
    with upstream() as mock:
        kit = FleetKit(tmp_path, nats_server.url, mock.url, keys=fast_keys(),
                       overrides={"streams": {"ack_wait_s": 5}})
        kit.dispatcher("d1")
        kit.worker("w1")
        running = Fleet(kit, nats_server.url)
        try:
            running.run(running.start())
            yield running
            running.run(running.close())
        finally:
            kit.stop()
            running.loop.close()


async def _example(fleet: Fleet, messages: list[tuple[str, bytes]]) -> None:
    js = fleet.raw.jetstream()
    hostile, good = [], []
    for tier, payload in messages:
        job_id = f"x{next(fleet.ids)}"
        if isinstance(obj := _loads(payload), dict):  # its result is found under the message id
            if "id" in obj or "batch" in obj:
                continue
        await js.publish(f"ratefleet.jobs.{tier}", payload, headers={"Nats-Msg-Id": job_id})
        hostile.append(job_id)
        good.append(await fleet.client.submit(chat(len(good)), tier, batch="good"))
    want = hostile + good
    deadline = fleet.loop.time() + 30
    while fleet.tracker.seen(want) < len(want) and fleet.loop.time() < deadline:
        await asyncio.sleep(0.05)
    invalid = [job_id for job_id in hostile if (r := await fleet.tracker.result(job_id)) and r.status == "invalid"]
    letters = set(await fleet.tracker.letters_of(invalid))
    for job_id in hostile:
        result = await fleet.tracker.result(job_id)
        assert result is not None, f"{job_id}: no terminal Result within 30 s"
        assert result.status in TERMINAL
        assert fleet.tracker.publishes[job_id] == 1, f"{job_id}: {fleet.tracker.publishes[job_id]} Results"
        if result.status == "invalid":
            assert job_id in letters, f"{job_id}: refused ({result.error}) without a dead letter"
    for job_id in good:
        result = await fleet.tracker.result(job_id, "good")
        assert result is not None and result.status == "succeeded", f"good job {job_id}: {result}"
    assert fleet.kit.processes[0].poll() is None, "the dispatcher exited"
    logs = fleet.kit.logs()
    assert "leader session failed" not in logs, "a payload crashed the leader session"
    status = await fleet.client.status()
    if "lease renewal failing" not in logs:  # (a lease lost to a stalled machine is not this test's business)
        assert (status["leader"], status["leader_since"]) == fleet.leader, "the leader session restarted"


def _loads(payload: bytes):
    try:
        return json.loads(payload)
    except Exception:  # noqa: BLE001 - not JSON
        return None


@settings(max_examples=30, deadline=None, database=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow,
                                 HealthCheck.data_too_large])
@given(messages=st.lists(st.tuples(st.sampled_from(TIERS), payloads), min_size=1, max_size=3))
def test_no_payload_stops_the_leader_or_goes_without_exactly_one_result(fleet, messages):
    fleet.run(_example(fleet, messages))


def test_the_leader_logged_no_crash_over_the_hostile_payloads(fleet):
    """The same fleet over a fixed set of the worst payloads, then its logs."""
    worst = [b'{"request": {"path": "/v1/x", "json": {"a": "\\ud83d"}}}', b'{"request": 1e999}', b"\xff\xfe",
             b'{"request": {"path": "/v1/x", "json": ' + b"[" * 3000 + b"]" * 3000 + b"}}",
             b'{"request": {"path": "/v1/x"}, "metadata": {"n": NaN}}']
    fleet.run(_example(fleet, [("normal", p) for p in worst]))
    logs = fleet.kit.logs()
    for crash in ("leader session failed", "could not read a job message", "assignment failed"):
        assert crash not in logs, crash
