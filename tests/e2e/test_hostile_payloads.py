"""Payloads that cannot go on the wire, over a real fleet (nats-server, dispatcher and worker
processes, the mock upstream): refused at every door with the field and why, `invalid` on
their first delivery when published raw, never a crash of the leader, never a call, never a
key switched off; and a worker handed such a job anyway ends it `invalid` without a call."""

from __future__ import annotations

import asyncio
import json
import time

import nats
import pytest
from faultkit import Tracker, assert_exactly_once, calls, chat, cli, fast_keys, until, upstream, wait_workers
from fleetkit import FleetKit

from ratefleet import Client
from ratefleet.runtime.streams import ensure_topology, tier_consumer
from ratefleet.schemas import Result, Subjects
from ratefleet.schemas.config import load_config
from ratefleet.schemas.errors import JobInvalid
from ratefleet.schemas.internal import Assignment

pytestmark = [pytest.mark.timeout(90), pytest.mark.anyio]
SUBJECTS = Subjects("ratefleet")
EMBED = "/v1/embeddings"  # the hostile jobs' path, so the mock's log tells their calls apart


def embed(job_id: str, **request) -> dict:
    return {"id": job_id, "batch": "hostile",
            "request": {"method": "POST", "path": EMBED, "json": {"model": "e", "input": "x"}, **request}}


# (id, JSON text as a producer sends it, code); lone surrogates and NaN are written as any
# JSON encoder writes them: "\ud83d" escaped, NaN bare (Python's json.dumps default)
RAW_CASES = [
    ("p-authcolon", json.dumps(embed("p-authcolon", headers={"Authorization:": "Bearer sk-caller-000000"})),
     "forbidden_target"),
    ("p-title", json.dumps(embed("p-title", headers={"X-Title": "Café – 日本語"})), "invalid_job"),
    ("p-surrogate", json.dumps(embed("p-surrogate", json={"model": "e", "input": "\ud83d"})), "invalid_job"),
    ("p-nan", json.dumps(embed("p-nan", json={"model": "e", "input": "x", "temperature": float("nan")})),
     "invalid_job"),
    ("p-inf-meta", json.dumps({**embed("p-inf-meta"), "metadata": {"score": float("-inf")}}), "invalid_job"),
    ("p-deep", '{"id": "p-deep", "request": {"path": "/v1/embeddings", "json": ' + "[" * 5000 + "]" * 5000 + "}}",
     "invalid_job"),
    ("p-huge", '{"id": "p-huge", "request": {"path": "/v1/embeddings", "json": {"n": 1e400}}}', "invalid_job"),
]


async def _leader(client) -> dict:
    status = await client.status(timeout=2)
    return {"leader": status.get("leader"), "since": status.get("leader_since")}


