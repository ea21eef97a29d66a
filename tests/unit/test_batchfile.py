"""The deterministic id rule, the streaming validation pass and the --order input buffer."""

from __future__ import annotations

import json

import pytest

from ratefleet.batches import InputOrder
from ratefleet.batchfile import IdSet, LineError, line_job_id, line_of, parse_line, validate_file
from ratefleet.schemas import Result

LINE = json.dumps({"request": {"path": "/v1/chat/completions", "json": {"model": "m"}}})


def test_a_line_without_id_gets_the_same_id_every_run_and_a_new_one_when_anything_changes():
    first = parse_line(LINE, 7, "nightly").id
    assert first == parse_line(LINE, 7, "nightly").id == line_job_id("nightly", 7, LINE)
    assert first.startswith("nightly-7-") and line_of(first) == 7
    assert parse_line(LINE, 8, "nightly").id != first            # another line
    assert parse_line(LINE, 7, "other").id != first              # another batch
    assert parse_line(LINE.replace("m", "n"), 7, "nightly").id != first  # edited content


def test_long_batch_names_still_give_valid_ids_that_keep_the_line_number():
    batch = "b" * 128
    job_id = parse_line(LINE, 1_000_000, batch).id
    assert len(job_id) <= 128 and line_of(job_id) == 1_000_000
    assert job_id != parse_line(LINE, 1_000_000, "b" * 127 + "c").id  # the hash covers the whole name


def test_own_ids_are_kept_and_a_foreign_batch_field_is_refused():
    job = parse_line(json.dumps({"id": "mine-1", **json.loads(LINE)}), 3, "nightly")
    assert job.id == "mine-1" and job.batch == "nightly" and line_of("mine-1") is None
    with pytest.raises(LineError, match="line 4: batch 'x' differs"):
        parse_line(json.dumps({"batch": "x", **json.loads(LINE)}), 4, "nightly")
    with pytest.raises(LineError, match="line 5: job is not valid JSON"):
        parse_line("{nope", 5, "nightly")
    with pytest.raises(LineError, match="line 6: request.path"):
        parse_line(json.dumps({"request": {"path": "http://evil/"}}), 6, "nightly")


def test_validation_counts_reports_and_records_the_gaps_input_order_needs(tmp_path):
    own = json.dumps({"id": "mine", **json.loads(LINE)})
    path = tmp_path / "jobs.jsonl"
    path.write_text("\n".join([LINE, "", "not json", LINE, own, own, LINE]) + "\n")
    found = validate_file(path, "b")
    assert (found.jobs, found.lines, found.error_count, found.repeated_ids) == (5, 7, 1, 1)
    assert len(found.errors) == 1 and found.errors[0].startswith("line 3: job is not valid JSON")
    assert found.gaps == [[2, 3], [5, 6]]
    assert len(found.ids) == 4 and "mine" in found.ids and line_job_id("b", 7, LINE) in found.ids
    assert line_job_id("b", 2, LINE) not in found.ids


def _result(job_id: str) -> Result:
    return Result(job_id=job_id, status="succeeded")


def test_input_order_holds_only_what_arrives_early_and_skips_known_gaps():
    order = InputOrder(gaps=[[2, 2]])
    ids = {n: line_job_id("b", n, LINE) for n in (1, 3, 4, 5)}
    assert order.push(_result(ids[3])) == [] and order.held == 1        # line 1 not here yet
    assert [r.job_id for r in order.push(_result(ids[1]))] == [ids[1], ids[3]]  # 2 is a known gap
    assert order.push(_result(ids[5])) == [] and order.held == 1
    assert order.push(_result("mine")) == []                              # no line number: last
    assert [r.job_id for r in order.push(_result(ids[4]))] == [ids[4], ids[5]]
    assert [r.job_id for r in order.flush()] == ["mine"]


