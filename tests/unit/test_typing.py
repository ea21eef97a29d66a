"""The typing gate of `make lint`, as a test: mypy --strict over ratefleet.schemas (the
contract) and ratefleet.dispatcher.core (the scheduling core, every module in it), configured
in pyproject.toml [tool.mypy]. It runs the very commands of the Makefile's lint target, so a
type error fails `pytest` too, not only `make lint`."""

from __future__ import annotations

import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
GATED = ["ratefleet.schemas", "ratefleet.dispatcher.core"]


def _mypy_config() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["mypy"]


def test_the_gate_covers_the_contract_and_the_whole_core_strictly():
    config = _mypy_config()
    assert config["strict"] is True and config["packages"] == GATED
    makefile = (ROOT / "Makefile").read_text()
    lint = makefile[makefile.index("\nlint:"):].split("\n\n")[0]
    assert "tools/package_tree.py .typecheck" in lint and "$(BIN)/mypy" in lint


@pytest.mark.timeout(600)  # a cold mypy run takes ~15 s alone, minutes on a loaded machine
def test_mypy_strict_is_clean_over_schemas_and_the_core():
    subprocess.run([sys.executable, "tools/package_tree.py", ".typecheck"], cwd=ROOT, check=True,
                   capture_output=True)
    run = subprocess.run([sys.executable, "-m", "mypy"], cwd=ROOT, capture_output=True, text=True)
    assert run.returncode == 0, f"mypy --strict found type errors:\n{run.stdout}\n{run.stderr}"
    # the gate really read the code: every module of both packages was checked
    modules = sum(1 for package in ("schemas", "dispatcher/core") for _ in (ROOT / package).rglob("*.py"))
    assert f"no issues found in {modules} source files" in run.stdout, run.stdout
