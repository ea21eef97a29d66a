"""OpenAI Batch API lines: input lines as jobs, Results as output lines, in input order on request."""

from __future__ import annotations

import io
import json
from pathlib import Path

import pytest

from ratefleet.batches import InputOrder
from ratefleet.batchfile import LineError, line_of, parse_line
from ratefleet.openai_batch import format_result, openai_output_line
from ratefleet.schemas import Result
from ratefleet.submit_report import Run

CHAT = {"custom_id": "request-1", "method": "POST", "url": "/v1/chat/completions",
        "body": {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "Hello world!"}], "max_tokens": 1000}}


def test_an_openai_input_line_is_taken_as_it_is():
    text = json.dumps(CHAT)
    job = parse_line(text, 3, "nightly")
    assert job.request.method == "POST" and job.request.path == "/v1/chat/completions"
    assert job.request.json_body == CHAT["body"] and job.metadata == {"custom_id": "request-1"}
    assert job.batch == "nightly" and line_of(job.id) == 3
    assert parse_line(text, 3, "nightly").id == job.id  # deterministic: a re-run sends nothing twice


def test_query_in_the_url_and_a_bodiless_get():
    job = parse_line(json.dumps({"custom_id": "m", "method": "GET", "url": "/v1/models?limit=2&after=x"}), 1, "b")
    assert job.request.method == "GET" and job.request.path == "/v1/models"
    assert job.request.query == {"limit": "2", "after": "x"} and job.request.json_body is None


def test_job_lines_are_unchanged_even_when_they_mention_custom_id():
    line = {"request": {"path": "/v1/embeddings", "json": {"input": "a"}}, "metadata": {"custom_id": "x"}}
    job = parse_line(json.dumps(line), 1, "b")
    assert job.request.path == "/v1/embeddings" and job.metadata == {"custom_id": "x"}


@pytest.mark.parametrize(("line", "message"), [
    ({**CHAT, "model": "x"}, "unexpected field(s) model"),
    ({**CHAT, "custom_id": ""}, "custom_id must be a non-empty string"),
    ({**CHAT, "custom_id": 7}, "custom_id must be a non-empty string"),
    ({**CHAT, "url": 5}, "url must be a path"),
    ({**CHAT, "body": [1]}, "body must be a JSON object"),
    ({**CHAT, "url": "https://evil.example/v1/chat/completions"}, "url: path must start with '/'"),
    ({**CHAT, "url": "//evil.example/v1"}, "must not name a scheme or host"),
    ({**CHAT, "method": "BREW"}, "method: Input should be"),
    ({**CHAT, "body": {**CHAT["body"], "stream": True}}, "body.stream must not be true"),
    # a new user's finding: a POST line without a body was sent, and paid for the upstream's 400
    ({key: value for key, value in CHAT.items() if key != "body"}, "body is required for a POST"),
    # a gateway trial: read as a Job line, "request: Field required; custom_id: Extra inputs are not permitted"
    ({"custom_id": "x"}, "OpenAI batch line: url is missing"),
    ({"custom_id": "x", "body": {"model": "m"}}, "OpenAI batch line: url is missing"),
])
def test_malformed_openai_lines_are_refused_with_the_line_and_why(line, message):
    with pytest.raises(LineError, match=r"^line 4: .*" + message.replace("(", r"\(").replace(")", r"\)")):
        parse_line(json.dumps(line), 4, "b")


def test_nan_in_an_openai_body_is_refused():
    with pytest.raises(LineError, match="not strict JSON"):
        parse_line('{"custom_id": "a", "url": "/v1/embeddings", "body": {"x": NaN}}', 1, "b")


def result(job_id: str, custom_id: str = "request-1", **fields) -> Result:
    return Result.model_validate({"job_id": job_id, "status": "succeeded", "metadata": {"custom_id": custom_id},
                                  **fields})


