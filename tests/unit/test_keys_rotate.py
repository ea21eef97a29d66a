"""`ratefleet keys rotate`: the pure `rotate(config, key, secret_ref, at)`, the in-place file
edit (comments kept, result valid), and the command's refusals."""

from __future__ import annotations

import tomllib
from datetime import UTC, datetime, timedelta

import pytest
from typer.testing import CliRunner

from ratefleet.cli import app
from ratefleet.keys_rotate import RotateError, UnknownKey, rotate, rotate_file
from ratefleet.schemas.config import parse_config
from ratefleet.schemas.key_versions import current_version

AT = datetime(2026, 12, 1, tzinfo=UTC)
LATER = AT + timedelta(days=30)
FILE = """\
# production fleet
[upstreams.openai]
base_url = "https://api.openai.com"  # the provider
timeout_s = 30

[pools.shared]
keys = [
  { id = "k1", secret = "env:OPENAI_KEY_1", rps = 20 },  # team A's key
  { id = "k2", secret = "env:OPENAI_KEY_2", rps = 5 },
]

# batch key
[[pools.batch.keys]]
id = "k3"  # nightly only
secret = "file:/run/secrets/k3"
rps = 1
"""


def plain() -> dict:
    return tomllib.loads(FILE)


def versions_of(data: dict, key: str):
    return parse_config(data).keys()[key].secret_versions()


def test_rotate_turns_a_single_secret_into_v1_ending_at_the_switch_and_v2_starting_there():
    before = plain()
    after = rotate(before, "k1", "env:OPENAI_KEY_1_NEW", AT)
    assert before == plain()  # the input is left as it was
    k1 = after["pools"]["shared"]["keys"][0]
    assert "secret" not in k1 and k1["rps"] == 20
    assert k1["versions"] == [{"id": "v1", "secret": "env:OPENAI_KEY_1", "not_after": AT},
                              {"id": "v2", "secret": "env:OPENAI_KEY_1_NEW", "not_before": AT}]
    versions = versions_of(after, "k1")
    assert current_version(versions, AT - timedelta(seconds=1)).id == "v1"
    assert current_version(versions, AT).id == "v2"
    assert after["pools"]["shared"]["keys"][1] == before["pools"]["shared"]["keys"][1]


def test_a_second_rotation_ends_only_the_version_in_use():
    once = rotate(plain(), "k1", "env:NEW_1", AT)
    twice = rotate(once, "k1", "env:NEW_2", LATER)
    assert [(v["id"], v.get("not_before"), v.get("not_after")) for v in twice["pools"]["shared"]["keys"][0]["versions"]] == [
        ("v1", None, AT), ("v2", AT, LATER), ("v3", LATER, None)]
    assert current_version(versions_of(twice, "k1"), LATER).id == "v3"


def test_rotate_keeps_draining_and_retired_versions_as_they_are():
    data = plain()
    data["pools"]["shared"]["keys"][0] = {"id": "k1", "rps": 20, "versions": [
        {"id": "v1", "secret": "env:A", "status": "retired"}, {"id": "v7", "secret": "env:B", "status": "draining"},
        {"id": "v8", "secret": "env:C"}]}
    versions = rotate(data, "k1", "env:D", AT)["pools"]["shared"]["keys"][0]["versions"]
    assert versions[:2] == data["pools"]["shared"]["keys"][0]["versions"][:2]
    assert versions[2]["not_after"] == AT and versions[3] == {"id": "v9", "secret": "env:D", "not_before": AT}


@pytest.mark.parametrize(("key", "secret", "at", "error", "message"), [
    ("k9", "env:X", AT, UnknownKey, "unknown key id 'k9'; keys in the config: k1, k2, k3"),
    ("k1", "sk-live-abc123", AT, RotateError, "never the secret itself"),
    ("k1", "env:", AT, RotateError, "env: needs a variable name"),
    ("k1", "env:OPENAI_KEY_1", AT, RotateError, "already the secret of key 'k1' version v1"),
    ("k1", "env:X", datetime(2026, 12, 1), RotateError, "needs a UTC offset"),
])
def test_rotate_refuses(key, secret, at, error, message):
    with pytest.raises(error) as caught:
        rotate(plain(), key, secret, at)
    assert message in str(caught.value)
    assert "sk-live-abc123" not in str(caught.value)


def test_rotate_refuses_an_earlier_switch_than_a_scheduled_version():
    once = rotate(plain(), "k1", "env:NEW_1", LATER)
    with pytest.raises(RotateError, match="version v2 starts at .* not before --at"):
        rotate(once, "k1", "env:NEW_2", AT)


def test_rotate_file_edits_in_place_keeping_comments_and_other_keys(tmp_path):
    path = tmp_path / "ratefleet.toml"
    path.write_text(FILE)
    path.chmod(0o640)
    assert rotate_file(path, "k1", "env:OPENAI_KEY_1_NEW", AT) == "v2"
    assert rotate_file(path, "k3", "file:/run/secrets/k3-new", AT) == "v2"
    text = path.read_text()
    for comment in ("# production fleet", "# the provider", "# team A's key", "# batch key", "# nightly only"):
        assert comment in text
    assert (path.stat().st_mode & 0o777) == 0o640
    assert tomllib.loads(text) == rotate(rotate(plain(), "k1", "env:OPENAI_KEY_1_NEW", AT),
                                         "k3", "file:/run/secrets/k3-new", AT)
    assert [p.name for p in tmp_path.iterdir()] == ["ratefleet.toml"]  # no temp file left


