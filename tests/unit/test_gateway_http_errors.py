"""Errors raised by the HTTP layer itself (Starlette: a method no route takes, a broken
multipart upload) reach an SDK as OpenAI-style error bodies, like every other gateway refusal."""

from __future__ import annotations

import httpx
import pytest

from ratefleet.gateway.app import Gateway, create_app
from ratefleet.gateway.batch_routes import BatchApi
from ratefleet.gateway.callers import Caller, CallerTable, key_digest

pytestmark = pytest.mark.anyio
KEY = "rk-app-0123456789"


@pytest.fixture
def anyio_backend():
    return "asyncio"


def app():
    callers = CallerTable({key_digest(KEY): Caller("app", "premium", None, None, 60.0, None, None, None)})
    gateway = Gateway(client=None, callers=callers, max_body_bytes=1 << 20)  # type: ignore[arg-type]
    batches = BatchApi(callers, files_store=None, book=None, runner=None)  # type: ignore[arg-type]
    return create_app(gateway, batches.routes())


async def ask(method: str, path: str, **kwargs) -> httpx.Response:
    transport = httpx.ASGITransport(app=app())
    async with httpx.AsyncClient(transport=transport, base_url="http://gw") as http:
        return await http.request(method, path, headers={"authorization": f"Bearer {KEY}",
                                                         **kwargs.pop("headers", {})}, **kwargs)


@pytest.mark.parametrize(("method", "path", "headers", "content", "status"), [
    ("OPTIONS", "/v1/models", {}, b"", 405),
    ("TRACE", "/v1/chat/completions", {}, b"", 405),
    ("POST", "/v1/files", {"content-type": "multipart/form-data"}, b"abc", 400),  # no boundary
])
async def test_http_layer_errors_are_openai_error_bodies(method, path, headers, content, status):
    answer = await ask(method, path, headers=headers, content=content)
    assert answer.status_code == status
    assert answer.headers["content-type"] == "application/json"
    error = answer.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["type"] == "invalid_request_error" and error["message"]
    assert KEY not in answer.text


@pytest.mark.parametrize("path", ["/v1/chat/completions", "/v1/files"])
async def test_two_authorization_headers_name_no_caller(path):
    transport = httpx.ASGITransport(app=app())
    async with httpx.AsyncClient(transport=transport, base_url="http://gw") as http:
        answer = await http.get(path, headers=[("authorization", f"Bearer {KEY}"),
                                               ("authorization", "Bearer rk-someone-else")])
    assert answer.status_code == 401
    assert answer.json()["error"]["code"] == "invalid_api_key"


@pytest.mark.parametrize("metadata", [{"note": "x" * 513}, {f"k{i}": "v" for i in range(17)},
                                      {"k" * 65: "v"}, {"n": 5}, ["not", "an", "object"]])
async def test_batch_metadata_over_openais_limits_is_a_400_naming_metadata(metadata):
    body = {"input_file_id": "file-x", "endpoint": "/v1/chat/completions", "completion_window": "24h",
            "metadata": metadata}
    answer = await ask("POST", "/v1/batches", json=body)
    assert answer.status_code == 400
    assert answer.json()["error"]["param"] == "metadata"


@pytest.mark.parametrize("path", ["/v1/chat/completions", "/v1/batches"])
async def test_a_chunked_body_without_length_is_refused_once_past_the_limit_not_read_whole(path):
    chunk, chunks = b"x" * 65536, 200  # 12.5 MiB sent chunked; the limits are 1 MiB
    received = 0

    async def receive():
        nonlocal received
        received += 1
        return {"type": "http.request", "body": chunk, "more_body": received < chunks}

    sent: list[dict] = []

    async def send(message):
        sent.append(message)

    scope = {"type": "http", "asgi": {"version": "3.0", "spec_version": "2.3"}, "http_version": "1.1",
             "method": "POST", "scheme": "http", "path": path, "raw_path": path.encode(), "query_string": b"",
             "root_path": "", "server": ("127.0.0.1", 8080), "client": ("127.0.0.1", 5000),
             "headers": [(b"authorization", f"Bearer {KEY}".encode()), (b"content-type", b"application/json"),
                         (b"transfer-encoding", b"chunked")]}
    await app()(scope, receive, send)
    assert sent[0]["status"] == 413
    assert received <= (1 << 20) // len(chunk) + 1  # stopped reading just past the limit