def test_output_lines_follow_openais_batch_output_object():
    ok = result("b-1-aa", response={"status": 200, "headers": {"x-request-id": "req_1"}, "json": {"id": "c1"}})
    assert openai_output_line(ok) == {"id": "batch_req_b-1-aa", "custom_id": "request-1",
                                      "response": {"status_code": 200, "request_id": "req_1", "body": {"id": "c1"}},
                                      "error": None}
    provider = result("b-2-bb", "request-2", status="failed",
                      response={"status": 400, "json": {"error": {"message": "bad"}}},
                      error={"code": "upstream_error", "message": "HTTP 400"})
    line = openai_output_line(provider)
    assert line["response"] == {"status_code": 400, "request_id": "b-2-bb", "body": {"error": {"message": "bad"}}}
    assert line["error"] is None
    nothing = result("b-3-cc", "request-3", status="expired", error={"code": "deadline_exceeded", "message": "late"})
    assert openai_output_line(nothing)["response"] is None
    assert openai_output_line(nothing)["error"] == {"code": "deadline_exceeded", "message": "late"}
    assert json.loads(format_result(ok, "ratefleet"))["job_id"] == "b-1-aa"
    escaped = result("b-4-dd", response={"status": 200, "body": "\ud800"})
    assert json.loads(format_result(escaped, "openai"))["response"]["body"] == "\ud800"


def test_submit_writes_openai_lines_in_input_order_on_request(tmp_path: Path):
    run = Run(file=tmp_path / "in.jsonl", tier="normal", batch="b", wait=True, out=None, url="", prefix="ratefleet",
              out_format="openai", by_input=True)
    run.order = InputOrder([[2, 2]])  # line 2 is blank
    run.sink = io.StringIO()
    for line in (4, 1, 3):
        run.write(result(f"b-{line}-0123456789", f"request-{line}"))
    assert [json.loads(x)["custom_id"] for x in run.sink.getvalue().splitlines()] == ["request-1", "request-3",
                                                                                       "request-4"]
    assert run.written == 3 and run.statuses["succeeded"] == 3
    assert "--out-format openai --order input" in run.submit_command()
    assert "--out-format openai --order input" in run.results_command()


def test_results_are_held_back_until_the_earlier_lines_arrive_and_flushed_at_the_end(tmp_path: Path):
    run = Run(file=tmp_path / "in.jsonl", tier="normal", batch="b", wait=True, out=None, url="", prefix="ratefleet",
              by_input=True)
    run.order = InputOrder([])
    run.sink = io.StringIO()
    run.write(result("b-3-0123456789", "c"))
    assert run.sink.getvalue() == ""
    run.flush_held()  # Ctrl-C or the end: what was held comes out, in line order
    assert json.loads(run.sink.getvalue())["job_id"] == "b-3-0123456789"


def test_the_resume_command_keeps_the_upstream_of_lines_that_name_none(tmp_path: Path):
    run = Run(file=tmp_path / "in.jsonl", tier="normal", batch="b", wait=False, out=None, url="", prefix="ratefleet",
              upstream="open ai")
    assert "--batch b --upstream 'open ai'" in run.submit_command()
    assert "--upstream" not in Run(file=tmp_path / "in.jsonl", tier="normal", batch="b", wait=False, out=None, url="",
                                   prefix="ratefleet").submit_command()


def test_the_resume_command_keeps_skip_invalid_and_the_rejects_file(tmp_path: Path):
    run = Run(file=tmp_path / "in.jsonl", tier="normal", batch="b", wait=False, out=None, url="", prefix="ratefleet",
              skip_invalid=True, rejects=tmp_path / "bad lines.jsonl")
    assert f"--skip-invalid --rejects '{tmp_path}/bad lines.jsonl'" in run.submit_command()
    assert "--rejects" not in Run(file=tmp_path / "in.jsonl", tier="normal", batch="b", wait=False, out=None, url="",
                                  prefix="ratefleet").submit_command()


def test_an_openai_lines_errors_use_its_own_field_names():
    """A bad `url` was reported as `request.path: ...`, a field the user never wrote."""
    from ratefleet.batchfile import LineError, parse_line

    line = json.dumps({"custom_id": "c", "method": "POST", "url": "v1/chat/completions", "body": {"model": "m"}})
    with pytest.raises(LineError, match=r"^line 2: url: path must start with '/'"):
        parse_line(line, 2, "b")
    job_line = json.dumps({"request": {"path": "v1/chat/completions"}})
    with pytest.raises(LineError, match=r"^line 3: request\.path: path must start with '/'"):
        parse_line(job_line, 3, "b")  # a Job line keeps the Job's names


