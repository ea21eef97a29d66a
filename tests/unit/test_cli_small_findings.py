"""Small things a new user's first hour tripped on, each with the CLI itself (typer's runner)."""

from __future__ import annotations

import nats.errors
from typer.testing import CliRunner

from ratefleet.cli import app
from ratefleet.status_watch import _failed_frame


def test_out_without_wait_says_nothing_is_written_now_and_what_writes_it(tmp_path):
    jobs = tmp_path / "jobs.jsonl"
    jobs.write_text('{"request": {"path": "/v1/chat/completions", "json": {}}}\n')
    run = CliRunner().invoke(app, ["submit", str(jobs), "--tier", "vip", "--out", str(tmp_path / "r.jsonl"),
                                   "--nats", "nats://127.0.0.1:1"])
    assert "without --wait nothing is written to" in run.output and "`ratefleet results` command" in run.output
    waited = CliRunner().invoke(app, ["submit", str(jobs), "--tier", "vip", "--out", str(tmp_path / "r.jsonl"),
                                      "--wait", "--nats", "nats://127.0.0.1:1"])
    assert "nothing is written" not in waited.output


def test_a_negative_dlq_limit_is_a_usage_error():
    run = CliRunner().invoke(app, ["dlq", "list", "--limit", "-1", "--nats", "nats://127.0.0.1:1"])
    assert run.exit_code == 2 and "--limit" in run.output


def test_an_error_without_a_message_is_shown_by_its_name_alone():
    assert "(TimeoutError)" in _failed_frame(TimeoutError(), 2.0).plain  # not "(TimeoutError: )"
    assert "(TimeoutError: nats: timeout)" in _failed_frame(nats.errors.TimeoutError(), 2.0).plain
    assert "(ValueError: bad)" in _failed_frame(ValueError("bad"), 2.0).plain


def test_a_batch_name_that_is_an_option_is_refused_before_anything_is_sent(tmp_path):
    """A nightly-batch trial: `submit jobs.jsonl --batch $B --wait` with B empty took "--wait" as the
    batch name and stored 20,000 jobs again under it (its follow-up command was
    `results --batch --wait --wait`)."""
    jobs = tmp_path / "jobs.jsonl"
    jobs.write_text('{"request": {"path": "/v1/chat/completions", "json": {}}}\n')
    for argv in (["submit", str(jobs), "--batch", "--wait"], ["results", "--batch", "--wait"],
                 ["cancel", "--batch", "--wait"], ["dlq", "list", "--batch", "--out"],
                 ["dlq", "replay", "--batch", "--keep"]):
        run = CliRunner().invoke(app, [*argv, "--nats", "nats://127.0.0.1:1"])
        assert run.exit_code == 2, (argv, run.output)
        assert "is an option, not a batch name: was a variable after --batch empty?" in run.output, argv