async def test_a_chunked_upload_without_length_stops_being_read_past_the_file_limit(monkeypatch):
    import ratefleet.gateway.batch_routes as batch_routes

    monkeypatch.setattr(batch_routes, "MAX_FILE_BYTES", 1 << 20)
    head = (b'--b\r\nContent-Disposition: form-data; name="purpose"\r\n\r\nbatch\r\n'
            b'--b\r\nContent-Disposition: form-data; name="file"; filename="in.jsonl"\r\n'
            b"Content-Type: application/jsonl\r\n\r\n")
    chunk, chunks = b"{}\n" * 21845, 200  # 12.5 MiB of file sent chunked; the limit is 1 MiB
    received = 0

    async def receive():
        nonlocal received
        received += 1
        body = head if received == 1 else b"\r\n--b--\r\n" if received == chunks else chunk
        return {"type": "http.request", "body": body, "more_body": received < chunks}

    sent: list[dict] = []

    async def send(message):
        sent.append(message)

    scope = {"type": "http", "asgi": {"version": "3.0", "spec_version": "2.3"}, "http_version": "1.1",
             "method": "POST", "scheme": "http", "path": "/v1/files", "raw_path": b"/v1/files", "query_string": b"",
             "root_path": "", "server": ("127.0.0.1", 8080), "client": ("127.0.0.1", 5000),
             "headers": [(b"authorization", f"Bearer {KEY}".encode()),
                         (b"content-type", b"multipart/form-data; boundary=b"), (b"transfer-encoding", b"chunked")]}
    await app()(scope, receive, send)
    assert sent[0]["status"] == 413
    assert received <= (1 << 20) // len(chunk) + 3  # stopped reading just past the limit


async def test_a_request_without_an_upstream_in_a_fleet_of_several_names_the_header_that_chooses_one():
    # it became a job that ended `invalid` / unknown_upstream: "upstream is required", with no word
    # about the x-ratefleet-upstream header a gateway caller would use (a break-it trial)
    callers = CallerTable({key_digest(KEY): Caller("app", "premium", None, None, 60.0, None, None, None)})
    gateway = Gateway(client=None, callers=callers, max_body_bytes=1 << 20,  # type: ignore[arg-type]
                      upstreams=("openai", "anthropic"))
    batches = BatchApi(callers, files_store=None, book=None, runner=None)  # type: ignore[arg-type]
    transport = httpx.ASGITransport(app=create_app(gateway, batches.routes()))
    async with httpx.AsyncClient(transport=transport, base_url="http://gw") as http:
        answer = await http.post("/v1/chat/completions", headers={"authorization": f"Bearer {KEY}"},
                                 json={"model": "m", "messages": []})
    assert answer.status_code == 400
    error = answer.json()["error"]
    assert error["code"] == "upstream_required" and "x-ratefleet-upstream" in error["message"]
    assert "openai, anthropic" in error["message"]


async def test_while_nats_is_down_a_request_is_refused_at_once_with_retry_after():
    # it waited out the JetStream publish (about 30 s) and then answered 503 "NATS did not confirm
    # job ...", while /readyz already said the connection was lost (a new user's trial)
    from types import SimpleNamespace

    callers = CallerTable({key_digest(KEY): Caller("app", "premium", None, None, 60.0, None, None, None)})
    offline = SimpleNamespace(nc=SimpleNamespace(is_connected=False))
    gateway = Gateway(client=offline, callers=callers, max_body_bytes=1 << 20)  # type: ignore[arg-type]
    batches = BatchApi(callers, files_store=None, book=None, runner=None)  # type: ignore[arg-type]
    transport = httpx.ASGITransport(app=create_app(gateway, batches.routes()))
    async with httpx.AsyncClient(transport=transport, base_url="http://gw", timeout=5) as http:
        answer = await http.post("/v1/chat/completions", headers={"authorization": f"Bearer {KEY}"},
                                 json={"model": "m", "messages": []})
    assert answer.status_code == 503 and answer.headers["retry-after"] == "2"
    assert answer.json()["error"]["code"] == "service_unavailable"
    assert "nothing was queued" in answer.json()["error"]["message"]


async def test_an_unforeseen_failure_in_a_route_is_an_openai_style_500():
    # /v1/files answered a plain-text "Internal Server Error" when its stream was gone (NATS back
    # with a fresh store), which the openai SDK cannot parse (a new user's trial)
    class Broken:
        async def list(self, caller, purpose=None):
            raise RuntimeError("stream not found")

    callers = CallerTable({key_digest(KEY): Caller("app", "premium", None, None, 60.0, None, None, None)})
    gateway = Gateway(client=None, callers=callers, max_body_bytes=1 << 20)  # type: ignore[arg-type]
    batches = BatchApi(callers, files_store=Broken(), book=None, runner=None)  # type: ignore[arg-type]
    transport = httpx.ASGITransport(app=create_app(gateway, batches.routes()), raise_app_exceptions=False)
    async with httpx.AsyncClient(transport=transport, base_url="http://gw") as http:
        answer = await http.get("/v1/files", headers={"authorization": f"Bearer {KEY}"})
    assert answer.status_code == 500 and answer.headers["content-type"] == "application/json"
    error = answer.json()["error"]
    assert error["code"] == "internal_error" and "RuntimeError on GET /v1/files" in error["message"]
