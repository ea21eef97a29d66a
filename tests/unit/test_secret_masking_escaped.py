"""A key the upstream quotes back JSON-escaped (PHP `\\/`, .NET `\\u002B`) is masked in the
parsed answer: strings, object keys, any depth, and in the text kept when JSON does not parse."""

from __future__ import annotations

import json

import httpx
import pytest

from ratefleet.schemas import Job, UpstreamConfig
from ratefleet.workers.body import body_fields, mask_parsed
from ratefleet.workers.executor import UpstreamExecutor

SECRET = "sk-live/AbC+dEf12345"


def php_escape(text: str) -> str:
    return text.replace("/", "\\/")  # json_encode without JSON_UNESCAPED_SLASHES


def dotnet_escape(text: str) -> str:
    return text.replace("+", "\\u002B")  # System.Text.Json's default encoder


@pytest.mark.anyio
async def test_a_php_style_401_quoting_the_key_comes_back_masked():
    def handler(request: httpx.Request) -> httpx.Response:
        key = request.headers["authorization"].split(" ", 1)[1]
        body = php_escape(json.dumps({"error": {"message": f"Invalid API key {key}"}}))
        return httpx.Response(401, content=body.encode(), headers={"content-type": "application/json"})

    executor = UpstreamExecutor(httpx.AsyncClient(transport=httpx.MockTransport(handler)))
    job = Job.model_validate({"request": {"path": "/v1/x", "json": {}}})
    result = await executor.call(job, UpstreamConfig(base_url="https://u.test"), SECRET)
    stored = result.response.model_dump_json(by_alias=True)
    assert SECRET not in stored and SECRET not in json.loads(stored)["json"]["error"]["message"]
    assert result.response.json_body == {"error": {"message": "Invalid API key ***"}}


@pytest.mark.parametrize("escape", [php_escape, dotnet_escape, lambda t: t.replace("-", "\\u002d")],
                         ids=["php-slash", "dotnet-plus", "lower-hex"])
def test_escaped_secret_is_masked_in_values_and_keys_at_any_depth(escape):
    answer = {"error": {"message": f"bad key {SECRET}", SECRET: [SECRET, {"deep": [[f"x{SECRET}y"]]}]}}
    fields = body_fields(escape(json.dumps(answer)).encode(), "application/json", SECRET)
    assert fields == {"json": {"error": {"message": "bad key ***", "***": ["***", {"deep": [["x***y"]]}]}}}


def test_escaped_secret_is_masked_in_json_that_is_kept_as_text():
    raw = php_escape(json.dumps({"message": SECRET})).replace("}", ', "n": NaN}')  # NaN: not RFC 8259
    fields = body_fields(raw.encode(), "application/json", SECRET)
    assert list(fields) == ["body"] and SECRET not in fields["body"] and "\\/" not in fields["body"]
    assert json.loads(fields["body"])["message"] == "***"


def test_a_top_level_escaped_string_and_a_secret_free_answer():
    assert body_fields(php_escape(json.dumps(SECRET)).encode(), "application/json", SECRET) == {"json": "***"}
    plain = {"a": "line\nbreak \\/ not a key", "b": [1, 2.5, None, True]}
    assert body_fields(json.dumps(plain).encode(), "application/json", SECRET) == {"json": plain}


def test_mask_parsed_walks_deep_nesting_without_recursion():
    deep: list = [SECRET]
    for _ in range(5000):
        deep = [deep]
    node = mask_parsed(deep, SECRET)
    for _ in range(5000):
        node = node[0]
    assert node == ["***"]