def test_input_order_without_gap_information_releases_the_rest_in_line_order_at_the_end():
    order = InputOrder()
    ids = [line_job_id("b", n, LINE) for n in (3, 9, 5)]
    for job_id in ids:
        assert order.push(_result(job_id)) == []
    assert [line_of(r.job_id) for r in order.flush()] == [3, 5, 9]


def test_id_set_membership_after_freeze():
    ids = IdSet()
    for n in range(1000):
        ids.add(f"job-{n}")
    ids.add("job-5")
    assert ids.freeze() == 1 and len(ids) == 1000
    assert "job-999" in ids and "job-1000" not in ids


def _send_pass(tmp_path, before: list[str], after: list[str]):
    """Validate `before` (pass 1), then rewrite the file as `after` and read it as pass 2
    does; the Run and the jobs pass 2 would send."""
    from pathlib import Path

    from ratefleet.submit_cmd import _jobs
    from ratefleet.submit_report import Run

    path = tmp_path / "jobs.jsonl"
    path.write_text("".join(line + "\n" for line in before))
    run = Run(file=path, tier="normal", batch="b", wait=True, out=None, url="nats://127.0.0.1:4222",
              prefix="ratefleet")
    run.found = validate_file(path, "b")
    assert run.expected == len(run.found.ids)
    path.write_text("".join(line + "\n" for line in after))
    return run, list(_jobs(run, Path(path)))


def test_lines_gone_between_the_two_passes_are_counted_as_unsent(tmp_path):
    """A file that shrinks while `submit` runs (e.g. `--out` pointed at it, or a rewrite):
    the distinct ids pass 1 validated that pass 2 did not send are `unsent` (then `submit`
    exits 1 and does not wait: `--wait` hung forever on Results that could never come)."""
    lines = [json.dumps({"request": {"path": f"/v1/x/{i}"}}) for i in range(5)]
    run, sent = _send_pass(tmp_path, lines, lines[:2])
    assert len(sent) == 2 and run.unsent == 3
    run, sent = _send_pass(tmp_path, lines, [])
    assert sent == [] and run.unsent == 5


def test_unsent_counts_ids_not_lines_with_repeats_edits_and_invalid_lines(tmp_path):
    """Subtracting edited lines from lost ids undercounted: a line repeating an earlier one's
    id, or an invalid line filled in, is edited without taking an id of pass 1 with it."""
    a = json.dumps({"id": "a", "request": {"path": "/v1/a"}})
    c = json.dumps({"id": "c", "request": {"path": "/v1/c"}})
    x = json.dumps({"id": "x", "request": {"path": "/v1/x"}})
    run, sent = _send_pass(tmp_path, [a, a, c], [a, x])          # c gone, the repeat of a edited
    assert [job.id for job in sent] == ["a"] and run.changed == [2] and run.unsent == 1
    run, sent = _send_pass(tmp_path, [a, "{not json", c], [a, x])  # c gone, the invalid line edited
    assert [job.id for job in sent] == ["a"] and run.unsent == 1


def test_an_edited_line_is_changed_and_unsent_and_an_intact_file_loses_nothing(tmp_path):
    lines = [json.dumps({"request": {"path": f"/v1/x/{i}"}}) for i in range(4)]
    edited = [*lines[:3], json.dumps({"request": {"path": "/v1/other"}})]
    run, sent = _send_pass(tmp_path, lines, edited)
    assert len(sent) == 3 and run.changed == [4] and run.unsent == 1
    run, sent = _send_pass(tmp_path, lines, lines)
    assert len(sent) == 4 and run.changed == [] and run.unsent == 0 and run.expected == 4


def test_repeated_custom_ids_are_counted_by_the_validation_pass(tmp_path):
    """OpenAI's Batch API refuses a file whose custom_ids repeat (so does the gateway's
    /v1/batches); `submit` sent it and wrote two output lines with the same custom_id."""
    def line(custom_id: str, text: str) -> str:
        return json.dumps({"custom_id": custom_id, "method": "POST", "url": "/v1/chat/completions",
                           "body": {"model": "m", "messages": [{"role": "user", "content": text}]}})

    path = tmp_path / "batch.jsonl"
    path.write_text("\n".join([line("c1", "a"), line("c2", "b"), line("c1", "c"), line("c3", "d")]) + "\n")
    found = validate_file(path, "b")
    assert found.jobs == 4 and found.repeated_custom_ids == 1
    path.write_text("\n".join([line("c1", "a"), line("c2", "b")]) + "\n")
    assert validate_file(path, "b").repeated_custom_ids == 0


