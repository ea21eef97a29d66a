"""Hostile input published straight to the JOBS stream (raw bytes, as any NATS client can):
each message ends in one `invalid` (or `expired`) Result with the right code, a reply when
asked for, a dead letter with the (redacted) payload, and no upstream call; the good jobs
queued behind them are all served. Plus the `ratefleet dlq` CLI on those letters, and the
headers a producer controls (Nats-Msg-Id, Ratefleet-Reply-To) used as weapons."""

from __future__ import annotations

import asyncio
import json

import nats
import pytest
from faultkit import (
    Tracker,
    assert_exactly_once,
    assert_only_host,
    chat,
    cli,
    fast_keys,
    figure,
    one_worker_fleet,
    until,
    upstream,
    wait_workers,
)
from fleetkit import FleetKit
from nats.js.errors import APIError, NoStreamResponseError

from ratefleet import Client
from ratefleet.schemas import Result
from ratefleet.schemas.errors import SubmitError

pytestmark = [pytest.mark.timeout(60), pytest.mark.anyio]

MAX_JOB = 4096
EVIL_SECRET = "sk-evil-SECRET-1234567890"


def _job(job_id: str | None = None, **request) -> dict:
    req = {"method": "POST", "path": "/v1/chat/completions", "json": {"model": "m", "messages": []}, **request}
    out = {"request": req, "batch": "hostile"}
    if job_id:
        out["id"] = job_id
    return out


def _raw(value) -> bytes:
    return value if isinstance(value, bytes) else json.dumps(value).encode()


# (id, payload, status, code, dead letter expected)
CASES = [
    ("h-nonjson", b"\xff\xfe this is { not json", "invalid", "invalid_job", True),
    ("h-array", b"[1, 2, 3]", "invalid", "invalid_job", True),
    ("h-schema", {"id": "h-schema", "batch": "hostile", "request": {"method": "FOO", "path": "/v1/x"}, "cost": -1},
     "invalid", "invalid_job", True),
    ("h-norequest", {"id": "h-norequest", "batch": "hostile"}, "invalid", "invalid_job", True),
    ("h-extra", {**_job("h-extra"), "evil": True}, "invalid", "invalid_job", True),
    ("h-upstream", {**_job("h-upstream"), "upstream": "nope"}, "invalid", "unknown_upstream", True),
    ("h-absurl", _job("h-absurl", path="http://evil.example/x"), "invalid", "forbidden_target", True),
    ("h-dslash", _job("h-dslash", path="//evil.example/x"), "invalid", "forbidden_target", True),
    ("h-dotdot", _job("h-dotdot", path="/v1/../../etc"), "invalid", "forbidden_target", True),
    ("h-encdot", _job("h-encdot", path="/v1/%2e%2e/x"), "invalid", "forbidden_target", True),
    ("h-userinfo", _job("h-userinfo", path="/user@evil.example/x"), "invalid", "forbidden_target", True),
    ("h-backslash", _job("h-backslash", path="/v1\\..\\..\\x"), "invalid", "forbidden_target", True),
    ("h-auth", _job("h-auth", headers={"Authorization": f"Bearer {EVIL_SECRET}"}), "invalid", "forbidden_target", True),
    ("h-apikey", _job("h-apikey", headers={"X-Api-Key": EVIL_SECRET}), "invalid", "forbidden_target", True),
    ("h-host", _job("h-host", headers={"Host": "evil.example"}), "invalid", "forbidden_target", True),
    ("h-crlf", _job("h-crlf", headers={"X-Note": "a\r\nHost: evil.example"}), "invalid", "invalid_job", True),
    # bigger than streams.max_job_bytes, smaller than what the stream refuses (max_job_bytes + 4096)
    ("h-big", _job("h-big", json={"model": "m", "messages": [{"role": "user", "content": "x" * (MAX_JOB + 1500)}]}),
     "invalid", "invalid_job", True),
    ("h-past", {**_job("h-past"), "deadline": "2001-01-01T00:00:00Z"}, "expired", "deadline_exceeded", False),
]


