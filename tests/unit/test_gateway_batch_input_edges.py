"""Batch API input files as Windows tools and careless scripts write them: a UTF-8 byte order
mark, CRLF line ends, a request method OpenAI's Batch API does not take."""

from __future__ import annotations

import json

from ratefleet.gateway.batch_lines import batch_jobs, check_file
from ratefleet.gateway.callers import Caller

ENDPOINT = "/v1/chat/completions"


def caller() -> Caller:
    return Caller("app", "premium", None, None, 60.0, None, None, None)


def chat(custom_id: str, method: str = "POST") -> str:
    return json.dumps({"custom_id": custom_id, "method": method, "url": ENDPOINT,
                       "body": {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": custom_id}]}})


def test_a_utf8_byte_order_mark_and_crlf_line_ends_are_read_as_plain_lines(tmp_path):
    path = tmp_path / "in.jsonl"
    path.write_bytes(b"\xef\xbb\xbf" + f"{chat('a')}\r\n{chat('b')}\r\n".encode())  # Notepad / PowerShell
    found = check_file(path, "batch_x", ENDPOINT, caller())
    assert found.error_count == 0, found.errors
    jobs = [job for _, job in batch_jobs(path, "batch_x", ENDPOINT, caller())]
    assert [job.metadata["custom_id"] for job in jobs] == ["a", "b"]


def test_a_line_with_another_method_than_post_fails_validation_naming_it(tmp_path):
    path = tmp_path / "in.jsonl"
    path.write_text(f"{chat('a')}\n{chat('b', method='GET')}\n{chat('c', method='post')}\n")
    found = check_file(path, "batch_x", ENDPOINT, caller())
    assert found.jobs == 2 and found.error_count == 1  # "post" is POST: HTTP methods are case-blind here
    assert found.errors[0]["line"] == 2 and found.errors[0]["param"] == "method"
    assert "POST" in found.errors[0]["message"]