async def test_payloads_that_cannot_go_on_the_wire_are_refused_at_every_door(tmp_path, nats_server):
    with upstream() as mock:
        kit = FleetKit(tmp_path, nats_server.url, mock.url, keys=fast_keys(),
                       overrides={"streams": {"ack_wait_s": 3}})
        raw = await nats.connect(nats_server.url)
        try:
            kit.dispatcher("d1")
            kit.worker("w1")
            js = raw.jetstream()
            async with await Client.connect(nats_server.url) as client, Tracker(nats_server.url) as tracker:
                await wait_workers(client, {"w1"})
                leader_before = await _leader(client)

                # the Client door: refused before anything is sent, naming the field and why
                with pytest.raises(JobInvalid, match="'Authorization:' is set by ratefleet"):
                    await client.submit(embed("c-1", headers={"Authorization:": "Bearer sk-caller-000000"}), "normal")
                with pytest.raises(JobInvalid, match=r"request\.headers: header 'X-Title' value contains '–' \(U\+2013\)"):
                    await client.submit(embed("c-2", headers={"X-Title": "Café – 日本語"}), "normal")
                with pytest.raises(JobInvalid, match=r"\$\.input contains a lone UTF-16 surrogate"):
                    await client.request(embed("c-3", json={"model": "e", "input": "\ud83d"}), "normal", timeout=5)
                with pytest.raises(JobInvalid, match=r"\$\.temperature is nan"):
                    await client.submit_many([chat(1), embed("c-4", json={"temperature": float("nan")})], "normal")

                # the raw door: each message ends on its first delivery, with a reply and a dead letter
                inboxes = {}
                for case_id, text, _ in RAW_CASES:
                    inboxes[case_id] = await raw.subscribe(raw.new_inbox(), max_msgs=1)
                    await js.publish("ratefleet.jobs.normal", text.encode(),
                                     headers={"Nats-Msg-Id": case_id, "Ratefleet-Reply-To": inboxes[case_id].subject})
                good = await client.submit_many([chat(i) for i in range(20)], "normal", batch="good")
                # the rpc door: answered `invalid` at once, nothing stored
                rpc_reply = await raw.request("ratefleet.rpc.normal", RAW_CASES[2][1].replace("p-surrogate", "r-1")
                                              .encode(), timeout=10)
                # obs-text (latin-1) is a valid field value: it is sent, and succeeds
                latin = await client.request(embed("c-latin", headers={"X-Title": "Café"}), "normal", timeout=20)

                assert_exactly_once(await tracker.wait_stored("good", good, timeout=30), good)
                ids = [c[0] for c in RAW_CASES]
                await until(lambda: tracker.seen(ids) == len(ids), 20, 0.1, "a result for every hostile payload")
                letters = {x["job_id"]: x for x in await tracker.dead_letters("normal")}
                problems = []
                for case_id, _, code in RAW_CASES:
                    result = await tracker.result(case_id)
                    got = (result.status, result.error.code, result.attempts) if result else None
                    if got != ("invalid", code, 0):  # ended at intake: no attempt
                        problems.append(f"{case_id}: {got}, want invalid/{code} with no attempt "
                                        f"({result and result.error and result.error.message})")
                    if tracker.publishes[case_id] != 1:
                        problems.append(f"{case_id}: {tracker.publishes[case_id]} result publishes")
                    if case_id not in letters or letters[case_id]["reason"]["code"] != code:
                        problems.append(f"{case_id}: dead letter {letters.get(case_id)}")
                    reply = await inboxes[case_id].next_msg(timeout=5)
                    if Result.from_json(reply.data).status != "invalid":
                        problems.append(f"{case_id}: reply {reply.data[:100]!r}")
                assert not problems, "\n".join(problems)
                title = (await tracker.result("p-title")).error.message
                assert "request.headers" in title and "U+2013" in title and "RFC 9110" in title, title
                assert "lone UTF-16 surrogate" in (await tracker.result("p-surrogate")).error.message
                assert "$.temperature is nan" in (await tracker.result("p-nan")).error.message
                assert letters["p-authcolon"]["payload"]["request"]["headers"]["Authorization:"] == "***"
                for letter in letters.values():  # dead letters are strict JSON, whatever the payload held
                    json.loads(json.dumps(letter), parse_constant=lambda c: pytest.fail(f"{c} in a dead letter"))

                answer = Result.from_json(rpc_reply.data)
                assert (answer.job_id, answer.status, answer.error.code) == ("r-1", "invalid", "invalid_job")
                assert latin.status == "succeeded", latin

                # no hostile payload reached the upstream, no key was switched off, the leader never stopped
                assert calls(mock, path=EMBED) == 1, f"{calls(mock, path=EMBED)} calls for 1 sendable embed job"
                status = await client.status()
                assert not any(k["disabled"] for k in status["keys"].values()), status["keys"]
                assert await _leader(client) == leader_before
                logs = kit.logs()
                for crash in ("leader session failed", "could not read a job message", "assignment failed"):
                    assert crash not in logs, crash
                assert await tracker.jobs_in_stream() == 0
        finally:
            await raw.close()
            kit.stop()


async def test_submit_checks_every_line_serialisation_included_before_sending_anything(tmp_path, nats_server):
    with upstream() as mock:
        kit = FleetKit(tmp_path, nats_server.url, mock.url, keys=fast_keys())
        config = load_config(kit.write_config())
        nc = await nats.connect(nats_server.url)
        try:
            await ensure_topology(nc.jetstream(), config)
        finally:
            await nc.close()
        lines = [json.dumps(chat(1)), '{"request": {"path": "/v1/chat/completions", "json": {"x": "\\ud83d"}}}',
                 json.dumps(chat(2)), '{"request": {"path": "/v1/x", "headers": {"X-Title": "Café – 日本語"}}}']
        path = tmp_path / "jobs.jsonl"
        path.write_text("\n".join(lines) + "\n")
        done = cli("submit", str(path), "--tier", "normal", "--nats", nats_server.url)
        assert done.returncode == 2, done.stdout + done.stderr
        assert "Traceback" not in done.stderr, done.stderr
        assert "line 2" in done.stderr and "surrogate" in done.stderr and "line 4" in done.stderr, done.stderr
        async with Tracker(nats_server.url) as tracker:
            assert await tracker.jobs_in_stream() == 0, "lines were sent before every line was checked"


