"""The OpenAI Batch API served by the gateway, driven by the official `openai` SDK's own batch
workflow (files.create -> batches.create -> batches.retrieve -> files.content), over real
processes: nats-server, the mock upstream, a dispatcher, a worker, `ratefleet gateway`."""

from __future__ import annotations

import io
import json
import signal
import time

import anyio
import openai
import pytest
from fleetkit import FleetKit, collect, mock_keys, wait_for_leader
from gatewaykit import CALLER_KEYS, caller_env, callers, free_port, start_gateway

from ratefleet import Client
from ratefleet.batchfile import line_job_id
from ratefleet.mock import MockSettings, running_mock

pytestmark = [pytest.mark.timeout(180), pytest.mark.anyio]


def chat_line(custom_id: str, text: str, **extra) -> dict:
    return {"custom_id": custom_id, "method": "POST", "url": "/v1/chat/completions",
            "body": {"model": "mock", "messages": [{"role": "user", "content": text}], **extra}}


def jsonl(lines: list) -> bytes:
    return "".join((line if isinstance(line, str) else json.dumps(line)) + "\n" for line in lines).encode()


def sdk(kit, caller: str = "alice") -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=kit.gateway_url + "/v1", api_key=CALLER_KEYS[caller], max_retries=0, timeout=30)


async def wait_status(ai: openai.AsyncOpenAI, batch_id: str, wanted: set[str], timeout: float = 90.0):
    deadline = time.monotonic() + timeout
    seen = []
    while time.monotonic() < deadline:
        batch = await ai.batches.retrieve(batch_id)
        seen.append(batch.status)
        if batch.status in wanted:
            return batch, seen
        await anyio.sleep(0.3)
    raise AssertionError(f"batch {batch_id} never reached {wanted}; statuses seen: {seen[-5:]}")


async def running_batch(ai: openai.AsyncOpenAI, lines: list) -> tuple:
    """Upload `lines`, create a chat-completions batch of them and wait until it is in progress:
    (the uploaded file, the batch as created)."""
    uploaded = await ai.files.create(file=("in.jsonl", io.BytesIO(jsonl(lines))), purpose="batch")
    batch = await ai.batches.create(input_file_id=uploaded.id, endpoint="/v1/chat/completions",
                                    completion_window="24h")
    await wait_status(ai, batch.id, {"in_progress"})
    return uploaded, batch


@pytest.fixture
def upstream():
    settings = MockSettings(keys=mock_keys(rps=200, burst=20), accept_unknown=False, tokens_per_call=100)
    with running_mock(settings) as mock:
        yield mock


def fleet(tmp_path, nats_server, upstream, monkeypatch, keys=None, window: int = 64, start: bool = True,
          streams: dict | None = None) -> FleetKit:
    caller_env(monkeypatch)
    kit = FleetKit(tmp_path, nats_server.url, upstream.url,
                   overrides={"callers": callers(), "dispatcher": {"window": window}, "streams": streams or {}})
    if keys is not None:
        kit.keys = keys
    kit.dispatcher("d1")
    kit.worker("w1")
    kit.gateway_port = free_port()  # type: ignore[attr-defined]
    if start:
        kit.gateway_url = start_gateway(kit)  # type: ignore[attr-defined]
        kit.gateway_port = int(kit.gateway_url.rsplit(":", 1)[1])  # type: ignore[attr-defined]
    return kit


@pytest.fixture
def gateway(tmp_path, nats_server, upstream, monkeypatch):
    kit = fleet(tmp_path, nats_server, upstream, monkeypatch)
    try:
        yield kit
    finally:
        kit.stop()