@pytest.mark.timeout(150)  # 19 hostile cases and five CLI runs: 60 s at load 15, all assertions passed
async def test_hostile_messages_end_invalid_and_good_jobs_behind_them_run(tmp_path, nats_server):
    n_good = 30
    with upstream() as mock:
        kit = FleetKit(tmp_path, nats_server.url, mock.url, keys=fast_keys(),
                       overrides={"streams": {"max_job_bytes": MAX_JOB}})
        raw = await nats.connect(nats_server.url)
        try:
            kit.dispatcher("d1")
            kit.worker("w1")
            kit.worker("w2")
            js = raw.jetstream()
            async with await Client.connect(nats_server.url) as client, Tracker(nats_server.url) as tracker:
                await wait_workers(client, {"w1", "w2"})
                inboxes = {}
                for case_id, payload, *_ in CASES:
                    inboxes[case_id] = await raw.subscribe(raw.new_inbox(), max_msgs=1)
                    await js.publish("ratefleet.jobs.normal", _raw(payload),
                                     headers={"Nats-Msg-Id": case_id, "Ratefleet-Reply-To": inboxes[case_id].subject})
                # no headers at all: the result is found under s<stream sequence>
                ack = await js.publish("ratefleet.jobs.normal", b"\x00\x01 binary junk")
                anonymous = f"s{ack.seq}"
                assert MAX_JOB < len(_raw(dict((c[0], c[1]) for c in CASES)["h-big"])) < MAX_JOB + 4096
                # too big even for the stream: refused at the door, the producer is told
                with pytest.raises(APIError):
                    await js.publish("ratefleet.jobs.normal", _raw(_job("h-huge", json={"x": "y" * (MAX_JOB + 6000)})),
                                     headers={"Nats-Msg-Id": "h-huge"})
                with pytest.raises(SubmitError):
                    await client.submit(_job("h-huge2", json={"x": "y" * (MAX_JOB + 6000)}), "normal")
                good = await client.submit_many([chat(i) for i in range(n_good)], "normal", batch="good")

                assert_exactly_once(await tracker.wait_stored("good", good, timeout=30), good)
                hostile_ids = [c[0] for c in CASES] + [anonymous]
                await until(lambda: tracker.seen(hostile_ids) == len(hostile_ids), 15, 0.1, "every hostile result")
                good_results = await tracker.results(good, "good")
                assert all(r.status == "succeeded" for r in good_results.values())

                problems = []
                await tracker.letters_of([c[0] for c in CASES if c[4]])  # written after the Results
                letters = {x["job_id"]: x for x in await tracker.dead_letters("normal")}
                for case_id, _payload, status, code, lettered in CASES:
                    result = await tracker.result(case_id)
                    if result is None:
                        problems.append(f"{case_id}: no result")
                        continue
                    if (result.status, result.error.code if result.error else None) != (status, code):
                        problems.append(f"{case_id}: {result.status}/{result.error and result.error.code}, "
                                        f"want {status}/{code} ({result.error and result.error.message})")
                    if tracker.publishes[case_id] < 1:
                        problems.append(f"{case_id}: never published")
                    try:
                        reply = await inboxes[case_id].next_msg(timeout=2)
                        answer = Result.from_json(reply.data)
                        if (answer.job_id, answer.status) != (case_id, status):
                            problems.append(f"{case_id}: reply {answer.job_id}/{answer.status}")
                    except Exception as exc:  # noqa: BLE001
                        problems.append(f"{case_id}: no reply ({type(exc).__name__})")
                    letter = letters.get(case_id)
                    if lettered:
                        if letter is None:
                            problems.append(f"{case_id}: no dead letter")
                        elif letter["reason"]["code"] != code or not (
                                {"raw", "raw_b64", "payload", "job"} & set(letter)):
                            problems.append(f"{case_id}: dead letter {letter}")
                anon = await tracker.result(anonymous)
                if anon is None or anon.status != "invalid" or anonymous not in letters:
                    problems.append(f"{anonymous} (no headers): result {anon}, lettered {anonymous in letters}")
                assert not problems, "\n".join(problems)

                # a dead letter keeps the payload, with auth-like header values masked
                auth_letter = letters["h-auth"]
                stored_payload = auth_letter.get("payload") or auth_letter.get("job")
                assert stored_payload["request"]["headers"]["Authorization"] == "***"
                assert (letters["h-apikey"].get("payload") or letters["h-apikey"]["job"])["request"]["headers"][
                    "X-Api-Key"] == "***"
                assert "raw" in letters["h-nonjson"] or "raw_b64" in letters["h-nonjson"]
                everything = json.dumps(list(letters.values())) + kit.logs()
                for case_id in hostile_ids:
                    r = await tracker.result(case_id)
                    everything += r.model_dump_json() if r else ""
                assert EVIL_SECRET not in everything, "a secret-looking header value leaked"

                # the upstream saw the good jobs only, on its own host
                stats = mock.stats()
                assert stats["requests"] == n_good, f"upstream called {stats['requests']} times for {n_good} good jobs"
                assert {row["path"] for row in mock.log()} == {"/v1/chat/completions"}
                assert_only_host(mock)
                figure("hostile input", hostile=len(hostile_ids), good=n_good, upstream_calls=stats["requests"],
                       dead_letters=len(letters))

                # the dlq CLI on those letters
                listed = cli("dlq", "list", "--json", "--limit", "500", "--nats", nats_server.url)
                assert listed.returncode == 0, listed.stderr
                rows = {json.loads(line)["job_id"]: json.loads(line) for line in listed.stdout.splitlines() if line}
                want = {c[0] for c in CASES if c[4]} | {anonymous}
                assert want <= set(rows), want - set(rows)
                assert rows["h-dotdot"]["reason"]["code"] == "forbidden_target"
                assert EVIL_SECRET not in listed.stdout
                table = cli("dlq", "list", "--nats", nats_server.url)
                assert table.returncode == 0 and "h-upstream" in table.stdout, table.stdout + table.stderr

                replay = cli("dlq", "replay", "--id", "h-upstream", "--nats", nats_server.url)
                assert replay.returncode == 0 and "replayed 1" in replay.stdout, replay.stdout + replay.stderr
                replayed = await until(lambda: _replayed(tracker, "hostile", "h-upstream"), 15, 0.2, "replayed result")
                assert replayed.status == "invalid" and replayed.error.code == "unknown_upstream"
                assert replayed.metadata.get("replay_of") == "h-upstream"
                not_replayable = cli("dlq", "replay", "--id", "h-nonjson", "--nats", nats_server.url)
                assert not_replayable.returncode == 1 and "replayed 0" in not_replayable.stdout  # said, not done
                assert "a letter without its job cannot be replayed" in not_replayable.stderr
                after = {x["job_id"] for x in await tracker.dead_letters()}
                assert "h-nonjson" in after and "h-upstream" not in after
                assert mock.stats()["requests"] == n_good
        finally:
            await raw.close()
            kit.stop()


