"""The CLI as a user the server does not allow a command (examples/nats-accounts.conf,
real nats-server): the error names the refused subject and the user to use instead, rather
than "no dispatcher answered" or a bare timeout, and `dlq list` does not print an empty list."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import tomli_w
from natsauth_kit import role_nats, start_accounts_server

pytestmark = pytest.mark.timeout(120)


@pytest.fixture
def server(tmp_path):
    nats_server = start_accounts_server(tmp_path)
    yield nats_server
    nats_server.stop()


def config_for(tmp_path, url: str, user: str):
    path = tmp_path / f"{user}.toml"
    path.write_text(tomli_w.dumps({
        "nats": {"url": url, **role_nats(user)},
        "upstreams": {"up": {"base_url": "http://127.0.0.1:9"}},
        "pools": {"p": {"keys": [{"id": "k1", "secret": "env:NOPE_KEY", "rps": 5}]}},
    }))
    return path


def cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "ratefleet", *args], capture_output=True, text=True,
                          timeout=90, env={**os.environ, "NO_COLOR": "1", "COLUMNS": "200"})


def error_line(done: subprocess.CompletedProcess) -> str:
    return next(line for line in done.stderr.splitlines() if line.startswith("error:"))


def test_status_as_producer_names_the_permission_not_a_missing_dispatcher(tmp_path, server):
    producer = config_for(tmp_path, server.url, "producer")
    done = cli("status", "--config", str(producer))
    assert done.returncode == 1
    line = error_line(done)
    assert "permissions violation" in line and "ratefleet.admin.status" in line
    assert "operator user" in line
    assert "producer-pw" not in done.stderr + done.stdout


def test_config_push_as_producer_is_one_line_naming_the_permission(tmp_path, server):
    producer = config_for(tmp_path, server.url, "producer")
    done = cli("config", "push", str(producer))
    assert done.returncode == 1
    line = error_line(done)
    assert "permissions violation" in line and "kv_ratefleet_config" in line.lower()


def test_dlq_list_as_producer_fails_instead_of_an_empty_list(tmp_path, server):
    producer = config_for(tmp_path, server.url, "producer")
    done = cli("dlq", "list", "--config", str(producer))
    assert done.returncode == 1, done.stdout
    assert "dead letters (0)" not in done.stdout
    assert "permissions violation" in error_line(done)


def test_dlq_list_as_operator_without_a_dead_stream_is_empty(tmp_path, server):
    operator = config_for(tmp_path, server.url, "operator")
    done = cli("dlq", "list", "--json", "--config", str(operator))
    assert done.returncode == 0, done.stderr
    assert done.stdout == ""


def test_config_push_connects_as_the_config_option_user_not_as_the_pushed_file_user(tmp_path, server):
    fleet_file = config_for(tmp_path, server.url, "producer")  # the pushed file's own [nats]: refused
    operator = config_for(tmp_path, server.url, "operator")
    done = cli("config", "push", str(fleet_file), "--config", str(operator))
    assert done.returncode == 0, done.stderr
    assert "as config revision 1" in done.stdout
    shown = cli("config", "show", "--json", "--config", str(operator))
    assert shown.returncode == 0, shown.stderr
    assert '"revision": 1' in shown.stdout and "NOPE_KEY" in shown.stdout