def test_submit_names_the_replay_of_the_jobs_the_fleet_gave_up_on(tmp_path: Path):
    """`submit --wait` ended a batch with 58 `attempts_exhausted` Results saying only how to read
    each `error` with jq; it now gives the `dlq replay --batch` command that runs them again."""
    from ratefleet.submit_report import report_end

    run = Run(file=tmp_path / "in.jsonl", tier="normal", batch="b", wait=True, out=tmp_path / "out.jsonl",
              url="nats://10.0.0.1:4222", prefix="ratefleet")
    run.sink = io.StringIO()
    run.write(result("b-1-0123456789", "a"))
    gone = {"code": "attempts_exhausted", "message": "gave up after 5 attempts; last: HTTP 503"}
    run.write(Result(job_id="b-2-0123456789", status="failed", error=gone))
    run.write(Result(job_id="b-3-0123456789", status="failed", error={"code": "upstream_error", "message": "400"}))
    said = []
    report_end(run, type("P", (), {"print": lambda self, text, style=None: said.append(text)})())
    hint = [line for line in said if "gave up on" in line]
    assert len(hint) == 1 and hint[0].startswith("1 job of batch b the fleet gave up on (attempts_exhausted"), said
    assert "run them again with: ratefleet dlq replay --batch b --given-up --nats nats://10.0.0.1:4222," in hint[0], hint


def test_order_input_says_that_lines_with_their_own_id_are_not_in_line_order(tmp_path: Path):
    """`submit --wait --order input` (and `results --order input`) over a nightly file whose every
    line carried its own id wrote the Results in arrival order and said nothing: a user relying
    on line order joined answers to the wrong rows. The summary now says so."""
    from ratefleet.submit_report import report_end

    run = Run(file=tmp_path / "in.jsonl", tier="normal", batch="b", wait=True, out=tmp_path / "out.jsonl",
              url="", prefix="ratefleet", by_input=True)
    run.order = InputOrder([])
    run.sink = io.StringIO()
    for job_id in ("row-2", "b-1-0123456789", "row-1"):
        run.write(result(job_id))
    run.flush_held()
    said = []
    report_end(run, type("P", (), {"print": lambda self, text, style=None: said.append(text)})())
    assert ("2 Results of lines with their own `id` came after the others, in arrival order, not in line order "
            "(--order input orders only lines without an `id`); join them to your lines by job_id") in said, said
    run.order = InputOrder([])
    run.write(result("b-1-0123456789"))
    said.clear()
    report_end(run, type("P", (), {"print": lambda self, text, style=None: said.append(text)})())
    assert not any("own `id`" in line for line in said), said


def test_a_job_lines_output_line_carries_its_job_id_as_custom_id():
    # a Job line has no custom_id: its OpenAI output line said null, and the only join key left
    # was the job id inside "batch_req_<job id>"
    job_line = Result.model_validate({"job_id": "row-17", "status": "succeeded", "metadata": {"user": "u-1"},
                                      "response": {"status": 200, "json": {}}})
    assert openai_output_line(job_line)["custom_id"] == "row-17"
    assert openai_output_line(result("b-1-aa"))["custom_id"] == "request-1"  # an OpenAI line keeps its own


@pytest.mark.anyio
async def test_submit_does_not_offer_to_replay_another_batchs_given_up_jobs(tmp_path: Path):
    """A line whose id another batch holds gets that batch's Result written with this run's. When
    that Result had given up (attempts_exhausted), it was counted for the 'gave up on' line, which
    then offered `ratefleet dlq replay --batch b`: its dead letter holds a job of the other batch,
    so that command replays nothing ('no replayable dead letter with batch ...', exit 1)."""
    from ratefleet.client import Stored
    from ratefleet.schemas import Job
    from ratefleet.submit_cmd import _classify
    from ratefleet.submit_report import report_end

    gone = {"code": "attempts_exhausted", "message": "gave up after 5 attempts; last: HTTP 503"}
    theirs = Result(job_id="row-1", status="failed", batch="lastnight", error=gone)

    class Fleet:  # the stored state: row-1 done under batch lastnight, nothing under b
        async def queued_job(self, seq):
            return None

        async def stored_result(self, job_id, batch=None):
            return theirs if batch in (None, "lastnight") else None

    run = Run(file=tmp_path / "in.jsonl", tier="normal", batch="b", wait=True, out=tmp_path / "out.jsonl",
              url="nats://10.0.0.1:4222", prefix="ratefleet")
    run.sink = io.StringIO()
    job = Job.model_validate({"id": "row-1", "batch": "b", "request": {"path": "/v1/chat/completions"}})
    await _classify(run, Fleet(), Stored(job=job, duplicate=True, seq=7))
    assert run.foreign == 1 and "row-1" in run.sink.getvalue()  # still written with this run's Results
    said = []
    report_end(run, type("P", (), {"print": lambda self, text, style=None: said.append(text)})())
    assert not [line for line in said if "dlq replay --batch b" in line], said
