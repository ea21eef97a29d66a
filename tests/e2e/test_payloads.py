"""Answers of any size and content type, over a real nats-server, real dispatcher and worker
processes and a real HTTP upstream that counts its calls: one call per job whatever the
answer, the whole body back byte-exact through results(), stored_result(), request() and a
raw rpc request; a body past max_response_bytes ends `failed`/`response_too_large`.

Also: a Result the results stream refuses (error 10077 without a Result for the job) is not
taken for stored; the job stays un-acked until the Result really is stored.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import random
from collections import Counter

import nats
import pytest
from aiohttp import web
from faultkit import cli, until, wait_workers
from fleetkit import SECRETS, FleetKit, collect

from ratefleet import Client
from ratefleet.runtime.bodies import inline_limit
from ratefleet.runtime.finish import Finisher
from ratefleet.runtime.store import read_result, store_result
from ratefleet.runtime.streams import ensure_topology, tier_consumer
from ratefleet.schemas import Result, Subjects
from ratefleet.schemas.config import parse_config
from ratefleet.schemas.errors import BodyUnavailable, ResultNotStored

pytestmark = [pytest.mark.timeout(120), pytest.mark.anyio]
SUBJECTS = Subjects()
_rng = random.Random(7)
EMBEDDINGS = {"object": "list", "model": "e", "usage": {"total_tokens": 300},
              "data": [{"object": "embedding", "index": i, "embedding": [_rng.uniform(-1, 1) for _ in range(1536)]}
                       for i in range(60)]}
EMBEDDINGS_RAW = json.dumps(EMBEDDINGS).encode()  # about 2.2 MB
TEXT = "é" * 1_100_000  # 2.2 MB of UTF-8, 1.1 M characters
AUDIO = bytes(_rng.randrange(256) for _ in range(1024))
PNG = b"\x89PNG\r\n\x1a\n" + bytes(_rng.randrange(256) for _ in range(1016))
BIG = AUDIO * (24 << 10)  # 24 MiB of binary
CAP = 32 << 20  # workers.max_response_bytes in these tests


class Upstream:
    """A real HTTP server (aiohttp) answering by the first path segment; counts calls per path."""

    def __init__(self) -> None:
        self.calls: Counter[str] = Counter()
        self.url = ""
        self._runner: web.AppRunner | None = None

    async def __aenter__(self) -> Upstream:
        app = web.Application()
        app.router.add_route("*", "/{kind}/{name}", self.handle)
        self._runner = web.AppRunner(app)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        self.url = "http://127.0.0.1:%d" % site._server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self._runner.cleanup()

    async def handle(self, request: web.Request) -> web.StreamResponse:
        self.calls[request.path] += 1
        kind = request.match_info["kind"]
        if kind == "embeddings":
            return web.Response(body=EMBEDDINGS_RAW, content_type="application/json")
        if kind == "text":
            return web.Response(body=TEXT.encode(), headers={"content-type": "text/plain; charset=utf-8"})
        if kind == "audio":
            return web.Response(body=AUDIO, content_type="audio/mpeg")
        if kind == "big":
            return web.Response(body=BIG, content_type="application/octet-stream")
        if kind == "png":
            return web.Response(body=PNG, content_type="image/png")
        if kind == "echo":
            return web.Response(text=f"you sent {request.headers['authorization']}")
        if kind == "fail":
            return web.Response(text="overloaded " * 200_000, status=500)
        return await self._endless(request)

    @staticmethod
    async def _endless(request: web.Request) -> web.StreamResponse:
        """3 x CAP of JSON-typed bytes, chunked (no Content-Length): only the stream cap stops it."""
        response = web.StreamResponse(headers={"content-type": "application/json"})
        await response.prepare(request)
        try:
            for _ in range(3 * CAP // 65536):
                await response.write(b"7" * 65536)
        except (ConnectionError, RuntimeError):
            pass  # the worker stopped reading at its cap
        return response


def job(path: str, **extra) -> dict:
    return {"request": {"method": "POST", "path": path, "json": {"input": "x"}}, **extra}


def fleet(tmp_path, nats_url: str, upstream_url: str) -> FleetKit:
    kit = FleetKit(tmp_path, nats_url, upstream_url, keys=[{"id": "k1", "rps": 100, "burst": 20}],
                   overrides={"workers": {"max_response_bytes": CAP}})
    kit.dispatcher("d1")
    kit.worker("w1")
    return kit


async def test_answers_of_any_size_and_type_come_back_whole_after_one_call(tmp_path, nats_server):
    async with Upstream() as up:
        kit = fleet(tmp_path, nats_server.url, up.url)
        try:
            async with await Client.connect(nats_server.url) as client:
                await wait_workers(client, {"w1"})
                paths = {"emb": "/embeddings/a", "text": "/text/a", "audio": "/audio/a", "png": "/png/a",
                         "huge": "/huge/a", "echo": "/echo/a", "fail": "/fail/a", "big": "/big/a"}
                for job_id, path in paths.items():  # (max_attempts 5, the default, except the failing one)
                    extra = {"max_attempts": 1} if job_id == "fail" else {}
                    await client.submit(job(path, id=job_id, **extra), "normal", batch="payloads")
                results = await collect(client, "payloads", len(paths), timeout=90)
                assert set(results) == set(paths), f"missing: {set(paths) - set(results)}\n{kit.logs()[-3000:]}"
                await check_results(results)
                await check_stored(client, nats_server.url)
                request_result = await client.request(job("/embeddings/req"), "normal", timeout=60)
                assert request_result.ok, request_result.error
                assert request_result.response.json_body == EMBEDDINGS
                await check_raw_rpc(nats_server.url)
                await check_submit_out(tmp_path, nats_server.url)
                await asyncio.sleep(1.0)  # a retry, if any, would have called again by now
                every = [*paths.values(), "/embeddings/req", "/embeddings/rpc", "/embeddings/cli", "/audio/cli"]
                assert {p: up.calls[p] for p in every} == {p: 1 for p in every}
                assert SECRETS["k1"] not in kit.logs()
        finally:
            kit.stop()


async def check_results(results: dict[str, Result]) -> None:
    """What Client.results() handed back: whole bodies, each in its field, content type kept."""
    assert results["emb"].ok and results["emb"].response.json_body == EMBEDDINGS
    assert results["emb"].response.body_ref is not None and results["emb"].response.body_ref.encoding == "json"
    assert results["emb"].attempts == 1
    assert results["text"].ok and results["text"].response.body == TEXT
    assert results["text"].response.body_ref.size == len(TEXT.encode())
    for job_id, raw, content_type in (("audio", AUDIO, "audio/mpeg"), ("png", PNG, "image/png")):
        response = results[job_id].response
        assert results[job_id].ok and response.body is None and response.body_ref is None
        assert base64.b64decode(response.body_b64) == raw
        assert response.headers["content-type"] == content_type
    assert results["big"].ok and base64.b64decode(results["big"].response.body_b64) == BIG
    huge = results["huge"]
    assert huge.status == "failed" and huge.error.code == "response_too_large" and huge.attempts == 1
    assert huge.response.status == 200 and str(CAP) in huge.error.message
    echo = results["echo"]
    assert SECRETS["k1"] not in echo.model_dump_json() and "***" in echo.response.body
    fail = results["fail"]
    assert fail.status == "failed" and fail.error.code == "attempts_exhausted"
    assert fail.response.body == "overloaded " * 200_000


async def check_stored(client: Client, url: str) -> None:
    """The stored Result is small (a reference), stored_result() resolves it, and the dead
    letter of the failed job with a 2 MB body was stored (without the body)."""
    raw = await read_result(client.js, SUBJECTS, "emb")
    assert raw is not None and len(raw) < inline_limit(client.nc.max_payload)
    assert json.loads(raw)["response"]["json"] is None and json.loads(raw)["response"]["body_ref"]["size"] > 1 << 20
    assert (await client.stored_result("emb")).response.json_body == EMBEDDINGS
    assert (await client.stored_result("text", batch="payloads")).response.body == TEXT
    dead = await client.js.get_last_msg(SUBJECTS.dead_stream, SUBJECTS.dead("normal"))
    letter = json.loads(dead.data)
    assert letter["job_id"] == "fail" and letter["last_error"]["status"] == 500
    assert "the job's Result holds" in letter["last_error"]["body_omitted"] and len(dead.data) < 64 << 10


async def check_raw_rpc(url: str) -> None:
    """A non-Python client over plain NATS: the rpc reply carries the reference, and the
    object it names (fetched with the object store API) is the body, sha256 included."""
    nc = await nats.connect(url)
    try:
        reply = await nc.request(SUBJECTS.rpc("normal"), json.dumps(job("/embeddings/rpc", id="rpc-emb")).encode(),
                                 timeout=60)
        assert len(reply.data) <= nc.max_payload
        ref = json.loads(reply.data)["response"]["body_ref"]
        store = await nc.jetstream().object_store(ref["bucket"])
        data = (await store.get(ref["name"])).data
        assert len(data) == ref["size"] and hashlib.sha256(data).hexdigest() == ref["sha256"]
        assert json.loads(data) == EMBEDDINGS
    finally:
        await nc.close()


async def check_submit_out(tmp_path, url: str) -> None:
    """`ratefleet submit --wait --out` writes the whole bodies (the client resolves them)."""
    jobs = tmp_path / "jobs.jsonl"
    jobs.write_text("\n".join(json.dumps(job(p, id=i)) for i, p in (("cli-emb", "/embeddings/cli"),
                                                                     ("cli-audio", "/audio/cli"))) + "\n")
    out = tmp_path / "out.jsonl"
    done = await asyncio.to_thread(cli, "submit", str(jobs), "--tier", "normal", "--wait", "--out", str(out),
                                   "--nats", url, timeout=90)
    assert done.returncode == 0, done.stderr[-2000:]
    written = {r.job_id: r for r in map(Result.from_json, out.read_text().splitlines())}
    assert written["cli-emb"].response.json_body == EMBEDDINGS
    assert base64.b64decode(written["cli-audio"].response.body_b64) == AUDIO


async def test_a_result_the_stream_refuses_is_not_taken_for_stored(nats_server):
    """10077 is the server's generic "could not be stored": here the results stream is at a
    max_msgs limit. The job's message stays un-acked until its Result is really stored."""
    config = parse_config({"streams": {"ack_wait_s": 30}})
    nc = await nats.connect(nats_server.url)
    try:
        js = nc.jetstream()
        await ensure_topology(js, config)
        assert await store_result(js, SUBJECTS, Result(job_id="seed", status="succeeded"))
        info = await js.stream_info(SUBJECTS.results_stream)
        info.config.max_msgs = 1
        await js.update_stream(info.config)
        await js.publish(SUBJECTS.jobs("normal"), json.dumps(job("/x", id="j1")).encode(),
                         headers={"Nats-Msg-Id": "j1"})
        sub = await js.pull_subscribe_bind(tier_consumer("normal"), SUBJECTS.jobs_stream)
        [msg] = await sub.fetch(1, timeout=5)
        finisher = Finisher(nc, js, SUBJECTS)
        result = Result(job_id="j1", status="succeeded", tier="normal")
        with pytest.raises(ResultNotStored, match="maximum messages"):
            await finisher.finish(result, ack=msg.reply, reply_to=None)
        await nc.flush()  # any ack the finisher published has reached the server by now
        consumer = await js.consumer_info(SUBJECTS.jobs_stream, tier_consumer("normal"))
        assert consumer.num_ack_pending == 1 and await read_result(js, SUBJECTS, "j1") is None

        info.config.max_msgs = -1
        await js.update_stream(info.config)
        assert await finisher.finish(result, ack=msg.reply, reply_to=None) is True
        assert Result.from_json(await read_result(js, SUBJECTS, "j1")).job_id == "j1"
        await until(lambda: js.consumer_info(SUBJECTS.jobs_stream, tier_consumer("normal")), 5)
        consumer = await js.consumer_info(SUBJECTS.jobs_stream, tier_consumer("normal"))
        assert consumer.num_ack_pending == 0
    finally:
        await nc.close()


