"""Key versions: the config model, the version a new call uses at `now` (tables over named
instants t0..t4, no clock), and the worker's secret resolver (version choice, `file:` secrets
re-read when the file changes, nothing secret in errors)."""

from __future__ import annotations

import os
from datetime import UTC, datetime, timedelta

import pytest

from ratefleet.schemas.config import parse_config
from ratefleet.schemas.errors import ConfigError, SecretUnavailable
from ratefleet.schemas.key_versions import KeyVersion, current_version, describe_versions, version_state
from ratefleet.workers.secrets import SecretResolver

T0 = datetime(2026, 12, 1, 0, 0, tzinfo=UTC)
T1, T2, T3, T4 = (T0 + timedelta(hours=h) for h in (1, 2, 3, 4))


def v(id_: str, status: str = "active", not_before=None, not_after=None, secret: str | None = None) -> KeyVersion:
    return KeyVersion(id=id_, secret=secret or f"env:{id_.upper()}", status=status, not_before=not_before,
                      not_after=not_after)


def config(versions=None, secret=None, **key) -> dict:
    entry = {"id": "k1", "rps": 5, **key}
    if versions is not None:
        entry["versions"] = versions
    if secret is not None:
        entry["secret"] = secret
    return {"upstreams": {"u": {"base_url": "http://127.0.0.1:9"}}, "pools": {"p": {"keys": [entry]}}}


@pytest.mark.parametrize(("version", "now", "state"), [
    (v("a"), T0, "active"),
    (v("a", not_before=T1), T0, "pending"),
    (v("a", not_before=T1), T1, "active"),  # not_before is inclusive
    (v("a", not_after=T1), T0, "active"),
    (v("a", not_after=T1), T1, "draining"),  # not_after is exclusive: from then on no new call
    (v("a", status="draining"), T0, "draining"),
    (v("a", status="draining", not_before=T1), T0, "draining"),
    (v("a", status="retired", not_before=T1), T2, "retired"),
    (v("a", status="retired"), T0, "retired"),
])
def test_state_of_a_version_at_now(version, now, state):
    assert version_state(version, now) == state


ROTATION = [v("v1", not_after=T2), v("v2", not_before=T2)]  # what `keys rotate --at T2` writes
OVERLAP = [v("v1", not_after=T3), v("v2", not_before=T1)]  # the provider accepts both from T1 to T3


@pytest.mark.parametrize(("versions", "now", "chosen"), [
    ([v("v1")], T0, "v1"),
    (ROTATION, T1, "v1"),
    (ROTATION, T2, "v2"),  # the switch happens at not_before / not_after, to the instant
    (ROTATION, T4, "v2"),
    (OVERLAP, T0, "v1"),
    (OVERLAP, T1, "v2"),  # newest active wins as soon as it starts, while v1 is still valid
    (OVERLAP, T3, "v2"),
    ([v("v1"), v("v2")], T0, "v2"),  # neither has a start: the later-listed is the newer
    ([v("v2", not_before=T1), v("v1")], T2, "v2"),  # a start beats none, whatever the order
    ([v("v1", not_before=T1), v("v2", not_before=T0)], T2, "v1"),  # the latest start, not list order
    ([v("v1"), v("v2", status="draining")], T0, "v1"),  # draining: no new call uses it
    ([v("v1"), v("v2", status="retired")], T0, "v1"),  # retired: never used
    ([v("v1", status="draining"), v("v2", status="retired")], T0, None),
    ([v("v1", not_before=T3)], T0, None),  # only a future version: nothing yet
    ([v("v1", not_after=T1)], T2, None),  # ended and nothing after it
])
def test_the_newest_active_version_takes_new_calls(versions, now, chosen):
    picked = current_version(versions, now)
    assert (picked.id if picked else None) == chosen


def test_describe_versions_names_states_and_times_never_secrets():
    text = describe_versions([v("v1", not_after=T1, secret="env:OLD_KEY"), v("v2", not_before=T3), v("v3", "retired")],
                             T2)
    assert text == ("v1 draining since 2026-12-01T01:00:00+00:00, v2 pending until 2026-12-01T03:00:00+00:00, "
                    "v3 retired")
    assert "OLD_KEY" not in text


def test_a_single_secret_is_one_active_version_v1():
    key = parse_config(config(secret="env:K1")).keys()["k1"]
    (only,) = key.secret_versions()
    assert (only.id, only.status, only.secret_ref, only.not_before, only.not_after) == ("v1", "active", "env:K1",
                                                                                       None, None)


def test_versions_parse_from_toml_times_and_rfc3339_strings():
    key = parse_config(config(versions=[
        {"id": "v1", "secret": "env:OLD", "not_after": T2},
        {"id": "v2", "secret": "file:/run/secrets/k1", "not_before": "2026-12-01T02:00:00Z"},
    ])).keys()["k1"]
    assert [x.id for x in key.secret_versions()] == ["v1", "v2"]
    assert key.secret_versions()[1].not_before == T2 and not key.secret_is_literal