def test_rotate_file_writes_nothing_when_refused(tmp_path):
    path = tmp_path / "ratefleet.toml"
    path.write_text(FILE)
    with pytest.raises(UnknownKey):
        rotate_file(path, "nope", "env:X", AT)
    assert path.read_text() == FILE


def test_the_command_edits_the_file_and_says_when_to_revoke(tmp_path):
    path = tmp_path / "ratefleet.toml"
    path.write_text(FILE)
    run = CliRunner().invoke(app, ["keys", "rotate", "k1", "--secret", "env:OPENAI_KEY_1_NEW",
                                   "--at", "2036-12-01T00:00:00Z", "--config", str(path)])
    assert run.exit_code == 0, run.output
    assert "version v2 (env:OPENAI_KEY_1_NEW) takes new calls from 2036-12-01T00:00:00+00:00" in run.output
    assert "revoke the old secret at the provider only after 2036-12-01T00:00:30+00:00" in run.output
    assert [v.id for v in versions_of(tomllib.loads(path.read_text()), "k1")] == ["v1", "v2"]


def test_the_command_without_at_switches_now(tmp_path):
    path = tmp_path / "ratefleet.toml"
    path.write_text(FILE)
    secret = tmp_path / "k2-secret"
    secret.write_text("sk-k2-new\n")
    before = datetime.now(UTC).replace(microsecond=0)
    run = CliRunner().invoke(app, ["keys", "rotate", "k2", "--secret", f"file:{secret}", "-c", str(path)])
    assert run.exit_code == 0, run.output
    new = versions_of(tomllib.loads(path.read_text()), "k2")[1]
    assert before <= new.not_before <= datetime.now(UTC)
    assert current_version(versions_of(tomllib.loads(path.read_text()), "k2"), datetime.now(UTC)).id == "v2"


@pytest.mark.parametrize(("args", "code", "message"), [
    (["k9", "--secret", "env:X"], 2, "unknown key id 'k9'"),  # an input error, as an unknown tier
    (["k1", "--secret", "sk-live-abc123"], 2, "env:NAME or file:PATH, never the secret itself"),
    (["k1", "--secret", "env:X", "--at", "tomorrow"], 2, "not an RFC 3339 time"),
    (["k1", "--secret", "env:X", "--at", "2026-12-01T00:00:00"], 2, "needs a UTC offset"),
    # accepted before, switching at once and printing a revoke time years gone (a new user's trial)
    (["k1", "--secret", "env:X", "--at", "2020-01-01T00:00:00Z"], 2, "is in the past"),
])
def test_the_command_refuses_with_one_clear_line(tmp_path, args, code, message):
    path = tmp_path / "ratefleet.toml"
    path.write_text(FILE)
    run = CliRunner().invoke(app, ["keys", "rotate", *args, "--config", str(path)])
    assert run.exit_code == code, run.output
    assert message in run.output and "sk-live-abc123" not in run.output
    assert path.read_text() == FILE


def test_a_new_secret_unusable_here_is_refused_for_a_switch_now_unless_forced(tmp_path, monkeypatch):
    """A new user's finding: `keys rotate k1 --secret env:LOCAL_KEY_1_NEW` with the variable unset,
    `up` watching the file: within seconds the key left rotation ("no worker has this key's
    secret") and half the capacity was gone, with no warning from the command. A warning came
    next; an operations trial then saw 263 of 300 queued jobs end failed / no_key_available
    within 4 s of such a rotation on a one-key pool. Switching now, it is refused (nothing
    written); --force (the workers run elsewhere and have it) and --at still write, warned."""
    path = tmp_path / "ratefleet.toml"
    path.write_text(FILE)
    monkeypatch.delenv("RF_UNSET_NEW", raising=False)
    now = CliRunner().invoke(app, ["keys", "rotate", "k1", "--secret", "env:RF_UNSET_NEW", "--config", str(path)])
    assert now.exit_code == 2, now.output
    assert "env:RF_UNSET_NEW cannot be used on this machine (RF_UNSET_NEW not set), and the switch is now" in now.output
    assert "Nothing was written" in now.output and "--at a later time" in now.output and "--force" in now.output
    assert path.read_text() == FILE
    forced = CliRunner().invoke(app, ["keys", "rotate", "k1", "--secret", "env:RF_UNSET_NEW", "--force",
                                      "--config", str(path)])
    assert forced.exit_code == 0, forced.output  # written: the workers may hold it on other machines
    assert "warning: env:RF_UNSET_NEW cannot be used on this machine (RF_UNSET_NEW not set)" in forced.output
    assert "The switch is now" in forced.output and "stops using key k1 at the switch" in forced.output
    path.write_text(FILE)
    later = CliRunner().invoke(app, ["keys", "rotate", "k1", "--secret", "env:RF_UNSET_NEW", "--at",
                                     "2036-12-01T00:00:00Z", "--config", str(path)])
    assert later.exit_code == 0 and "warning: env:RF_UNSET_NEW cannot be used" in later.output
    path.write_text(FILE)
    monkeypatch.setenv("RF_SET_NEW", "sk-new-value")
    ok = CliRunner().invoke(app, ["keys", "rotate", "k1", "--secret", "env:RF_SET_NEW", "--config", str(path)])
    assert ok.exit_code == 0 and "warning" not in ok.output and "sk-new-value" not in ok.output