async def test_sdk_batch_workflow_output_and_error_files(gateway, nats_server, upstream):
    lines = [chat_line("first", "one", mock={"sleep_ms": 800}),  # answered last, written first
             chat_line("refused", "two", mock={"status": 400}),   # the provider's 400: the error file
             chat_line("third", "three")]
    async with await Client.connect(nats_server.url) as client, sdk(gateway) as ai:
        await wait_for_leader(client)
        uploaded = await ai.files.create(file=("input.jsonl", io.BytesIO(jsonl(lines))), purpose="batch")
        assert uploaded.purpose == "batch" and uploaded.bytes == len(jsonl(lines))
        assert (await ai.files.retrieve(uploaded.id)).filename == "input.jsonl"
        assert (await ai.files.content(uploaded.id)).content == jsonl(lines)
        batch = await ai.batches.create(input_file_id=uploaded.id, endpoint="/v1/chat/completions",
                                        completion_window="24h", metadata={"run": "nightly"})
        assert batch.status == "validating" and batch.metadata == {"run": "nightly"}
        done, seen = await wait_status(ai, batch.id, {"completed", "failed"})
        assert done.status == "completed", done
        assert done.request_counts.total == 3
        assert (done.request_counts.completed, done.request_counts.failed) == (2, 1)
        assert done.completed_at and done.in_progress_at and done.finalizing_at
        output = [json.loads(line) for line in (await ai.files.content(done.output_file_id)).text.splitlines()]
        errors = [json.loads(line) for line in (await ai.files.content(done.error_file_id)).text.splitlines()]
        listed = await ai.batches.list()
        with pytest.raises(openai.ConflictError):  # a finished batch cannot be cancelled
            await ai.batches.cancel(batch.id)
        stored = await client.stored_result(line_job_id(batch.id, 3, json.dumps(lines[2])))
    assert [o["custom_id"] for o in output] == ["first", "third"]  # input order
    assert output[0]["response"]["status_code"] == 200 and output[0]["error"] is None
    assert output[0]["response"]["body"]["choices"][0]["message"]["content"] == "echo: one"
    assert output[1]["id"].startswith("batch_req_" + batch.id)
    assert errors[0]["custom_id"] == "refused" and errors[0]["response"]["status_code"] == 400
    assert errors[0]["response"]["body"]["error"]["type"] == "invalid_request_error"
    assert batch.id in [b.id for b in listed.data]
    # each line is a job of the caller's batch tier (by default the lowest: alice's own is vip),
    # with the deterministic id `ratefleet submit` gives
    assert stored is not None and stored.tier == "guest" and stored.batch == batch.id
    assert stored.metadata == {"custom_id": "third", "caller": "alice"}
    assert sum(key["calls"] for key in upstream.stats()["keys"].values()) == 3


async def test_malformed_input_fails_naming_the_line_and_sends_nothing(gateway, upstream):
    lines = [chat_line("a", "ok"), "{not json", chat_line("c", "x") | {"url": "/v1/embeddings"}, chat_line("a", "dup")]
    async with sdk(gateway) as ai:
        uploaded = await ai.files.create(file=("bad.jsonl", io.BytesIO(jsonl(lines))), purpose="batch")
        batch = await ai.batches.create(input_file_id=uploaded.id, endpoint="/v1/chat/completions",
                                        completion_window="24h")
        failed, _ = await wait_status(ai, batch.id, {"failed", "completed", "in_progress"})
    assert failed.status == "failed" and failed.failed_at
    by_line = {error.line: error for error in failed.errors.data}
    assert sorted(by_line) == [2, 3, 4]
    assert by_line[2].code == "invalid_json_line" and "line 2" in by_line[2].message
    assert by_line[3].param == "url" and by_line[4].code == "duplicate_custom_id"
    assert failed.output_file_id is None and failed.request_counts.total == 0
    assert sum(key["calls"] for key in upstream.stats()["keys"].values()) == 0


async def test_unknown_ids_and_bad_requests_are_openai_errors(gateway):
    async with sdk(gateway) as ai, sdk(gateway, "bob") as other:
        with pytest.raises(openai.NotFoundError) as missing:
            await ai.files.content("file-doesnotexist")
        assert missing.value.status_code == 404 and "No such File object" in missing.value.message
        with pytest.raises(openai.NotFoundError):
            await ai.batches.create(input_file_id="file-doesnotexist", endpoint="/v1/chat/completions",
                                    completion_window="24h")
        with pytest.raises(openai.NotFoundError):
            await ai.batches.retrieve("batch_doesnotexist")
        uploaded = await ai.files.create(file=("in.jsonl", io.BytesIO(jsonl([chat_line("a", "b")]))), purpose="batch")
        with pytest.raises(openai.NotFoundError):  # another caller's file is not found
            await other.files.retrieve(uploaded.id)
        with pytest.raises(openai.BadRequestError) as wrong:
            await ai.files.create(file=("in.jsonl", io.BytesIO(b"{}\n")), purpose="fine-tune")
        assert wrong.value.body["param"] == "purpose"
        with pytest.raises(openai.BadRequestError):
            await ai.batches.create(input_file_id=uploaded.id, endpoint="/v1/chat/completions",
                                    completion_window="48h")
        deleted = await ai.files.delete(uploaded.id)
        assert deleted.deleted
        with pytest.raises(openai.NotFoundError):
            await ai.files.retrieve(uploaded.id)
    bad_key = openai.AsyncOpenAI(base_url=gateway.gateway_url + "/v1", api_key="rk-nobody", max_retries=0)
    async with bad_key:
        with pytest.raises(openai.AuthenticationError):
            await bad_key.files.list()


