"""`config push`'s report of where the pushed revision runs (ratefleet/config_applied.py), read
from status answers shaped like the leader's."""

from __future__ import annotations

import pytest

from ratefleet.config_applied import Applied, describe


def status(leader_revision, *workers, starting=False, keys=None) -> dict:
    return {"leader": "d1", "starting": starting, "config_revision": leader_revision,
            "workers": [{"id": f"w{i}", "config_revision": r} for i, r in enumerate(workers, 1)], "keys": keys or {}}


def test_the_revision_everywhere_or_who_is_behind():
    assert Applied.of(3, status(3, 3, 4)).everywhere  # a later revision counts
    lagging = Applied.of(3, status(3, 3, 2, None))
    assert not lagging.everywhere and lagging.behind == [("w2", 2), ("w3", None)]
    assert describe(lagging, 10) == ["worker w2 still runs revision 2 after 10s: its log says why",
                                     "worker w3 still runs its local file after 10s: its log says why"]
    refused = describe(Applied.of(3, status(2, 3)), 10)
    assert refused == ["the leader (d1) still runs revision 2 after 10s: its log says why (a config it cannot "
                       "apply is logged there and the running one stays)"]


def test_no_leader_yet_and_keys_without_a_secret():
    for answer in (None, status(3, starting=True), {"leader": None}):
        seen = Applied.of(3, answer)
        assert seen.leader is None and not seen.everywhere
        assert describe(seen, 5)[0].startswith("no dispatcher answered within 5s: the fleet applies revision 3")
    keys = {"k1": {"secret_missing": None}, "k2": {"secret_missing": "K2 not set"}}
    lines = describe(Applied.of(3, status(3, keys=keys)), 10)
    assert lines == ["applied: the leader (d1) runs it; no worker is up",
                     "warning: key k2 is out of rotation: no worker can call with it (K2 not set); give the workers "
                     "its secret (`ratefleet status` shows when one has it)"]
    assert describe(Applied(3, absent=True), 10) == ["no dispatcher is running: the fleet applies revision 3 when it "
                                                     "starts"]


def test_a_fleet_file_that_is_not_what_runs_is_named(tmp_path):
    """`ratefleet status --config F` (or ./ratefleet.toml): F with errors, or other than the stored
    revision, gets a note; a client file (no [pools]) or a fleet on its local files gets none."""
    from ratefleet.config_applied import config_drift
    from ratefleet.runtime.config_kv import document_for

    fleet = tmp_path / "fleet.toml"
    upstream = '[upstreams.u]\nbase_url = "http://127.0.0.1:9"\n[pools.p]\nupstream = "u"\n'
    fleet.write_text(upstream + 'keys = [{ id = "k1", secret = "env:K1", rps = 5 }]\n')
    stored = document_for(fleet)
    assert config_drift(fleet, 3, stored) is None
    assert config_drift(fleet, None, stored) is None  # the fleet runs its local files
    fleet.write_text(upstream + 'keys = [{ id = "k1", secret = "env:K1", rps = 6 }]\n')
    assert config_drift(fleet, 3, stored) == (f"note: {fleet} differs from the config the fleet runs (revision 3); "
                                              f"`ratefleet config push {fleet}` applies it")
    fleet.write_text(upstream + 'keys = [{ id = "k1", secret = "env:K1", rps = -6 }]\n')
    note = config_drift(fleet, 3, stored)
    assert note.startswith(f"note: {fleet} has errors, so the fleet does not run it (it runs revision 3): ")
    assert "rps" in note and f"`ratefleet config check {fleet}` shows them" in note
    client = tmp_path / "client.toml"
    client.write_text('[nats]\nurl = "nats://127.0.0.1:4222"\n')
    assert config_drift(client, 3, stored) is None


@pytest.mark.anyio
async def test_a_push_that_changes_no_secret_does_not_wait_for_the_workers_secrets(nats_server, tmp_path, monkeypatch):
    """`config push` waits two heartbeats after the fleet runs a revision only when a key's
    secret reference changed (or a key came): a limits-only push returns once applied."""
    from ratefleet import config_cmd
    from ratefleet.runtime.config_kv import document_for

    asked = []

    async def fleet_applied(nc, subjects, revision, wait_s, settle_s):
        asked.append(settle_s)

    monkeypatch.setattr(config_cmd, "fleet_applied", fleet_applied)
    path = tmp_path / "fleet.toml"
    upstream = '[upstreams.u]\nbase_url = "http://127.0.0.1:9"\n[pools.p]\nupstream = "u"\n'
    for keys in ('{ id = "k1", secret = "env:K1", rps = 5 }',  # the first push: nothing to compare with
                 '{ id = "k1", secret = "env:K1", rps = 9 }',  # a limit changed
                 '{ id = "k1", secret = "env:K1B", rps = 9 }',  # a rotated secret
                 '{ id = "k1", secret = "env:K1B", rps = 9 }, { id = "k2", secret = "env:K2", rps = 1 }'):  # a new key
        path.write_text(upstream + f"keys = [{keys}]\n")
        await config_cmd._push(nats_server.url, "ratefleet", document_for(path), None, 5.0, 2.0)
    assert asked == [2.0, 0.0, 2.0, 2.0]


def test_a_key_without_an_active_version_is_a_config_problem_not_a_missing_secret(tmp_path):
    """A pushed key whose versions are all retired, draining or pending: the push said 'give the
    workers its secret' (they had it) and `config check` said only 'valid'."""
    keys = {"k1": {"secret_missing": "no active version (v1 retired)"}}
    [_, warning] = describe(Applied.of(3, status(3, keys=keys)), 10)
    assert warning.startswith("warning: key k1 is out of rotation: no active version (v1 retired) in this config")
    assert "give the workers its secret" not in warning
    from typer.testing import CliRunner

    from ratefleet.cli import app
    conf = tmp_path / "fleet.toml"
    conf.write_text('[upstreams.u]\nbase_url = "https://api.example.test"\n[pools.p]\nkeys = [{ id = "k1", rps = 1, '
                    'versions = [{ id = "v1", secret = "env:RF_X", status = "retired" }] }]\n')
    done = CliRunner().invoke(app, ["config", "check", str(conf)])
    assert done.exit_code == 0
    assert "warning: key k1 has no active version now (v1 retired)" in done.output