@pytest.mark.parametrize(("key", "message"), [
    ({"secret": "env:A", "versions": [{"id": "v1", "secret": "env:B"}]}, "either `secret` or `versions`"),
    ({}, "either `secret` or `versions`"),
    ({"versions": []}, "needs at least one version"),
    ({"versions": [{"id": "v1", "secret": "env:A"}, {"id": "v1", "secret": "env:B"}]}, "'v1' is used twice"),
    ({"versions": [{"id": "v1", "secret": "env:A", "not_before": "2026-12-01T00:00:00"}]}, "needs a UTC offset"),
    ({"versions": [{"id": "v1", "secret": "env:A", "not_before": T2, "not_after": T1}]}, "later than not_before"),
    ({"versions": [{"id": "v1", "secret": "env:"}]}, "env: needs a variable name"),
    ({"versions": [{"id": "v1", "secret": "env:A", "status": "paused"}]}, "'active', 'draining' or 'retired'"),
    ({"versions": [{"id": "v 1", "secret": "env:A"}]}, "versions.0.id"),
])
def test_bad_versions_are_refused_with_the_field(key, message):
    with pytest.raises(ConfigError) as caught:
        parse_config(config(**key), source="f.toml")
    assert message in str(caught.value) and "pools.p.keys.0" in str(caught.value)


def test_a_literal_secret_in_a_version_warns_like_a_key_secret():
    with pytest.warns(UserWarning, match="literal secret"):
        parse_config(config(versions=[{"id": "v1", "secret": "env:A"}, {"id": "v2", "secret": "sk-literal"}]))


class Clock:
    def __init__(self, now: datetime):
        self.now = now

    def __call__(self) -> datetime:
        return self.now


def test_resolver_picks_the_version_by_the_clock(monkeypatch):
    monkeypatch.setenv("RF_OLD", "sk-old")
    monkeypatch.setenv("RF_NEW", "sk-new")
    cfg = parse_config(config(versions=[{"id": "v1", "secret": "env:RF_OLD", "not_after": T2},
                                        {"id": "v2", "secret": "env:RF_NEW", "not_before": T2}]))
    clock = Clock(T1)
    resolver = SecretResolver(cfg, clock=clock)
    assert resolver.pick("k1") == ("v1", "sk-old")
    clock.now = T2
    assert resolver.pick("k1") == ("v2", "sk-new") and resolver.get("k1") == "sk-new"


def test_resolver_reports_no_active_version_and_pending_secrets_without_values(monkeypatch):
    monkeypatch.setenv("RF_OLD", "sk-old-value")
    monkeypatch.delenv("RF_NEW", raising=False)
    cfg = parse_config(config(versions=[{"id": "v1", "secret": "env:RF_OLD", "not_after": T2},
                                        {"id": "v2", "secret": "env:RF_NEW", "not_before": T3}]))
    resolver = SecretResolver(cfg, clock=Clock(T1))
    assert resolver.check_all() == {}
    assert resolver.check_pending() == {"k1 v2": "version v2: RF_NEW not set"}
    with pytest.raises(SecretUnavailable) as caught:
        resolver.pick("k1", T2)
    assert "no active version" in str(caught.value) and "v1 draining since" in caught.value.reason
    assert "sk-old-value" not in str(caught.value) + caught.value.reason
    with pytest.raises(SecretUnavailable) as missing:
        resolver.pick("k1", T3)
    assert missing.value.reason == "version v2: RF_NEW not set"


def test_a_file_secret_is_read_again_when_the_file_is_rewritten_or_replaced(tmp_path):
    path = tmp_path / "k1.secret"
    path.write_text("sk-first\n")
    resolver = SecretResolver(parse_config(config(secret=f"file:{path}")))
    assert resolver.get("k1") == "sk-first"
    path.write_text("sk-second-longer\n")  # rewritten in place
    assert resolver.get("k1") == "sk-second-longer"
    staged = tmp_path / ".k1.new"
    staged.write_text("sk-third-value!!\n")  # same size as before: the inode tells
    os.replace(staged, path)
    assert resolver.get("k1") == "sk-third-value!!"
    path.unlink()
    with pytest.raises(SecretUnavailable, match="cannot read secret file"):
        resolver.get("k1")


def test_an_unchanged_file_secret_is_not_read_again(tmp_path, monkeypatch):
    path = tmp_path / "k1.secret"
    path.write_text("sk-first")
    resolver = SecretResolver(parse_config(config(secret=f"file:{path}")))
    assert resolver.get("k1") == "sk-first"
    reads = []
    original = type(path).read_text
    monkeypatch.setattr(type(path), "read_text", lambda self, *a, **k: reads.append(self) or original(self, *a, **k))
    for _ in range(5):
        assert resolver.get("k1") == "sk-first"
    assert reads == []