async def test_files_and_batches_list_like_openai(gateway):
    """files.list takes limit, order and after (it returned every file, newest first, whatever
    was asked); both lists keep creation order within one second (batches made in one second came
    back in the order of their random ids); an `after` that is no id of the list is a 400, not an
    empty page that reads as the end; a File says when the store drops it (`expires_at`)."""
    async with sdk(gateway) as ai:
        made = [await ai.files.create(file=(f"in{i}.jsonl", io.BytesIO(jsonl([chat_line("a", str(i))]))),
                                      purpose="batch") for i in range(4)]
        first = await ai.files.list(limit=2, order="asc")
        second = await ai.files.list(limit=2, order="asc", after=first.data[-1].id)
        newest = await ai.files.list(limit=3)
        batches = [await ai.batches.create(input_file_id=f.id, endpoint="/v1/chat/completions",
                                           completion_window="24h") for f in made[:3]]
        listed = (await ai.batches.list(limit=3)).data
        with pytest.raises(openai.BadRequestError) as unknown:
            await ai.files.list(after="file-doesnotexist")
        with pytest.raises(openai.BadRequestError):
            await ai.batches.list(after="batch_doesnotexist")
        with pytest.raises(openai.BadRequestError):
            await ai.files.list(order="sideways")
    ids = [f.id for f in made]
    assert [f.id for f in first.data] == ids[:2] and first.has_more
    assert [f.id for f in second.data] == ids[2:] and not second.has_more
    assert [f.id for f in newest.data] == ids[::-1][:3] and newest.has_more
    assert [b.id for b in listed] == [b.id for b in batches][::-1]
    assert unknown.value.body["param"] == "after"
    assert made[0].expires_at == made[0].created_at + 86400  # streams.results_max_age_s by default


async def test_the_sdks_list_and_delete_loop_deletes_every_file(gateway):
    """`async for f in files.list(limit=10): delete(f)`: each next page starts after a file that is
    gone by then; its id still says where it stood (a reviewer's finding: the loop stopped after
    10 of 25 with a 400 on the deleted cursor)."""
    async with sdk(gateway) as ai:
        for i in range(25):
            await ai.files.create(file=(f"in{i}.jsonl", io.BytesIO(jsonl([chat_line("a", str(i))]))), purpose="batch")
        deleted = 0
        async for item in ai.files.list(limit=10):
            await ai.files.delete(item.id)
            deleted += 1
        left = (await ai.files.list()).data
    assert deleted == 25 and left == []


@pytest.fixture
def slow_gateway(tmp_path, nats_server, upstream, monkeypatch):
    """The fleet sends 2 calls a second (one key, rps 2), so a batch stays in progress a while;
    the dispatcher takes 4 jobs of a tier at a time (dispatcher.window)."""
    kit = fleet(tmp_path, nats_server, upstream, monkeypatch, keys=[{"id": "k1", "rps": 2, "burst": 1}], window=4)
    try:
        yield kit
    finally:
        kit.stop()