async def _replayed(tracker: Tracker, batch: str, original: str):
    for job_id in await tracker.stored(batch):
        if job_id.startswith(original + "-r"):
            return await tracker.result(job_id, batch)
    return None


async def test_hostile_message_ids_cannot_loop_or_spoof_results(tmp_path, nats_server):
    """Nats-Msg-Id is the job id when the body has none, and it becomes a subject token of
    the result. An id that is not a token ([A-Za-z0-9_-]{1,128}) must still end in exactly one
    result (or an `invalid` one), never in retries forever or a result stored for another job."""
    cases = {"hid1": "evil.dot", "hid2": "evil id", "hid3": "x" * 200, "hid4": "evil>"}
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
                for batch, msg_id in cases.items():
                    job = chat(0, batch=batch)
                    await js.publish("ratefleet.jobs.normal", json.dumps(job).encode(), headers={"Nats-Msg-Id": msg_id})
                good = await client.submit_many([chat(i) for i in range(10)], "normal", batch="good")
                assert_exactly_once(await tracker.wait_stored("good", good, timeout=20), good)
                await asyncio.sleep(8)  # > 2x ack_wait: time for a loop of redeliveries to show
                # the tier still serves: good jobs sent now are done promptly
                late_at = asyncio.get_running_loop().time()
                late = await client.submit_many([chat(100 + i) for i in range(5)], "normal", batch="late")
                late_counts = await tracker.wait_stored("late", late, timeout=15)
                late_s = asyncio.get_running_loop().time() - late_at
                outcome = {}
                for batch, msg_id in cases.items():
                    counts = await tracker.stored(batch)
                    outcome[msg_id[:12]] = counts
                spoofed = await tracker.result("evil")
                total_calls = mock.stats()["requests"]
                figure("hostile Nats-Msg-Id", per_id_results=outcome, upstream_calls=total_calls,
                       spoofed_result_for_evil=spoofed is not None, later_good_jobs_done=len(late_counts),
                       later_good_jobs_s=late_s)
                assert len(late_counts) == len(late), \
                    f"only {len(late_counts)} of {len(late)} good jobs sent after the hostile ones finished in 15 s"
                assert spoofed is None, f"a hostile id stored a result for job 'evil': {spoofed}"
                for msg_id, counts in outcome.items():
                    assert len(counts) == 1 and sum(counts.values()) == 1, \
                        f"Nats-Msg-Id {msg_id!r}: results {counts} (want exactly one)"
                assert total_calls <= 15 + len(cases), f"{total_calls} upstream calls: hostile ids were retried"
        finally:
            await raw.close()
            kit.stop()


