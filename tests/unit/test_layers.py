"""The one import package and its layers (issue: structure).

`.importlinter` holds the contracts: application > dispatcher | workers > runtime > schemas,
nothing below the application imports it, the mock upstream stays apart, the scheduling
core does no I/O. import-linter reads the sources under their installed names through the
symlink tree of tools/package_tree.py (the editable install maps folders with an import
hook that grimp does not run).
"""

from __future__ import annotations

import configparser
import os
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "tools"))
import package_tree  # noqa: E402

LINT = Path(sys.executable).with_name("lint-imports")


def _lint(tree: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(tree)}
    return subprocess.run([str(LINT), str(ROOT / ".importlinter")], cwd=tree, env=env,
                          capture_output=True, text=True, timeout=120)


def test_every_layer_contract_is_kept(tmp_path: Path) -> None:
    run = _lint(package_tree.build(tmp_path))
    assert run.returncode == 0, run.stdout + run.stderr
    assert "Contracts: 4 kept, 0 broken." in run.stdout


def test_an_upward_import_or_io_in_the_core_breaks_the_contracts(tmp_path: Path) -> None:
    tree = package_tree.build(tmp_path / "links")
    copy = tmp_path / "copy"
    shutil.copytree(tree, copy, symlinks=False, ignore=shutil.ignore_patterns("__pycache__"))
    with open(copy / "ratefleet/schemas/subjects.py", "a") as f:
        f.write("\nimport ratefleet.client\n")
    with open(copy / "ratefleet/dispatcher/core/bucket.py", "a") as f:
        f.write("\nimport asyncio\n")
    with open(copy / "ratefleet/workers/body.py", "a") as f:
        f.write("\nimport ratefleet.dispatcher.core\n")
    run = _lint(copy)
    assert run.returncode != 0
    assert "ratefleet.schemas.subjects -> ratefleet.client" in run.stdout
    assert "ratefleet.dispatcher.core.bucket -> asyncio" in run.stdout
    assert "ratefleet.workers.body -> ratefleet.dispatcher.core" in run.stdout


def test_the_contracts_name_every_application_module() -> None:
    """A new module directly in ratefleet/ is application: lower layers must not import it."""
    config = configparser.ConfigParser()
    config.read(ROOT / ".importlinter")
    forbidden = set(config["importlinter:contract:application-on-top"]["forbidden_modules"].split())
    found = {f"ratefleet.{p.stem}" for p in (ROOT / "ratefleet").glob("*.py") if not p.stem.startswith("__")}
    found |= {f"ratefleet.{p.parent.name}" for p in (ROOT / "ratefleet").glob("*/__init__.py")} - {"ratefleet.runtime"}
    assert forbidden == found


def test_pyproject_installs_every_package_folder_under_ratefleet() -> None:
    setuptools = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    mapping = setuptools["package-dir"]
    on_disk = set()
    for package, folder in mapping.items():
        for init in (ROOT / folder).rglob("__init__.py"):
            rel = init.parent.relative_to(ROOT / folder).parts
            on_disk.add(".".join((package, *rel)))
    assert set(setuptools["packages"]) == on_disk


def test_the_mapped_names_are_the_only_names() -> None:
    """Installed under ratefleet.* only: no top-level `schemas`, `dispatcher` or `workers`."""
    code = ("import importlib.util, sys; sys.path = [p for p in sys.path if p not in ('', '.')];"
            "import ratefleet.schemas.job as j, ratefleet.workers.service as w, ratefleet.dispatcher.core as c;"
            "print(j.__file__, w.__file__, c.__file__);"
            "print([n for n in ('schemas', 'dispatcher', 'workers') if importlib.util.find_spec(n)])")
    run = subprocess.run([sys.executable, "-c", code], cwd="/", capture_output=True, text=True, timeout=60)
    assert run.returncode == 0, run.stderr
    files, leaked = run.stdout.splitlines()
    assert files.split() == [str(ROOT / "schemas/job.py"), str(ROOT / "workers/service.py"),
                             str(ROOT / "dispatcher/core/__init__.py")]
    assert leaked == "[]"