async def test_cancel_stops_the_queued_lines(slow_gateway, nats_server, upstream):
    lines = [chat_line(f"r{i}", f"n{i}") for i in range(30)]
    async with await Client.connect(nats_server.url) as client, sdk(slow_gateway) as ai:
        await wait_for_leader(client)
        uploaded = await ai.files.create(file=("in.jsonl", io.BytesIO(jsonl(lines))), purpose="batch")
        batch = await ai.batches.create(input_file_id=uploaded.id, endpoint="/v1/chat/completions",
                                        completion_window="24h")
        running, _ = await wait_status(ai, batch.id, {"in_progress"})
        # its input file cannot go while it runs: a gateway restart would end the paid batch `failed`
        with pytest.raises(openai.ConflictError) as in_use:
            await ai.files.delete(uploaded.id)
        assert in_use.value.body["code"] == "file_in_use" and batch.id in in_use.value.body["message"]
        deadline = time.monotonic() + 30
        while (await ai.batches.retrieve(batch.id)).request_counts.completed < 2 and time.monotonic() < deadline:
            await anyio.sleep(0.2)
        cancelling = await ai.batches.cancel(batch.id)
        assert cancelling.status in {"cancelling", "cancelled"}
        cancelled, _ = await wait_status(ai, batch.id, {"cancelled", "completed"})
        calls_at_end = sum(key["calls"] for key in upstream.stats()["keys"].values())
        await anyio.sleep(3)  # nothing of the batch runs afterwards
        calls_later = sum(key["calls"] for key in upstream.stats()["keys"].values())
        output = (await ai.files.content(cancelled.output_file_id)).text.splitlines()
        again = await ai.batches.cancel(batch.id)  # a repeated cancel changes nothing
        assert (await ai.files.delete(uploaded.id)).deleted  # once the batch has ended, it can go
    assert again.status == "cancelled" and again.request_counts == cancelled.request_counts
    assert running.request_counts.total == 30
    assert cancelled.status == "cancelled" and cancelled.cancelled_at and cancelled.cancelling_at
    assert 2 <= cancelled.request_counts.completed < 20
    assert len(output) == cancelled.request_counts.completed
    assert calls_later == calls_at_end < 20


async def test_a_callers_batch_does_not_hold_back_its_online_requests(slow_gateway, nats_server):
    """A new user's finding: a caller's batch lines were queued on the caller's own tier, in
    order, so its online requests waited behind the whole batch (504 after 20 s, three times in a
    row, while 1,500 lines ran). They now run on the lowest tier (`callers.<name>.batch_tier`)."""
    lines = [chat_line(f"r{i}", f"n{i}") for i in range(30)]  # 15 s of calls at 2 a second
    async with await Client.connect(nats_server.url) as client, sdk(slow_gateway) as ai:
        await wait_for_leader(client)
        _, batch = await running_batch(ai, lines)
        deadline = time.monotonic() + 30
        while (await ai.batches.retrieve(batch.id)).request_counts.completed < 2 and time.monotonic() < deadline:
            await anyio.sleep(0.2)
        took = []
        for _ in range(3):
            started = time.monotonic()
            answer = await ai.chat.completions.create(model="mock", messages=[{"role": "user", "content": "now"}])
            took.append(time.monotonic() - started)
        progress = await ai.batches.retrieve(batch.id)
        await ai.batches.cancel(batch.id)
        first = await client.stored_result(line_job_id(batch.id, 1, json.dumps(lines[0])))
    assert answer.choices[0].message.content == "echo: now"
    assert max(took) < 4, took  # behind the batch's queued lines: 12 s and more
    assert progress.request_counts.completed < 25  # the batch was still running meanwhile
    assert first is not None and first.tier == "guest"


