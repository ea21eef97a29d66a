"""`ratefleet demo`'s summary states one median queue wait per tier: the table and the closing
sentence give the same number (it used to print the upper-middle value in one and the mean of
the two middle values, with never-called jobs counted as 0 ms, in the other)."""

from __future__ import annotations

import io
import re
from types import SimpleNamespace

from rich.console import Console

from ratefleet.demo import _summary


def _result(queued_ms):
    return SimpleNamespace(status="succeeded", ok=True, timings=SimpleNamespace(queued_ms=queued_ms))


def test_the_table_and_the_sentence_give_the_same_median_per_tier():
    results = {"demo-vip": [_result(10.0), _result(20.0)],
               "demo-guest": [_result(100.0), _result(None), _result(300.0), _result(500.0)]}
    out = io.StringIO()
    console = Console(file=out, width=200, color_system=None)
    assert _summary(console, results, {"keys": {}}, total=6, elapsed=1.0) == 0
    text = out.getvalue()
    rows = {m.group(1): m.group(2) for m in re.finditer(r"│ (vip|guest)\s+│ \d+\s+│ (\d+)", text)}
    sentence = re.search(r"vip jobs waited (\d+) ms \(median\) while the guest flood before them waited (\d+) ms", text)
    assert rows == {"vip": "15", "guest": "300"}, text
    assert sentence and sentence.groups() == ("15", "300"), text
