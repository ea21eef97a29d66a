"""The gateway's reading of an OpenAI Batch input file and its batch records (pure parts)."""

from __future__ import annotations

import json

from ratefleet.batchfile import SHOWN_ERRORS, line_job_id
from ratefleet.gateway.batch_book import PRIVATE, new_batch, public, set_status
from ratefleet.gateway.batch_lines import batch_jobs, check_file
from ratefleet.gateway.callers import Caller

ENDPOINT = "/v1/chat/completions"


def caller(models=None, upstreams=None) -> Caller:
    return Caller("app", "premium", upstreams, models, 60.0, None, None, None)


def chat(custom_id: str, model: str = "gpt-4o-mini", url: str = ENDPOINT) -> str:
    return json.dumps({"custom_id": custom_id, "method": "POST", "url": url,
                       "body": {"model": model, "messages": [{"role": "user", "content": custom_id}]}})


def write(tmp_path, lines: list[str]):
    path = tmp_path / "in.jsonl"
    path.write_text("".join(line + "\n" for line in lines))
    return path


def test_good_lines_become_jobs_with_the_ids_ratefleet_submit_gives(tmp_path):
    lines = [chat("a"), "", chat("b")]
    path = write(tmp_path, lines)
    found = check_file(path, "batch_x", ENDPOINT, caller(upstreams=("openai",)))
    jobs = [job for _, job in batch_jobs(path, "batch_x", ENDPOINT, caller(upstreams=("openai",)))]
    assert found.jobs == 2 and found.error_count == 0
    assert [job.id for job in jobs] == [line_job_id("batch_x", 1, lines[0]), line_job_id("batch_x", 3, lines[2])]
    assert all(job.id in found.ids for job in jobs)
    assert found.gaps == [[2, 2]]  # the blank line: input order skips it
    assert jobs[1].metadata == {"custom_id": "b", "caller": "app"}
    assert jobs[0].batch == "batch_x" and jobs[0].upstream == "openai"
    assert jobs[0].request.json_body["model"] == "gpt-4o-mini"


def test_each_bad_line_is_named_with_openai_error_fields(tmp_path):
    job_line = json.dumps({"request": {"method": "POST", "path": ENDPOINT}})
    no_model = json.dumps({"custom_id": "d", "method": "POST", "url": ENDPOINT, "body": {"messages": []}})
    lines = [chat("a"), "{oops", chat("b", url="/v1/embeddings"), chat("a"), chat("c", model="gpt-4o"), job_line,
             no_model]
    found = check_file(write(tmp_path, lines), "batch_x", ENDPOINT, caller(models=frozenset({"gpt-4o-mini"})))
    assert found.jobs == 1 and found.error_count == 6
    by_line = {error["line"]: error for error in found.errors}
    assert set(by_line) == {2, 3, 4, 5, 6, 7}
    assert (by_line[7]["code"], by_line[7]["param"]) == ("model_required", "body.model")  # not the upstream's default
    assert by_line[2]["code"] == "invalid_json_line" and by_line[2]["message"].startswith("line 2:")
    assert (by_line[3]["code"], by_line[3]["param"]) == ("mismatched_endpoint", "url")
    assert by_line[4]["code"] == "duplicate_custom_id"
    assert by_line[5]["code"] == "model_not_allowed"
    assert by_line[6]["param"] == "custom_id"  # a ratefleet Job line is not an OpenAI batch line
    assert set(by_line[2]) == {"code", "message", "param", "line"}


def test_batch_record_statuses_and_public_shape():
    record = new_batch(caller="app", tier="premium", upstream=None, input_file_id="file-1", endpoint=ENDPOINT,
                       completion_window="24h", metadata={"k": "v"}, now=1000.0)
    assert record["status"] == "validating" and record["expires_at"] == 1000 + 86400
    assert record["id"].startswith("batch_") and PRIVATE not in public(record)
    set_status(record, "in_progress", now=1001.0)
    set_status(record, "in_progress", now=1005.0)  # the first stamp stays
    assert record["in_progress_at"] == 1001
    shown = public(record)
    assert shown["object"] == "batch" and shown["request_counts"] == {"total": 0, "completed": 0, "failed": 0}


def test_a_line_whose_model_is_not_a_string_is_a_line_error_not_a_stuck_batch(tmp_path):
    # it raised TypeError (unhashable list) inside validation: the batch stayed `validating` for good
    lines = [chat("a"), chat("b", model=["gpt-4o-mini"]), chat("c", model={"x": 1})]  # type: ignore[arg-type]
    found = check_file(write(tmp_path, lines), "batch_x", ENDPOINT, caller(models=frozenset({"gpt-4o-mini"})))
    assert found.jobs == 1 and found.error_count == 2
    assert [(e["line"], e["code"], e["param"]) for e in found.errors] == [
        (2, "invalid_model", "body.model"), (3, "invalid_model", "body.model")]


def test_each_kind_of_bad_line_gets_its_own_code_and_the_list_says_how_many_more(tmp_path):
    """Valid JSON that breaks a rule is not an "invalid JSON line"; a line without custom_id says
    so (it was read as a ratefleet Job: "request: Field required; method: Extra inputs ..."); past
    the first SHOWN_ERRORS entries a last one counts the rest (5,000 bad lines gave 20, silently)."""
    streamed = json.dumps({"custom_id": "s", "method": "POST", "url": ENDPOINT,
                           "body": {"model": "gpt-4o-mini", "messages": [], "stream": True}})
    no_id = json.dumps({"method": "POST", "url": ENDPOINT, "body": {"model": "gpt-4o-mini", "messages": []}})
    lines = [streamed, no_id, "{oops"] + ["{bad"] * 25
    found = check_file(write(tmp_path, lines), "batch_x", ENDPOINT, caller())
    by_line = {error["line"]: error for error in found.errors}
    assert by_line[1]["code"] == "invalid_request" and "stream" in by_line[1]["message"]
    assert (by_line[2]["code"], by_line[2]["param"]) == ("invalid_request", "custom_id")
    assert "no custom_id" in by_line[2]["message"] and "Field required" not in by_line[2]["message"]
    assert by_line[3]["code"] == "invalid_json_line"
    assert found.error_count == 28 and len(found.errors) == SHOWN_ERRORS + 1
    assert found.errors[-1] == {"code": "more_errors", "param": None, "line": None, "message":
                                "8 more lines with errors (28 in all; the first 20 are listed): check the whole "
                                "file before uploading it again"}


def test_a_callers_paths_hold_for_its_batch_lines(tmp_path):
    """A review: with callers.<name>.paths = ["/v1/embeddings"], a direct chat request was refused
    but the same request as a Batch API line ran."""
    limited = Caller("app", "premium", None, None, 60.0, None, None, None, paths=("/v1/embeddings",))
    found = check_file(write(tmp_path, [chat("a"), chat("b")]), "batch_x", ENDPOINT, limited)
    assert found.jobs == 0 and [(e["line"], e["code"], e["param"]) for e in found.errors] == [
        (1, "path_not_allowed", "url"), (2, "path_not_allowed", "url")]
    assert check_file(write(tmp_path, [chat("a")]), "batch_x", ENDPOINT, caller()).jobs == 1  # by default: runs
