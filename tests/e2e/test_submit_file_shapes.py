"""Files that are JSON but not JSONL (a new user's trial: a pretty-printed array gave 342
`not valid JSON` lines and nothing to say the file must hold one job per line): refused, with
the shape named and a command that converts it."""

from __future__ import annotations

import json

import nats
import pytest
from faultkit import cli_side_by_side

from ratefleet.runtime.streams import ensure_topology
from ratefleet.schemas.config import parse_config

# a hang guard: five CLI runs side by side, each up to 100 s; one interpreter start-up alone took
# 11-29 s on a loaded 2-core machine, and past 60 s with three copies of this test starting
# fifteen at once beside a full suite run (19 s for the whole test on its own)
pytestmark = [pytest.mark.anyio, pytest.mark.timeout(150)]
JOB = {"request": {"path": "/v1/chat/completions", "json": {"model": "m"}}}


async def test_an_array_or_pretty_printed_file_is_named_for_what_it_is(nats_server, tmp_path):
    nc = await nats.connect(nats_server.url)
    try:
        await ensure_topology(nc.jetstream(), parse_config({}))
    finally:
        await nc.close()
    shapes = {"array.json": (json.dumps([JOB, JOB], indent=2), "looks like one JSON array", "jq -c '.[]'"),
              "pretty.json": (json.dumps(JOB, indent=2) + "\n" + json.dumps(JOB, indent=2), "looks like pretty-printed JSON",
                              "jq -c ."),
              "one_line_array.json": (json.dumps([JOB]), "looks like one JSON array", "jq -c '.[]'")}
    for name, (text, _shape, _fix) in shapes.items():
        (tmp_path / name).write_text(text + "\n")
    long_line = tmp_path / "long.jsonl"  # one line cut at the look-ahead: not "pretty-printed" (a reviewer's find)
    long_line.write_text('{"request": {"path": "/v1/x", "json": {"a": "' + "y" * 1_100_000 + '"}}}\n')
    good = tmp_path / "good.jsonl"
    good.write_text(json.dumps(JOB) + "\n" + "{not json\n")
    # each file on its own: the five submits run at once
    *done_shapes, refused, mixed = cli_side_by_side(
        *[("submit", str(tmp_path / name), "--tier", "normal", "--nats", nats_server.url) for name in shapes],
        ("submit", str(long_line), "--tier", "normal", "--nats", nats_server.url),
        ("submit", str(good), "--tier", "normal", "--nats", nats_server.url), timeout=100)
    for (name, (_text, shape, fix)), done in zip(shapes.items(), done_shapes, strict=True):
        assert done.returncode == 2, (name, done.stderr)
        assert shape in done.stderr and fix in done.stderr and "one job" in done.stderr, (name, done.stderr)
    assert refused.returncode == 2 and "looks like" not in refused.stderr, refused.stderr[-500:]
    assert mixed.returncode == 2 and "looks like" not in mixed.stderr  # a JSONL file with a bad line: no hint
