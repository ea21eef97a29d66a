"""Print the survival rate of the last `mutmut run` (`make mutants`), from the stats file
`mutmut export-cicd-stats` writes (mutants/mutmut-cicd-stats.json). Not a test module."""

from __future__ import annotations

import json
import sys
from pathlib import Path


def main(path: str = "mutants/mutmut-cicd-stats.json") -> int:
    stats = json.loads(Path(path).read_text())
    tested = stats["killed"] + stats["survived"] + stats["timeout"]
    rate = 100 * stats["survived"] / tested if tested else 0.0
    print(f"mutants: {stats['total']}  killed: {stats['killed']}  survived: {stats['survived']}  "
          f"timeout: {stats['timeout']}  no test: {stats['no_tests']}  survival: {rate:.1f}% of tested")
    return 0


if __name__ == "__main__":
    sys.exit(main(*sys.argv[1:]))
