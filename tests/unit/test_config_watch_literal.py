"""`ratefleet up` with a config holding a literal secret (documented as fine for local use):
the file cannot be pushed (a pushed config carries references only), which is a warning that
says what that means, not the error a broken file gets (a new user's finding: every start
logged "config file not pushed: it has errors")."""

from __future__ import annotations

import nats
import pytest
from structlog.testing import capture_logs

from ratefleet.config_watch import push_file
from ratefleet.schemas import Subjects

pytestmark = pytest.mark.anyio
FILE = """
[upstreams.u]
base_url = "http://127.0.0.1:9"

[pools.p]
keys = [{ id = "k1", secret = "sk-literal-123", rps = 5 }]
"""


async def test_a_literal_secret_is_a_warning_that_says_edits_apply_on_a_restart(nats_server, tmp_path):
    path = tmp_path / "ratefleet.toml"
    path.write_text(FILE)
    broken = tmp_path / "broken.toml"
    broken.write_text(FILE.replace("rps = 5", "rps = -5"))
    nc = await nats.connect(nats_server.url)
    try:
        with pytest.warns(UserWarning), capture_logs() as logs:
            assert await push_file(nc.jetstream(), Subjects(), path) is None
            assert await push_file(nc.jetstream(), Subjects(), broken) is None
    finally:
        await nc.close()
    literal, bad = [entry for entry in logs if "not pushed" in entry["event"]]
    assert literal["log_level"] == "warning" and "literal secret" in literal["event"]
    assert "edits apply on a restart" in literal["event"] and "sk-literal-123" not in str(literal)
    assert bad["log_level"] == "error" and "it has errors" in bad["event"]  # a broken file is still an error