def test_a_repeated_own_id_is_named_with_its_line_and_the_line_it_repeats(tmp_path):
    """Two lines with one `id` and different requests: the second never runs (JetStream keeps
    the first), and `submit` only said "1 repeat an id of an earlier line"."""
    first = json.dumps({"id": "dup1", "request": {"path": "/v1/a"}})
    other = json.dumps({"id": "ok", "request": {"path": "/v1/b"}})
    again = json.dumps({"id": "dup1", "request": {"path": "/v1/c"}})
    run, sent = _send_pass(tmp_path, [first, other, again, again], [first, other, again, again])
    assert run.found.repeated_ids == 2 and len(run.found.ids.repeated) == 1
    assert run.repeats == [(3, "dup1", 1), (4, "dup1", 1)] and run.unsent == 0


def test_freeze_keeps_the_hashes_of_repeated_ids_only():
    ids = IdSet()
    for job_id in ["a", "b", "a", "c", "c", "c"]:
        ids.add(job_id)
    assert ids.freeze() == 3 and len(ids) == 3
    from ratefleet.batchfile import id_hash
    assert ids.repeated == {id_hash("a"), id_hash("c")}


def test_a_line_longer_than_any_job_is_refused_without_holding_it(tmp_path, monkeypatch):
    """A 200 MB line took 1.2 GB to be refused (a new user's trial); past MAX_LINE_CHARS the
    rest of the line is read and dropped, and the next lines are read as usual."""
    import ratefleet.batchfile as batchfile
    from ratefleet.batchfile import iter_lines

    monkeypatch.setattr(batchfile, "MAX_LINE_CHARS", 1000)
    monkeypatch.setattr(batchfile, "_SKIP_CHARS", 64)
    path = tmp_path / "jobs.jsonl"
    path.write_text(LINE + "\n" + "x" * 5000 + "\n\n" + LINE + "\n" + "y" * 1000 + "\n")
    lines = list(iter_lines(path))
    assert [n for n, _ in lines] == [1, 2, 4, 5]
    assert isinstance(lines[1][1], batchfile.TooLong) and lines[1][1] == "x" * 100
    assert lines[2][1] == LINE and lines[3][1] == "y" * 1000  # exactly the limit (then its newline): read whole
    with pytest.raises(LineError, match=r"line 2: longer than 1,000 characters, more than any job can be"):
        parse_line(lines[1][1], 2, "b")


def test_input_order_holds_what_waits_on_disk_not_in_memory():
    """`--order input` over a file whose lines carry their own ids held every Result in memory
    until the end (a 50,000-line batch: 386 MB against 113 MB in arrival order); one slow early
    line held all that came meanwhile. They wait in a temporary file now, and come back whole."""
    import tracemalloc

    body = "é" * 25_000  # 50 kB of UTF-8 per answer
    order = InputOrder(gaps=[[2, 2]])
    late = line_job_id("b", 1, LINE)
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        for n in range(400):  # 20 MB of answers: own ids (last), and lines held behind line 1
            own = Result(job_id=f"mine-{n}", status="succeeded", response={"status": 200, "body": body + str(n)})
            assert order.push(own) == []  # (each body a string of its own, as each answer is)
            numbered = Result(job_id=line_job_id("b", n + 3, LINE), status="succeeded",
                              response={"status": 200, "body": body + str(n)})
            assert order.push(numbered) == []
        grown = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
    assert order.held == 800 and grown < 2_000_000, grown
    released = list(order.push(_result(late)))
    assert [line_of(r.job_id) for r in released] == [1, *range(3, 403)]
    assert all(r.response.body == body + str(n) for n, r in enumerate(released[1:]))
    rest = list(order.flush())
    assert [r.job_id for r in rest] == [f"mine-{n}" for n in range(400)] and rest[-1].response.body == body + "399"
    assert order.held == 0