async def test_hostile_reply_subject_cannot_purge_queue_or_spoof_results(tmp_path, nats_server):
    """Ratefleet-Reply-To (and an rpc request's reply subject) is where the finisher publishes
    a Result. A producer must not be able to point it at the JetStream API, at the leader
    lease, or at another job's result subject."""
    n = 120
    with upstream() as mock:
        kit = FleetKit(tmp_path, nats_server.url, mock.url, keys=fast_keys())
        raw = await nats.connect(nats_server.url)
        try:
            kit.dispatcher("d1")
            js = raw.jetstream()
            async with await Client.connect(nats_server.url) as client, Tracker(nats_server.url) as tracker:
                await until(lambda: _status_leader(client), 20, 0.2, "a leader")
                # no workers yet: these jobs wait in RATEFLEET_JOBS
                ids = await client.submit_many([chat(i) for i in range(n)], "normal", batch="queued")
                hostile = {
                    "evil-purge": "$JS.API.STREAM.PURGE.RATEFLEET_JOBS",
                    "evil-lease": "$KV.ratefleet_leader.dispatcher",
                    "evil-spoof": "ratefleet.results.victim.v-1",
                }
                for job_id, reply_to in hostile.items():
                    await js.publish("ratefleet.jobs.vip", b"not json",
                                     headers={"Nats-Msg-Id": job_id, "Ratefleet-Reply-To": reply_to})
                # the same through request/reply: the caller's reply subject
                await raw.publish("ratefleet.rpc.vip", b"[]", reply="ratefleet.results.victim.v-2")
                await until(lambda: tracker.seen(list(hostile)) == len(hostile), 10, 0.1, "hostile results")
                await asyncio.sleep(1.0)
                queued_now = await tracker.jobs_in_stream()
                kit.worker("w1")
                kit.worker("w2")
                victims = [await client.submit(chat(1, id="v-1"), "normal", batch="victim"),
                           await client.submit(chat(2, id="v-2"), "normal", batch="victim")]
                counts = await tracker.wait_stored("queued", ids, timeout=30)
                await tracker.wait_stored("victim", victims, timeout=30)  # sent after the queue: may still run
                victim_results = await tracker.results(victims, "victim")
                step_downs = kit.logs().count("leadership ended")
                figure("hostile reply subject", queued=n, jobs_in_stream_after_hostile=queued_now,
                       results=len(counts), leader_step_downs=step_downs,
                       victims={k: (v.job_id, v.status) for k, v in victim_results.items()})
                problems = []
                if queued_now < n:
                    problems.append(f"the queue lost {n - queued_now} jobs to a reply subject on the JetStream API")
                if step_downs:
                    problems.append(f"the leader stepped down {step_downs}x: a Result was written into its lease")
                for victim in victims:
                    result = victim_results.get(victim)
                    if result is None or result.job_id != victim or result.status != "succeeded":
                        problems.append(f"the stored result of {victim} is {result and (result.job_id, result.status)}")
                assert not problems, "\n".join(problems)
                assert_exactly_once(counts, ids)
                assert_only_host(mock)
        finally:
            await raw.close()
            kit.stop()


async def _status_leader(client) -> bool:
    status = await client.status(timeout=1)
    return bool(status.get("leader"))


async def test_job_on_an_unknown_tier_is_refused_or_answered(tmp_path, nats_server):
    """`ratefleet.jobs.<tier>` for a tier that is not configured: the producer must learn it
    (an error at publish, or an `invalid` result with unknown_tier), not have the job sit in
    RATEFLEET_JOBS forever with no consumer."""
    async with one_worker_fleet(tmp_path, nats_server.url) as (mock, raw, client), Tracker(nats_server.url) as tracker:
        outcomes = {}
        try:
            await client.submit(chat(1, id="u-client"), "platinum")
            outcomes["client"] = "accepted"
        except SubmitError as exc:
            outcomes["client"] = f"refused: {exc}"
        try:
            await raw.jetstream().publish("ratefleet.jobs.platinum", json.dumps(chat(2, id="u-raw")).encode(),
                                          headers={"Nats-Msg-Id": "u-raw"}, timeout=3)
            outcomes["raw"] = "accepted"
        except NoStreamResponseError as exc:  # JetStream's refusal: no stream takes the subject
            outcomes["raw"] = f"refused: {type(exc).__name__}"
        # a timeout or a lost connection is no refusal: it fails the test as raised
        for name, job_id in (("client", "u-client"), ("raw", "u-raw")):
            if outcomes[name] == "accepted":
                result = await until(lambda job_id=job_id: tracker.result(job_id), 15, 0.2, f"a result for {job_id}")
                outcomes[name] = f"accepted, result: {result and (result.status, result.error and result.error.code)}"
        stuck = await tracker.jobs_in_stream()
        figure("unknown tier", outcomes=outcomes, jobs_stuck_in_stream=stuck)
        for name, outcome in outcomes.items():
            assert outcome.startswith("refused") or "unknown_tier" in outcome, \
                f"{name} publish to an unknown tier: {outcome} (stuck in RATEFLEET_JOBS: {stuck})"
        assert "unknown_tier" in outcomes["client"] or "unknown tier 'platinum'" in outcomes["client"]
        assert mock.stats()["requests"] == 0
