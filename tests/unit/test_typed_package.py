"""The installed package says it is typed (PEP 561), so an application's mypy or pyright reads
the Client's hints. Before: no `py.typed`, and mypy --strict on a service using the Client typed
every ratefleet name as Any ("missing library stubs or py.typed marker"): `client.request`
revealed `Any` instead of `(...) -> Coroutine[Any, Any, Result]`."""

from __future__ import annotations

import tomllib
from pathlib import Path

import ratefleet

ROOT = Path(__file__).resolve().parents[2]


def test_the_package_ships_its_py_typed_marker():
    assert (Path(ratefleet.__file__).parent / "py.typed").is_file()
    setuptools = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    assert "py.typed" in setuptools["package-data"]["ratefleet"]  # and into the wheel
