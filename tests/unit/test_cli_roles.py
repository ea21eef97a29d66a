"""A fleet process (`ratefleet up|dispatcher|worker|gateway`) runs through ratefleet/cli_roles.py's
app of those commands alone, so it does not import the client commands' modules; the commands,
their options and their help are the same as in the whole CLI."""

from __future__ import annotations

import subprocess
import sys

import pytest
import typer

from ratefleet.cli import app
from ratefleet.cli_roles import ROLE_COMMANDS, role_app

# imported by `python -m ratefleet ARGV`, then whether each module is loaded
_PROBE = ("import sys\n"
          "sys.argv = ['ratefleet', *sys.argv[1:]]\n"
          "from ratefleet.__main__ import main\n"
          "try:\n    main()\nexcept SystemExit:\n    pass\n"
          "names = ('ratefleet.cli', 'ratefleet.client', 'ratefleet.results_cmd', 'ratefleet.keys_cmd', "
          "'ratefleet.config_cmd', 'ratefleet.submit_report', 'tomlkit')\n"
          "print(sorted(name for name in names if name in sys.modules), file=sys.stderr)\n")


def _loaded(*argv: str) -> str:
    done = subprocess.run([sys.executable, "-c", _PROBE, *argv], capture_output=True, text=True, timeout=120)
    return done.stderr.strip().splitlines()[-1]


def test_a_role_process_does_not_import_the_client_commands():
    for role in sorted(ROLE_COMMANDS):
        assert _loaded(role, "--help") == "[]", role


def test_every_other_command_line_gets_the_whole_cli():
    assert "ratefleet.cli" in _loaded("--version")
    assert "ratefleet.cli" in _loaded("status", "--help")
    assert "ratefleet.cli" in _loaded("--help")


def _commands(typer_app: typer.Typer) -> dict:
    group = typer.main.get_command(typer_app)
    return {name: group.commands[name] for name in group.commands}


def test_the_role_commands_are_the_whole_clis_with_the_same_options():
    whole, roles = _commands(app), _commands(role_app())
    assert set(roles) == ROLE_COMMANDS
    for name in ROLE_COMMANDS:
        assert roles[name].callback is not None
        assert [p.opts for p in roles[name].params] == [p.opts for p in whole[name].params], name
        assert [p.default for p in roles[name].params] == [p.default for p in whole[name].params], name
        assert roles[name].help == whole[name].help, name
    # the group's own option (--version) is on both
    assert [p.opts for p in typer.main.get_command(role_app()).params] == \
        [p.opts for p in typer.main.get_command(app).params]


def _answer(typer_app: typer.Typer, argv: list[str], capsys) -> tuple[object, str, str]:
    """(exit code, stdout, stderr) of `ratefleet ARGV` run by `typer_app` in this process."""
    try:
        typer_app(args=argv, prog_name="ratefleet")
        code: object = 0
    except SystemExit as stop:
        code = stop.code
    out = capsys.readouterr()
    return code, out.out, out.err


@pytest.mark.parametrize("argv", [
    ["worker", "--help"], ["dispatcher", "--help"], ["up", "--help"], ["gateway", "--help"],
    ["worker", "--bogus"], ["worker", "--slots", "0"], ["dispatcher", "--http", "no-port"],
    ["up", "--workers", "-1"], ["gateway", "--config", "/nonexistent/ratefleet.toml"], ["worker", "extra"],
])
def test_both_apps_answer_a_role_command_line_alike(argv, capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "100")
    whole = _answer(app, argv, capsys)
    assert whole[0] != 1 and (whole[1] or whole[2])  # (help, or a usage or input error: nothing ran)
    assert _answer(role_app(), argv, capsys) == whole


def test_a_role_usage_error_reads_as_in_the_whole_cli():
    done = subprocess.run([sys.executable, "-m", "ratefleet", "worker", "--bogus"], capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 2
    assert done.stderr.strip() == "error: No such option: --bogus (see `ratefleet worker --help`)"
