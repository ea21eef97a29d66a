"""The pieces every `ratefleet` command shares: one-line errors with the right exit code, the
tiers its --tier help lists, credentials masked in NATS URLs."""

from __future__ import annotations

import pytest
import typer

from ratefleet.cli_support import RatefleetApp, configured_tiers, one_line
from ratefleet.runtime.connect import redact_url


def _app() -> RatefleetApp:
    app = RatefleetApp(add_completion=False, rich_markup_mode=None, pretty_exceptions_enable=False)

    @app.command()
    def boom(kind: str = typer.Option("bug", "--kind")):
        if kind == "bug":
            raise RuntimeError("the index went\nnegative")
        if kind == "exit":
            raise typer.Exit(1)
        if kind == "interrupt":
            raise KeyboardInterrupt

    @app.command()
    def fine():
        pass

    return app


@pytest.mark.parametrize("argv, code", [(["boom"], 1), (["boom", "--kind", "exit"], 1),
                                        (["boom", "--kind", "interrupt"], 130), (["fine"], 0),
                                        (["boom", "--nope"], 2), (["boom", "--kind"], 2)])
def test_exit_codes_and_one_line_errors(argv, code, capsys, monkeypatch):
    monkeypatch.delenv("RATEFLEET_DEBUG", raising=False)
    with pytest.raises(SystemExit) as done:
        _app()(argv, prog_name="ratefleet")
    assert done.value.code == code
    err = capsys.readouterr().err
    assert "Traceback" not in err and len(err.strip().splitlines()) <= 1, err
    if argv == ["boom"]:
        assert err.strip() == ("error: unexpected RuntimeError: the index went; negative "
                               "(set RATEFLEET_DEBUG=1 for the traceback)")
    if code == 2:
        assert err.startswith("error: ") and "(see `ratefleet" in err and err.rstrip().endswith("--help`)")


def test_debug_shows_the_real_exception(monkeypatch):
    monkeypatch.setenv("RATEFLEET_DEBUG", "1")
    with pytest.raises(RuntimeError, match="negative"):
        _app()(["boom"], prog_name="ratefleet")


def test_one_line_joins_a_multi_line_message():
    assert one_line("invalid configuration:\n  f: a: bad\n  f: b: worse\n") == "invalid configuration: f: a: bad; f: b: worse"