async def test_cancel_ends_the_jobs_the_leader_holds(tmp_path, nats_server, upstream, monkeypatch):
    """The dispatcher holds up to `dispatcher.window` jobs of a tier (here 32 of 40) before it
    hands them out; a cancel ends those too (the fleet's cancel marker), so after it only the
    calls already under way run, not the window's worth (30 more calls at 2/s before)."""
    kit = fleet(tmp_path, nats_server, upstream, monkeypatch, keys=[{"id": "k1", "rps": 2, "burst": 1}], window=32)
    lines = [chat_line(f"r{i}", f"n{i}") for i in range(40)]

    def calls() -> int:
        return sum(key["calls"] for key in upstream.stats()["keys"].values())

    try:
        async with await Client.connect(nats_server.url) as client, sdk(kit) as ai:
            await wait_for_leader(client)
            uploaded = await ai.files.create(file=("in.jsonl", io.BytesIO(jsonl(lines))), purpose="batch")
            batch = await ai.batches.create(input_file_id=uploaded.id, endpoint="/v1/chat/completions",
                                            completion_window="24h")
            deadline = time.monotonic() + 30
            while (await ai.batches.retrieve(batch.id)).request_counts.completed < 2 and time.monotonic() < deadline:
                await anyio.sleep(0.2)
            await ai.batches.cancel(batch.id)
            at_cancel = calls()
            # the route sets the fleet's marker itself: a gateway killed right after the cancel
            # left the jobs called until another gateway took the batch over (60 more calls)
            from ratefleet.runtime.cancels import is_cancelled
            assert await is_cancelled(client.js, client.subjects, batch.id)
            cancelled, _ = await wait_status(ai, batch.id, {"cancelled", "completed"}, timeout=60)
            await anyio.sleep(2)
            after = calls() - at_cancel
            output = [json.loads(line) for line in (await ai.files.content(cancelled.output_file_id)).text.splitlines()]
            errors = [json.loads(line) for line in (await ai.files.content(cancelled.error_file_id)).text.splitlines()]
            results = list((await collect(client, batch.id, 40, timeout=5)).values())
    finally:
        kit.stop()
    assert cancelled.status == "cancelled"
    assert after <= 8, f"{after} calls after the cancel"
    assert len(output) == cancelled.request_counts.completed == calls()
    # every line never sent (ended uncalled by the leader, or deleted from the queue) is an error
    # line with OpenAI's code, so the two files hold every line once, in input order
    assert len(errors) == cancelled.request_counts.failed == 40 - len(output)
    assert {e["error"]["code"] for e in errors} == {"batch_cancelled"} and {e["response"] for e in errors} == {None}
    assert sorted(int(line["custom_id"][1:]) for line in output + errors) == list(range(40))
    assert [int(e["custom_id"][1:]) for e in errors] == sorted(int(e["custom_id"][1:]) for e in errors)
    ended = [r for r in results if r.error is not None and r.error.code == "cancelled"]
    assert len(ended) >= 20, [r.status for r in results]


async def test_batch_survives_a_gateway_restart(slow_gateway, nats_server, upstream):
    lines = [chat_line(f"r{i}", f"n{i}") for i in range(24)]
    kit = slow_gateway
    async with await Client.connect(nats_server.url) as client, sdk(kit) as ai:
        await wait_for_leader(client)
        _, batch = await running_batch(ai, lines)
        await anyio.sleep(2)
        at_kill = await ai.batches.retrieve(batch.id)
    gateway = next(p for p in kit.processes if p.name == "gateway")
    gateway.send_signal(signal.SIGKILL)  # a crash: nothing is finished on the way out
    gateway.wait(10)
    killed_at = time.time()
    start_gateway(kit, kit.gateway_port)
    async with sdk(kit) as ai:
        done, _ = await wait_status(ai, batch.id, {"completed", "failed", "cancelled"}, timeout=120)
        output = [json.loads(line) for line in (await ai.files.content(done.output_file_id)).text.splitlines()]
    assert at_kill.status == "in_progress" and at_kill.request_counts.completed < 24
    assert done.status == "completed" and done.completed_at >= int(killed_at)  # finished by the new gateway
    assert done.request_counts.completed == 24
    assert [o["custom_id"] for o in output] == [f"r{i}" for i in range(24)]
    assert sum(key["calls"] for key in upstream.stats()["keys"].values()) == 24  # no line paid twice