async def test_a_body_is_uploaded_once_and_a_missing_one_is_reported(nats_server):
    """Storing the same large Result twice uploads its body once (the name carries the job id
    and the digest); a body gone from the bucket is an error naming the job, never a Result
    that silently lacks its body."""
    nc = await nats.connect(nats_server.url)
    try:
        js = nc.jetstream()
        await ensure_topology(js, parse_config({}))
        finisher = Finisher(nc, js, SUBJECTS)
        result = Result(job_id="big-1", status="succeeded", response={"status": 200, "body": TEXT})
        assert await finisher.finish(result, ack=None, reply_to=None) is True
        stream = f"OBJ_{SUBJECTS.bodies_bucket}"
        before = (await js.stream_info(stream)).state.last_seq
        assert await finisher.finish(result, ack=None, reply_to=None) is False
        assert (await js.stream_info(stream)).state.last_seq == before  # nothing published again
        client = Client(nc)
        stored = await client.stored_result("big-1")
        assert stored.response.body == TEXT and stored.response.body_ref.encoding == "text"
        await (await js.object_store(SUBJECTS.bodies_bucket)).delete(stored.response.body_ref.name)
        with pytest.raises(BodyUnavailable, match="big-1"):
            await client.stored_result("big-1")
    finally:
        await nc.close()