def test_tiers_for_help_come_from_the_config_named_on_the_command_line(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("RATEFLEET_CONFIG", raising=False)
    assert configured_tiers([]) == (("vip", "premium", "normal", "guest"), "default tiers")
    (tmp_path / "a.toml").write_text("[tiers.hot]\nweight = 3\n[tiers.cold]\n")
    (tmp_path / "broken.toml").write_text("[tiers\n")
    for argv in (["submit", "--config", "a.toml"], ["submit", "--config=a.toml"], ["-c", "a.toml"]):
        assert configured_tiers(argv)[0] == ("hot", "cold")
    monkeypatch.setenv("RATEFLEET_CONFIG", "a.toml")
    assert configured_tiers([])[0] == ("hot", "cold")
    for argv in (["--config", "broken.toml"], ["--config", "missing.toml"]):  # help must still render
        assert configured_tiers(argv)[0] == ("vip", "premium", "normal", "guest")


@pytest.mark.parametrize("url, shown", [
    ("nats://alice:pw@h:4222", "nats://alice:***@h:4222"),
    ("nats://s3cr3t-token@h:4222", "nats://***@h:4222"),
    ("nats://a:b@h1:1,nats://c:d@h2:2", "nats://a:***@h1:1,nats://c:***@h2:2"),
    ("nats://127.0.0.1:4222", "nats://127.0.0.1:4222"),
])
def test_nats_credentials_are_masked(url, shown):
    assert redact_url(url) == shown


def test_a_fifo_as_input_file_is_named_for_what_it_is(tmp_path, capsys):
    """A FIFO was reported as "cannot be read; check its permissions"."""
    import os

    import typer

    from ratefleet.cli_support import require_file

    fifo = tmp_path / "jobs.jsonl"
    os.mkfifo(fifo)
    with pytest.raises(typer.Exit) as exit_info:
        require_file(fifo, "jobs file")
    assert exit_info.value.exit_code == 2
    err = capsys.readouterr().err
    assert "is not a regular file (a pipe, socket or device)" in err and "permissions" not in err, err


def test_printed_next_commands_carry_the_config_that_holds_the_nats_credentials(tmp_path, monkeypatch):
    """`submit` prints the command that collects or resumes its batch (and `results`/`cancel` theirs):
    with the NATS user in the config's [nats] it must name that config, else the printed command
    connects as nobody and the server refuses it (an operator's trial with examples/nats-accounts.conf:
    `Authorization Violation`). Without credentials nothing changes."""
    from pathlib import Path

    from ratefleet.cli_support import client_target
    from ratefleet.submit_report import Run

    monkeypatch.delenv("RATEFLEET_NATS_URL", raising=False)
    monkeypatch.delenv("RATEFLEET_CONFIG", raising=False)
    secured = tmp_path / "producer.toml"
    secured.write_text('[nats]\nurl = "nats://127.0.0.1:4333"\nuser = "producer"\npassword = "env:NP"\n'
                       'inbox_prefix = "_INBOX.producer"\n')
    plain = tmp_path / "plain.toml"
    plain.write_text('[nats]\nurl = "nats://127.0.0.1:4333"\n')
    target = client_target(secured, None)
    assert target.config_args == ("--config", str(secured))
    assert client_target(plain, None).config_args == ()
    run = Run(file=Path("jobs.jsonl"), tier="normal", batch="b1", wait=True, out=None, url=target.url,
              prefix=target.prefix, config_args=target.config_args)
    assert f"--config {secured}" in run.results_command()
    assert f"--config {secured}" in run.submit_command()
    bare = Run(file=Path("jobs.jsonl"), tier="normal", batch="b1", wait=True, out=None, url=target.url,
               prefix=target.prefix)
    assert "--config" not in bare.results_command()


def test_a_refused_reply_inbox_is_named_as_the_cause_and_the_answer_is_not_trusted(monkeypatch, capsys):
    """With credentials in the URL (no inbox_prefix possible) under examples/nats-accounts.conf,
    `ratefleet result ID` printed 'NATS refused this user _inbox.X.* ...: status, keys, dlq ... need
    the operator user; then: no Result stored for job ID' and exited 2 ("none stored"): a wrong
    hint and a false answer. The hint now names inbox_prefix, and the exit is 1."""
    import ratefleet.runtime.connect as connect
    from ratefleet.cli_support import fail

    monkeypatch.setattr(connect, "_DENIED", ["_inbox.abc123.*"])
    with pytest.raises(typer.Exit) as done:
        fail("no Result stored for job x1")
    assert done.value.exit_code == 1
    err = capsys.readouterr().err
    assert "inbox_prefix" in err and "need the operator user" not in err
    monkeypatch.setattr(connect, "_DENIED", [])
    with pytest.raises(typer.Exit) as done:
        fail("no Result stored for job x1")
    assert done.value.exit_code == 2


def test_a_refused_subjects_timeout_is_not_said_to_be_a_nats_that_is_down(monkeypatch, capsys):
    """An operations trial: `dlq list` as the producer read "NATS refused this user ...; then: NATS
    did not answer or the connection was lost ... check that NATS runs": NATS ran; the refusal was all."""
    import nats.errors

    import ratefleet.runtime.connect as connect
    from ratefleet.cli_support import fail
    from ratefleet.runtime.edge import translate

    timeout = translate(nats.errors.TimeoutError(), "reading dead letters")
    monkeypatch.setattr(connect, "_DENIED", ["$js.api.stream.info.ratefleet_dead"])
    with pytest.raises(typer.Exit):
        fail(str(timeout), 1)
    err = capsys.readouterr().err
    assert "NATS refused this user $js.api.stream.info.ratefleet_dead (permissions violation)" in err
    assert err.rstrip().endswith("then: the command could not go on without it") and "NATS runs" not in err, err
    with pytest.raises(typer.Exit):  # a connection really lost after the refusal keeps its own advice (a review)
        fail(str(translate(nats.errors.ConnectionClosedError(), "reading dead letters")), 1)
    assert "check that NATS runs" in capsys.readouterr().err
    monkeypatch.setattr(connect, "_DENIED", [])
    with pytest.raises(typer.Exit):
        fail(str(timeout), 1)
    assert "check that NATS runs" in capsys.readouterr().err  # without a refusal, the timeout's own advice
