"""Pure parts of the new-user CLI fixes: error unwrapping, closed pipes, table widths and cells,
the resume command of an interrupted send, replay bookkeeping."""

from __future__ import annotations

from pathlib import Path

from rich.console import Console

from ratefleet.batchfile import Validation
from ratefleet.cli_support import PIPE_WIDTH, is_broken_pipe, make_console, unwrap_group
from ratefleet.results_replays import Replays
from ratefleet.status_view import render_status
from ratefleet.submit_report import Run, report_interrupt


class Said:
    def __init__(self) -> None:
        self.lines: list[str] = []

    def print(self, text: str, **_) -> None:
        self.lines.append(text)


def test_one_error_groups_are_named_by_their_error():
    inner = ValueError("bad")
    assert unwrap_group(ExceptionGroup("x", [ExceptionGroup("y", [inner])])) is inner
    two = ExceptionGroup("x", [ValueError("a"), KeyError("b")])
    assert unwrap_group(two) is two


def test_broken_pipe_alone_or_in_groups_is_quiet_other_errors_are_not():
    assert is_broken_pipe(BrokenPipeError())
    assert is_broken_pipe(ExceptionGroup("tg", [ExceptionGroup("inner", [BrokenPipeError()])]))
    assert not is_broken_pipe(ExceptionGroup("tg", [BrokenPipeError(), ValueError("real")]))
    assert not is_broken_pipe(ValueError("x"))


def test_console_not_a_terminal_is_wide_unless_columns_says(monkeypatch):
    monkeypatch.delenv("COLUMNS", raising=False)
    assert make_console().width == PIPE_WIDTH  # pytest's stdout is not a terminal
    monkeypatch.setenv("COLUMNS", "100")
    assert make_console().width == 100


def test_status_cells_show_dash_for_missing_and_keep_ids_whole():
    console = Console(record=True, width=80)
    key = {"pool": "p", "rps": 20, "effective_rps": 2, "tokens": 1.0, "cost_tokens": None, "in_flight": 0,
           "breaker": "closed", "cooldown_s": 0, "calls": 3, "ok": 3, "rate_limited": 0, "errors": 0}
    render_status({"leader": "d1", "keys": {"openai-primary-key-1": key}}, console)
    text = console.export_text()
    assert "None" not in text and "po…" not in text
    assert ("openai-primary-key-1: pool p, req/s effective / configured 2 / 20, req tokens 1.0, "
            "token budget left / per min -") in text
    wide = Console(record=True, width=PIPE_WIDTH)
    render_status({"leader": "d1", "keys": {"openai-primary-key-1": key}}, wide)
    assert "│ openai-primary-key-1 │ p " in wide.export_text() and "None" not in wide.export_text()


def test_status_of_a_leader_still_taking_over_says_so():
    console = Console(record=True, width=120)
    render_status({"leader": "d2", "starting": True}, console)
    assert "leader: d2 (taking over: loading key states; ask again in a moment)" in console.export_text()
    settled = Console(record=True, width=120)
    render_status({"leader": "d2", "keys": {}}, settled)
    assert "taking over" not in settled.export_text()


def test_status_names_a_workers_unusable_keys_and_the_standby_dispatchers():
    """A worker started without its keys' secrets showed `up` with 0 calls; why was only in
    --json (a new user's finding), as were the standby dispatchers."""
    console = Console(record=True, width=200)
    worker = {"id": "w1", "slots": 4, "in_flight": 0, "calls": 0, "config_revision": 2,
              "unusable_keys": {"k2": "LOCAL_KEY_2 not set", "k1": "LOCAL_KEY_1 not set"}}
    render_status({"leader": "d1", "workers": [worker, {**worker, "id": "w2", "unusable_keys": {}}],
                   "dispatchers": [{"id": "d1", "leader": True, "last_seen_s": 0.1},
                                   {"id": "d2", "leader": False, "last_seen_s": 0.4}]}, console)
    text = console.export_text()
    assert "worker w1 cannot call with 2 keys (k1: LOCAL_KEY_1 not set; k2: LOCAL_KEY_2 not set)" in text, text
    assert "worker w2 cannot" not in text
    assert "standby dispatchers: d2 (seen 0.4 s ago)" in text and "d1 (seen" not in text


def test_interrupt_while_sending_prints_the_command_with_the_batch():
    run = Run(file=Path("jobs.jsonl"), tier="normal", batch="submit-20260101T000000-abcdef", wait=True,
              out=Path("r1.jsonl"), url="nats://127.0.0.1:4222", prefix="ratefleet", found=Validation(jobs=10),
              stored=4, fresh=4)
    said = Said()
    report_interrupt(run, said)
    text = "\n".join(said.lines)
    assert ("ratefleet submit jobs.jsonl --tier normal --batch submit-20260101T000000-abcdef --wait --out r1.jsonl"
            in text)
    assert "ratefleet results --batch submit-20260101T000000-abcdef" in text


def test_a_replay_of_a_replay_stands_for_the_first_line():
    replays = Replays()
    assert replays.add("a-1-0123456789", None) is None
    assert replays.add("x-ra", "a-1-0123456789") is None  # not `<original>-r...`: not a replay
    assert replays.add("a-1-0123456789-r1", "a-1-0123456789") == "a-1-0123456789"
    assert replays.add("a-1-0123456789-r1-r2", "a-1-0123456789-r1") == "a-1-0123456789"
    assert replays.latest == {"a-1-0123456789": "a-1-0123456789-r1-r2"}


def test_dlq_list_keeps_job_ids_and_reasons_whole_at_80_and_200_columns():
    from ratefleet.dlq import render_dead

    job_id = "submit-20261129T093441-abcdef-1234-0123456789"
    message = "upstream answered 400 Bad Request: the model field is required and must be a string"
    letters = [(12, {"job_id": job_id, "tier": "normal", "attempts": 3, "job": {"id": job_id},
                     "reason": {"code": "upstream_status", "message": message}})]
    for width in (80, 200):
        console = Console(record=True, width=width)
        render_dead(letters, console)
        text = console.export_text()
        assert job_id in text and "…" not in text, text
        assert message in " ".join(text.split()) or message in text


def test_status_shows_a_closed_key_that_last_answered_429():
    """A timeout's `no_key_ready` sends the reader to `ratefleet status`; a key between two
    cooldowns (cooldown 0, breaker closed) that keeps answering 429 read there as plain closed."""
    key = {"pool": "p", "rps": 20, "effective_rps": 2, "tokens": 1.0, "in_flight": 0, "breaker": "closed",
           "cooldown_s": 0, "calls": 3, "ok": 0, "rate_limited": 3, "errors": 0, "throttled": True}
    wide = Console(record=True, width=PIPE_WIDTH)
    render_status({"leader": "d1", "keys": {"k1": key, "k2": {**key, "throttled": False}}}, wide)
    rows = [line for line in wide.export_text().splitlines() if line.startswith("│ k")]
    assert "rate limited" in rows[0] and "rate limited" not in rows[1] and rows[1].rstrip(" │").endswith("ok"), rows
