"""Print the survival rate per area of the last `mutmut run` (`make mutants`), and the
survivors of the guarded areas that tests/mutation_survivors.md does not classify.

Reads mutmut's per-file results (`DIR/**/*.py.meta`, DIR default
build/mutation/mutants, the copy tools/mutation_tree.py builds). Survival rate = survived /
(killed + survived + timeout); "no tests" are mutants no fast test reaches (I/O shells
covered by the end-to-end tests only). Exit status 1 when a survivor in dispatcher/core or
the job-lifecycle code is neither killed nor listed in the survivors file. Not a test module.

Usage: python tests/mutation_summary.py [DIR]
"""

from __future__ import annotations

import json
import re
import sys
from collections import Counter
from pathlib import Path

HERE = Path(__file__).resolve().parent
SURVIVORS_FILE = HERE / "mutation_survivors.md"
# (area, path prefix inside the installed layout); the first match wins
AREAS = (
    ("dispatcher/core", "ratefleet/dispatcher/core/"),
    ("job lifecycle", ("ratefleet/runtime/finish.py", "ratefleet/runtime/store.py",
                       "ratefleet/runtime/handbacks.py")),
    ("dispatcher (rest)", "ratefleet/dispatcher/"),
    ("schemas", "ratefleet/schemas/"),
    ("workers", "ratefleet/workers/"),
)
GUARDED = ("dispatcher/core", "job lifecycle")
STATUS = {1: "killed", 3: "killed", 0: "survived", 5: "no tests", 33: "no tests", None: "not checked",
          36: "timeout", 24: "timeout", -24: "timeout", 152: "timeout", 255: "timeout"}
COLUMNS = ("killed", "survived", "timeout", "no tests", "not checked")


def area_of(relative: str) -> str | None:
    for area, prefix in AREAS:
        if relative.startswith(prefix):
            return area
    return None


def collect(root: Path) -> tuple[dict[str, Counter], dict[str, list[str]]]:
    """Counts per area and status, and the surviving mutant names per area."""
    counts: dict[str, Counter] = {area: Counter() for area, _ in AREAS}
    survivors: dict[str, list[str]] = {area: [] for area, _ in AREAS}
    for meta in sorted(root.rglob("*.py.meta")):
        area = area_of(meta.relative_to(root).as_posix()[: -len(".meta")])
        if area is None:
            continue
        for name, code in json.loads(meta.read_text())["exit_code_by_key"].items():
            status = STATUS.get(code, "suspicious")
            counts[area][status] += 1
            if status == "survived":
                survivors[area].append(name)
    return counts, survivors


def listed_survivors(path: Path = SURVIVORS_FILE) -> set[str]:
    """Mutant names (`ratefleet.….x…__mutmut_N`) classified in the survivors file."""
    if not path.exists():
        return set()
    return set(re.findall(r"ratefleet\.[\w.ǁ]+__mutmut_\d+", path.read_text()))


def rate(counter: Counter) -> str:
    tested = counter["killed"] + counter["survived"] + counter["timeout"]
    return f"{100 * counter['survived'] / tested:.1f}%" if tested else "-"


def main(directory: str = "build/mutation/mutants") -> int:
    root = Path(directory)
    if not root.is_dir():
        print(f"no mutmut results in {root}: run `make mutants` first")
        return 1
    counts, survivors = collect(root)
    print(f"{'area':<18} {'mutants':>7} " + " ".join(f"{c:>11}" for c in COLUMNS) + f" {'survival':>9}")
    for area, counter in counts.items():
        total = sum(counter.values())
        print(f"{area:<18} {total:>7} " + " ".join(f"{counter[c]:>11}" for c in COLUMNS)
              + f" {rate(counter):>9}")
    listed = listed_survivors()
    unlisted = [name for area in GUARDED for name in survivors[area] if name not in listed]
    if unlisted:
        print(f"\n{len(unlisted)} survivors in {' and '.join(GUARDED)} not classified in "
              f"{SURVIVORS_FILE.name} (kill them with a test, or list them with the reason):")
        print("\n".join(f"  {name}" for name in unlisted))
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(*sys.argv[1:]))