async def test_a_worker_handed_an_unsendable_job_ends_it_invalid_without_a_call(tmp_path, nats_server):
    """Defence in depth: an assignment that slipped past the model (a dispatcher of another
    version or config) ends `invalid` on that one attempt, no call, a dead letter with
    last_error; before, the worker naked it and it burned every attempt blamed on a crash."""
    with upstream() as mock:
        kit = FleetKit(tmp_path, nats_server.url, mock.url, keys=fast_keys(),
                       overrides={"upstreams": {"mock": {"base_url": mock.url, "auth_header": "X-Custom-Auth"}}})
        config = load_config(kit.write_config())
        raw = await nats.connect(nats_server.url)
        try:
            js = raw.jetstream()
            await ensure_topology(js, config)
            kit.worker("w1")  # no dispatcher: this test plays the leader
            async with Tracker(nats_server.url) as tracker:
                await until(lambda: _heard_worker(raw), 20, 0.2, "worker heartbeat")
                jobs = {
                    # valid for the model, but the upstream's own auth header (intake would refuse it)
                    "a-authheader": ({"request": {"path": EMBED, "headers": {"x-custom-auth": "mine"}}},
                                     "invalid_request"),
                    # not valid for this model at all (e.g. handed over by an older dispatcher)
                    "a-title": ({"request": {"path": EMBED, "headers": {"X-Title": "Café – 日本語"}}}, "invalid_job"),
                }
                sub = await js.pull_subscribe_bind(tier_consumer("normal"), SUBJECTS.jobs_stream)
                for n, (job_id, (job, _)) in enumerate(jobs.items(), 1):
                    await js.publish("ratefleet.jobs.normal", json.dumps({"id": job_id}).encode(),
                                     headers={"Nats-Msg-Id": job_id})
                    msg = (await sub.fetch(1, timeout=5))[0]
                    assignment = Assignment(id=f"test.{n}", job={**job, "id": job_id}, job_id=job_id, tier="normal",
                                            upstream="mock", key_id="k1", pool="shared", ack=msg.reply, attempt=1,
                                            max_attempts=5, submitted_at=time.time(), queued_ms=0.0,
                                            seq=msg.metadata.sequence.stream)
                    await raw.publish(SUBJECTS.assign("w1"), assignment.model_dump_json().encode())
                await until(lambda: tracker.seen(list(jobs)) == len(jobs), 15, 0.1, "both results")
                await asyncio.sleep(4)  # a nak'd message would be redelivered to `sub` by now
                letters = {x["job_id"]: x for x in await tracker.dead_letters("normal")}
                for job_id, (_, code) in jobs.items():
                    result = await tracker.result(job_id)
                    assert (result.status, result.error.code, result.attempts) == ("invalid", code, 0), result
                    assert tracker.publishes[job_id] == 1
                    assert letters[job_id]["last_error"]["code"] == code, letters[job_id]
                assert "set by ratefleet" in (await tracker.result("a-authheader")).error.message
                assert "U+2013" in (await tracker.result("a-title")).error.message
                assert await tracker.jobs_in_stream() == 0, "the JOBS messages were not acked"
                assert mock.stats()["requests"] == 0
                assert "assignment failed" not in kit.logs(), "the worker crashed on the job instead of classifying it"
        finally:
            await raw.close()
            kit.stop()


async def _heard_worker(nc) -> bool:
    sub = await nc.subscribe(SUBJECTS.heartbeat)
    try:
        await sub.next_msg(timeout=1)
        return True
    except Exception:  # noqa: BLE001 - not yet
        return False
    finally:
        await sub.unsubscribe()


async def test_an_answer_json_cannot_store_as_is_is_kept_as_text_after_one_call(tmp_path, nats_server):
    """The upstream's side of "serialising": JSON text holding a lone surrogate escape or a
    number past a 64-bit float parses in Python but cannot be written back as JSON. The
    Result keeps the answer as text after exactly one call; before, storing the Result
    raised, and the job was called again until its attempts ran out."""
    from aiohttp import web

    answer = b'{"text": "\\ud83d", "score": 1e400}'
    seen: list[str] = []

    async def handler(request: web.Request) -> web.Response:
        seen.append(request.path)
        return web.Response(body=answer, content_type="application/json")

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", handler)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    url = f"http://127.0.0.1:{site._server.sockets[0].getsockname()[1]}"
    kit = FleetKit(tmp_path, nats_server.url, url, keys=fast_keys())
    try:
        kit.dispatcher("d1")
        kit.worker("w1")
        async with await Client.connect(nats_server.url) as client:
            await wait_workers(client, {"w1"})
            result = await client.request(chat(1, id="odd-answer"), "normal", timeout=30)
            await asyncio.sleep(2)  # time for a second call to show, had the job been retried
        assert (result.status, result.attempts) == ("succeeded", 1), result
        assert result.response.json_body is None and result.response.body == answer.decode()
        assert seen == ["/v1/chat/completions"], f"{len(seen)} upstream calls for one job"
    finally:
        kit.stop()
        await runner.cleanup()
