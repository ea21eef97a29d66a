"""Build the installed layout of the one import package as a tree of symlinks.

setuptools maps the top-level folders `schemas/`, `dispatcher/` and `workers/` into
`ratefleet.*` with `package-dir` (pyproject.toml); editable installs resolve those names
with an import hook that static tools (import-linter's grimp, mypy) do not run. This tool
links `DEST/ratefleet/` = every entry of `ratefleet/` plus `schemas`, `dispatcher` and
`workers`, so those tools read the real sources under their installed names.

Usage: python tools/package_tree.py DEST   (prints DEST; put DEST first on sys.path/MYPYPATH)
"""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
MAPPED = ("schemas", "dispatcher", "workers")


def build(dest: Path) -> Path:
    """Create (or refresh) `dest/ratefleet/` as symlinks into the checkout; return `dest`."""
    package = dest / "ratefleet"
    package.mkdir(parents=True, exist_ok=True)
    for entry in sorted((ROOT / "ratefleet").iterdir()):
        if entry.name != "__pycache__":
            _link(package / entry.name, entry)
    for name in MAPPED:
        _link(package / name, ROOT / name)
    return dest


def _link(link: Path, target: Path) -> None:
    if link.is_symlink() or link.exists():
        link.unlink()
    link.symlink_to(target)


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: python tools/package_tree.py DEST")
    print(build(Path(sys.argv[1])))