async def test_a_batch_cut_short_while_submitting_is_submitted_by_the_next_gateway(
        tmp_path, nats_server, upstream, monkeypatch):
    """The record says in_progress, not all submitted (the gateway died mid-submit): the next
    gateway sends the lines that have no Result yet, and none twice, also past JetStream's dedup
    window (1 s here), which alone would let a stored line be sent and paid again."""
    kit = fleet(tmp_path, nats_server, upstream, monkeypatch, start=False, streams={"duplicate_window_s": 1.0})
    lines = [chat_line(f"r{i}", f"n{i}") for i in range(10)]
    try:
        async with await Client.connect(nats_server.url) as client:
            await wait_for_leader(client)
            record = await cut_short_batch(client, tmp_path, lines, sent=4)
            await anyio.sleep(1.5)  # past the dedup window
            kit.gateway_url = start_gateway(kit, kit.gateway_port)  # type: ignore[attr-defined]
            async with sdk(kit) as ai:
                done, _ = await wait_status(ai, record["id"], {"completed", "failed"}, timeout=120)
                output = [json.loads(line) for line in (await ai.files.content(done.output_file_id)).text.splitlines()]
    finally:
        kit.stop()
    assert done.status == "completed" and done.request_counts.completed == 10
    assert [o["custom_id"] for o in output] == [f"r{i}" for i in range(10)]
    assert sum(key["calls"] for key in upstream.stats()["keys"].values()) == 10


async def test_a_batch_past_its_completion_window_expires_with_what_was_answered(
        tmp_path, nats_server, upstream, monkeypatch):
    """A gateway that finds an in-progress batch past `expires_at` sends no more of it: the
    batch is `expired`, its output file holds the lines answered in time."""
    kit = fleet(tmp_path, nats_server, upstream, monkeypatch, start=False)
    lines = [chat_line(f"r{i}", f"n{i}") for i in range(8)]
    try:
        async with await Client.connect(nats_server.url) as client:
            await wait_for_leader(client)
            record = await cut_short_batch(client, tmp_path, lines, sent=3, expires_at=int(time.time()) - 1)
            kit.gateway_url = start_gateway(kit, kit.gateway_port)  # type: ignore[attr-defined]
            async with sdk(kit) as ai:
                done, _ = await wait_status(ai, record["id"], {"completed", "expired", "failed"}, timeout=60)
                output = [json.loads(line) for line in (await ai.files.content(done.output_file_id)).text.splitlines()]
                errors = [json.loads(line) for line in (await ai.files.content(done.error_file_id)).text.splitlines()]
    finally:
        kit.stop()
    assert done.status == "expired" and done.expired_at
    assert (done.request_counts.total, done.request_counts.completed, done.request_counts.failed) == (8, 3, 5)
    assert [o["custom_id"] for o in output] == ["r0", "r1", "r2"]
    # the lines never sent are in the error file, as OpenAI writes expired requests
    assert [e["custom_id"] for e in errors] == ["r3", "r4", "r5", "r6", "r7"]
    assert errors[0]["error"] == {"code": "batch_expired", "message": "This request could not be executed before "
                                  "the completion window expired."} and errors[0]["response"] is None
    assert sum(key["calls"] for key in upstream.stats()["keys"].values()) == 3


async def cut_short_batch(client: Client, tmp_path, lines: list, sent: int, expires_at: int | None = None) -> dict:
    """A batch as a gateway leaves it when killed after storing `sent` of its jobs (answered)."""
    from ratefleet.gateway.batch_book import PRIVATE, BatchBook, new_batch, set_status
    from ratefleet.gateway.batch_lines import batch_jobs
    from ratefleet.gateway.callers import Caller
    from ratefleet.gateway.files import FileStore

    files = FileStore(client.js, client.subjects, ttl_s=3600)
    meta = await files.put("alice", "in.jsonl", "batch", jsonl(lines), len(jsonl(lines)))
    record = new_batch(caller="alice", tier="vip", upstream=None, input_file_id=meta["id"],
                       endpoint="/v1/chat/completions", completion_window="24h", metadata=None, now=time.time())
    path = tmp_path / "input.jsonl"
    path.write_bytes(jsonl(lines))
    alice = Caller("alice", "vip", None, None, 60.0, None, None, None)
    jobs = [job for _, job in batch_jobs(path, record["id"], "/v1/chat/completions", alice)][:sent]
    seqs = [stored.seq async for stored in client.submit_stream(jobs, "vip")]
    await collect(client, record["id"], sent)
    record = set_status(record, "in_progress")
    record["request_counts"]["total"] = len(lines)
    record[PRIVATE].update(first_seq=min(seqs), last_seq=max(seqs), submitted=False)
    if expires_at is not None:
        record["expires_at"] = expires_at
    await BatchBook(client.js, client.subjects, ttl_s=3600).create(record)
    return record
