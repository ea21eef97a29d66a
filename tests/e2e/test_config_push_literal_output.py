"""`ratefleet config push` of a file holding a literal secret: refused with exit 2 and one
`error:` line naming the field, without a Python UserWarning (source path and code line) on
stderr, and never the secret itself. No NATS needed: the file is refused before connecting.
Also `ratefleet config check` without FILE: $RATEFLEET_CONFIG, as every other command."""

from __future__ import annotations

import os
import subprocess
import sys

import tomli_w


def test_push_of_a_literal_secret_prints_one_error_line_and_no_python_warning(tmp_path):
    path = tmp_path / "fleet.toml"
    path.write_text(tomli_w.dumps({
        "nats": {"url": "nats://127.0.0.1:9"},
        "upstreams": {"up": {"base_url": "http://127.0.0.1:9"}},
        "pools": {"p": {"keys": [{"id": "k1", "secret": "sk-literal-XYZ123", "rps": 5}]}},
    }))
    done = subprocess.run([sys.executable, "-m", "ratefleet", "config", "push", str(path)], capture_output=True,
                          text=True, timeout=60, env={**os.environ, "NO_COLOR": "1", "COLUMNS": "300"})
    assert done.returncode == 2
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, done.stderr
    assert lines[0].startswith("error:") and "pools.p.keys.0.secret" in lines[0]
    assert "UserWarning" not in done.stderr and "sk-literal-XYZ123" not in done.stderr + done.stdout


def test_config_check_without_file_checks_ratefleet_config(tmp_path):
    path = tmp_path / "fleet.toml"
    path.write_text(tomli_w.dumps({
        "upstreams": {"up": {"base_url": "http://127.0.0.1:9"}},
        "pools": {"p": {"keys": [{"id": "k1", "secret": "env:K1", "rps": 0}]}},
    }))
    env = {**os.environ, "NO_COLOR": "1", "COLUMNS": "300", "RATEFLEET_CONFIG": str(path)}
    done = subprocess.run([sys.executable, "-m", "ratefleet", "config", "check"], capture_output=True, text=True,
                          timeout=60, env=env, cwd=tmp_path)
    assert done.returncode == 2
    assert "fleet.toml: pools.p.keys.0.rps: Input should be greater than 0" in done.stderr
    env.pop("RATEFLEET_CONFIG")
    done = subprocess.run([sys.executable, "-m", "ratefleet", "config", "check"], capture_output=True, text=True,
                          timeout=60, env=env, cwd=tmp_path)
    assert done.returncode == 2 and "no config file to check" in done.stderr
