"""Small things a new user's first hour tripped on, each with the CLI itself (typer's runner)."""

from __future__ import annotations

import nats.errors
import pytest
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


@pytest.mark.parametrize("value", ["5m", "30s", "0", "-1", "nan", "inf"])
@pytest.mark.parametrize("command", ["submit", "results"])
def test_a_wait_nats_s_that_is_not_seconds_is_a_usage_error_before_anything_is_sent(tmp_path, monkeypatch,
                                                                                      value, command):
    """Before: any value float() refused (or one not above 0) silently meant 300 s."""
    monkeypatch.setenv("RATEFLEET_WAIT_NATS_S", value)
    jobs = tmp_path / "jobs.jsonl"
    jobs.write_text('{"upstream": "mock", "request": {"path": "/v1/chat/completions", "json": {}}}\n')
    argv = ["submit", str(jobs), "--tier", "vip"] if command == "submit" else ["results", "--batch", "b1"]
    run = CliRunner().invoke(app, [*argv, "--wait", "--nats", "nats://127.0.0.1:1"])
    assert run.exit_code == 2, run.output
    assert f"$RATEFLEET_WAIT_NATS_S='{value}' is not a number of seconds above 0" in run.output
    assert "RATEFLEET_WAIT_NATS_S=600 or unset it" in run.output
    assert "NATS" not in run.output.split("unset it")[1]  # nothing tried to connect


@pytest.mark.parametrize(("value", "seconds"), [("", 300.0), (" 12.5 ", 12.5), ("600", 600.0)])
def test_wait_nats_s_reads_seconds_and_defaults_when_unset_or_empty(monkeypatch, value, seconds):
    from ratefleet.cli_support import wait_nats_s

    monkeypatch.setenv("RATEFLEET_WAIT_NATS_S", value)
    assert wait_nats_s() == seconds


def test_a_job_on_standard_input_that_is_not_utf8_is_named_so():
    """As a job file is; before, `ratefleet request -` said "lone UTF-16 surrogate U+DCFF" (and with
    the byte in the id, "id: Input should be a valid string"): a break-it trial's finding."""
    job = b'{"request": {"path": "/v1/chat/completions", "json": {"x": "\xff"}}}'
    run = CliRunner().invoke(app, ["request", "--tier", "vip", "-", "--nats", "nats://127.0.0.1:1"], input=job)
    assert run.exit_code == 2, run.output
    assert "the job on standard input is not UTF-8 (byte 0xff at byte 61)" in run.output
    assert "surrogate" not in run.output
