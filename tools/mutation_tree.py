"""Build the installed layout of the one import package as a plain copy, for mutmut.

mutmut copies the folders of `source_paths` into `mutants/`, puts `mutants/` first on
`sys.path` and names each mutant after its file path (`ratefleet/dispatcher/core/key.py` is
module `ratefleet.dispatcher.core.key`). The checkout keeps `schemas/`, `dispatcher/` and
`workers/` beside `ratefleet/` (setuptools `package-dir`), so mutated copies of those folders
would never be imported under their real names: the editable install would serve the
originals. This tool copies the checkout into `DEST` with the installed layout
(`DEST/ratefleet/{schemas,dispatcher,workers}`), plus the tests and the files they read, so
`mutmut run` inside `DEST` mutates and imports the same modules.

Copies keep the source mtime and only changed files are rewritten, so mutmut's cache in
`DEST/mutants/` stays valid between runs; files gone from the checkout are removed.

Usage: python tools/mutation_tree.py DEST   (prints DEST; then `cd DEST && mutmut run`)
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
MAPPED = ("schemas", "dispatcher", "workers")
# what the fast tests read besides the package (config examples, README snippets, tools)
EXTRA = ("tests", "tools", "examples", "bench", "pyproject.toml", "README.md",
         "compose.yaml", "Makefile", "Dockerfile", ".importlinter")
SKIP = {"__pycache__", ".pytest_cache", ".hypothesis", ".mypy_cache", ".ruff_cache"}


def build(dest: Path) -> Path:
    """Sync `dest/` to the installed layout of the checkout; return `dest`.

    `dest/ratefleet/` = `ratefleet/` with `schemas/`, `dispatcher/`, `workers/` inside it;
    `dest/tests/` etc. are plain copies. `dest/mutants/` (mutmut's work) is left alone.
    """
    dest.mkdir(parents=True, exist_ok=True)
    _sync_dir(ROOT / "ratefleet", dest / "ratefleet", skip=set(MAPPED))
    for name in MAPPED:
        _sync_dir(ROOT / name, dest / "ratefleet" / name)
    for name in EXTRA:
        source = ROOT / name
        if source.is_dir():
            _sync_dir(source, dest / name)
        elif source.is_file():
            _sync_file(source, dest / name)
    return dest


def _sync_dir(source: Path, target: Path, skip: set[str] | None = None) -> None:
    target.mkdir(parents=True, exist_ok=True)
    wanted = {entry.name for entry in source.iterdir()
              if entry.name not in SKIP and not entry.name.endswith(".egg-info")}
    for stale in target.iterdir():
        if stale.name not in wanted and stale.name not in (skip or set()):
            shutil.rmtree(stale) if stale.is_dir() and not stale.is_symlink() else stale.unlink()
    for name in sorted(wanted):
        entry = source / name
        if entry.is_dir():
            _sync_dir(entry, target / name)
        else:
            _sync_file(entry, target / name)


def _sync_file(source: Path, target: Path) -> None:
    stat = source.stat()
    if target.exists():
        have = target.stat()
        if have.st_size == stat.st_size and int(have.st_mtime) == int(stat.st_mtime):
            return
    shutil.copy2(source, target)


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: python tools/mutation_tree.py DEST")
    print(build(Path(sys.argv[1])))