def test_input_order_reads_what_one_slow_line_held_back_one_at_a_time_when_it_comes():
    """One slow early line holds every Result that arrives meanwhile (on disk); when it comes,
    push() returned them all at once, read back into one list: the memory the spill file saves
    came back at that moment (400 held 50 kB answers: > 10 MB at once). They are read one at a
    time now, as the caller writes them."""
    import tracemalloc

    body = "é" * 25_000
    order = InputOrder()
    for n in range(2, 402):
        held = Result(job_id=line_job_id("b", n, LINE), status="succeeded",
                      response={"status": 200, "body": body + str(n)})
        assert list(order.push(held)) == []
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        tracemalloc.reset_peak()
        lines = [line_of(r.job_id) for r in order.push(_result(line_job_id("b", 1, LINE)))]
        peak = tracemalloc.get_traced_memory()[1] - before
    finally:
        tracemalloc.stop()
    assert lines == list(range(1, 402)) and order.held == 0
    assert peak < 2_000_000, peak
    late = Result(job_id=line_job_id("b", 403, LINE), status="succeeded", response={"status": 200, "body": "x"})
    assert list(order.push(late)) == []  # the file, started over, still gives back what it holds
    back = order.push(_result(line_job_id("b", 402, LINE)))
    assert [r.response and r.response.body for r in back] == [None, "x"]


def test_input_order_closes_its_spill_file_once_everything_is_flushed():
    """The spill file was never closed: it stayed open as long as its InputOrder, and at
    collection Python warned 'ResourceWarning: unclosed file' (the gateway writes each batch's
    output through one). Once flush() has given everything back the file is closed; a later
    Result held opens a new one."""
    import os

    def open_fds() -> int:
        return len(os.listdir("/proc/self/fd"))

    before = open_fds()
    order = InputOrder()
    assert list(order.push(_result(line_job_id("b", 3, LINE)))) == [] and open_fds() == before + 1
    assert [line_of(r.job_id) for r in order.flush()] == [3]
    assert open_fds() == before
    assert list(order.push(_result(line_job_id("b", 5, LINE)))) == []
    assert [line_of(r.job_id) for r in order.flush()] == [5] and open_fds() == before


@pytest.mark.parametrize("text, byte, at", [
    ('{"request": {"path": "/x", "json": "caf\udce9"}}', "0xe9", 40),  # latin-1 é, as iter_lines keeps it
    ('{"request": {"path": "/x", "json": "ça \udcff"}}', "0xff", 40),  # beside text that is UTF-8
])
def test_a_line_that_is_not_utf8_names_the_byte(text, byte, at):
    with pytest.raises(LineError, match=rf"line 4: not UTF-8 \(byte {byte} at character {at}\)"):
        parse_line(text, 4, "b1")


def test_a_line_that_is_utf8_is_not_scanned_for_undecodable_bytes(monkeypatch):
    """ASCII, and text that encodes as UTF-8, cannot hold one: the regex (about 11 ns a
    character, 360 µs for a 32 KiB line) runs only for a line that fails to encode."""
    from types import SimpleNamespace

    from ratefleet import batchfile

    def refuse(_text):
        raise RuntimeError("scanned")

    monkeypatch.setattr(batchfile, "_UNDECODABLE", SimpleNamespace(search=refuse))
    for text in ('{"request": {"path": "/x"}}', '{"request": {"path": "/x", "json": "été 😀"}}'):
        assert parse_line(text, 1, "b1").batch == "b1"
    with pytest.raises(RuntimeError, match="scanned"):
        parse_line('{"request": {"path": "/x", "json": "caf\udce9"}}', 1, "b1")
