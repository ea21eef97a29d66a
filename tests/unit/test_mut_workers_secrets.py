"""The worker's secret resolver (workers/secrets.py), checked exactly: the checks at an instant
other than the clock's, the reasons a heartbeat carries (naming the key, version and where the
secret comes from, never its value), which characters a header value may hold (RFC 9110 5.5),
and when a cached secret is read again. Deterministic, no server.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from ratefleet.schemas.config import parse_config
from ratefleet.schemas.errors import SecretUnavailable
from ratefleet.workers.secrets import SecretResolver, header_problem

T0 = datetime(2026, 12, 1, 0, 0, tzinfo=UTC)
T1, T2, T3 = (T0 + timedelta(hours=h) for h in (1, 2, 3))


def config(*keys: dict) -> object:
    return parse_config({"upstreams": {"u": {"base_url": "http://127.0.0.1:9"}},
                         "pools": {"p": {"keys": [{"rps": 5, **key} for key in keys]}}})


def test_check_all_judges_the_versions_at_the_instant_given(monkeypatch):
    monkeypatch.setenv("RF_MUT_OLD", "sk-old-value")
    cfg = config({"id": "k1", "versions": [{"id": "v1", "secret": "env:RF_MUT_OLD", "not_after": T2}]})
    resolver = SecretResolver(cfg, clock=lambda: T1)
    assert resolver.check_all() == {}
    problems = resolver.check_all(T3)  # past v1's end: nothing active then, whatever the clock says
    assert list(problems) == ["k1"] and problems["k1"].startswith("no active version")
    assert resolver.check_all(T0) == {}


def test_check_pending_and_pick_use_the_instant_given(monkeypatch):
    monkeypatch.setenv("RF_MUT_OLD", "sk-old-value")
    monkeypatch.delenv("RF_MUT_NEW", raising=False)
    cfg = config({"id": "k1", "versions": [{"id": "v1", "secret": "env:RF_MUT_OLD", "not_after": T2},
                                           {"id": "v2", "secret": "env:RF_MUT_NEW", "not_before": T2}]})
    resolver = SecretResolver(cfg, clock=lambda: T3)  # the clock is past the switch
    assert resolver.check_pending() == {}
    assert resolver.check_pending(T1) == {"k1 v2": "version v2: RF_MUT_NEW not set"}
    assert resolver.pick("k1", T1) == ("v1", "sk-old-value")


@pytest.mark.parametrize("value, problem", [
    ("sk-XyZ-\u00ff", None), ("sk-\u0100", "contains a character outside latin-1, which an HTTP header cannot carry"),
    ("sk-a b\tc", None), ("sk-\x1f", "contains a control character"), ("sk-\x7f", "contains a control character"),
    ("sk-\x80", None), ("sk-\x00", "contains a control character"), ("sk-!~", None),
    ("sk-\r", "contains a line break (CR/LF)"), ("sk-\n", "contains a line break (CR/LF)"),
    ("", None),
])
def test_header_value_characters(value, problem):
    assert header_problem(value) == problem


def reasons(tmp_path, monkeypatch, **refs) -> tuple[dict[str, str], dict[str, str]]:
    """{key id: reason} and {key id: message} for single-secret keys with these references."""
    cfg = config(*({"id": key_id, "secret": ref} for key_id, ref in refs.items()))
    resolver = SecretResolver(cfg)
    messages = {}
    for key_id in refs:
        try:
            resolver.pick(key_id)
        except SecretUnavailable as exc:
            messages[key_id] = str(exc)
    return resolver.check_all(), messages


@pytest.mark.filterwarnings("ignore:.*literal secret")
def test_reasons_and_messages_name_the_key_and_the_source_never_the_value(tmp_path, monkeypatch):
    (tmp_path / "empty").write_text(" \n")
    (tmp_path / "bad").write_text("sk-file\x01value")
    (tmp_path / "good").write_text("sk-file-good\n")
    monkeypatch.delenv("RF_MUT_UNSET", raising=False)
    monkeypatch.setenv("RF_MUT_EMPTY", "")
    monkeypatch.setenv("RF_MUT_CTRL", "sk-env\x02value")
    problems, messages = reasons(
        tmp_path, monkeypatch, unset="env:RF_MUT_UNSET", blank="env:RF_MUT_EMPTY", ctrl="env:RF_MUT_CTRL",
        empty=f"file:{tmp_path / 'empty'}", missing=f"file:{tmp_path / 'nope'}", bad=f"file:{tmp_path / 'bad'}",
        literal="sk-lit\x03value", good=f"file:{tmp_path / 'good'}")
    assert problems == {
        "unset": "RF_MUT_UNSET not set", "blank": "RF_MUT_EMPTY not set",
        "ctrl": "RF_MUT_CTRL contains a control character",
        "empty": f"file {tmp_path / 'empty'} empty",
        "missing": f"file {tmp_path / 'nope'} unreadable (No such file or directory)",
        "bad": f"file {tmp_path / 'bad'} contains a control character",
        "literal": "literal secret contains a control character",
    }
    assert messages == {
        "unset": "key 'unset': environment variable RF_MUT_UNSET is not set on this worker",
        "blank": "key 'blank': environment variable RF_MUT_EMPTY is not set on this worker",
        "ctrl": "key 'ctrl': RF_MUT_CTRL contains a control character",
        "empty": f"key 'empty': secret file {tmp_path / 'empty'} is empty",
        "missing": f"key 'missing': cannot read secret file {tmp_path / 'nope'} (No such file or directory)",
        "bad": f"key 'bad': file {tmp_path / 'bad'} contains a control character",
        "literal": "key 'literal': literal secret contains a control character",
    }


def test_a_file_that_is_not_text_says_so(tmp_path):
    (tmp_path / "binary").write_bytes(b"\xff\xfe\x00")
    problems = SecretResolver(config({"id": "k1", "secret": f"file:{tmp_path / 'binary'}"})).check_all()
    assert problems == {"k1": f"file {tmp_path / 'binary'} unreadable (not UTF-8 text)"}


def test_an_unknown_key_and_a_versioned_key_name_their_version(monkeypatch):
    monkeypatch.setenv("RF_MUT_CTRL", "sk-env\x02value")
    resolver = SecretResolver(config({"id": "k1", "versions": [{"id": "v7", "secret": "env:RF_MUT_CTRL"}]}))
    with pytest.raises(SecretUnavailable) as unknown:
        resolver.pick("k9")
    assert unknown.value.reason == "key not in this worker's config" and "'k9'" in str(unknown.value)
    with pytest.raises(SecretUnavailable) as bad:
        resolver.pick("k1")
    assert bad.value.reason == "version v7: RF_MUT_CTRL contains a control character"
    assert str(bad.value) == "key 'k1' version v7: RF_MUT_CTRL contains a control character"


def test_a_cached_secret_is_served_per_key_and_version(monkeypatch):
    monkeypatch.setenv("RF_MUT_A", "sk-aaaa")
    monkeypatch.setenv("RF_MUT_B", "sk-bbbb")
    resolver = SecretResolver(config({"id": "a", "secret": "env:RF_MUT_A"}, {"id": "b", "secret": "env:RF_MUT_B"}))
    assert [resolver.get("a"), resolver.get("b"), resolver.get("a"), resolver.get("b")] == [
        "sk-aaaa", "sk-bbbb", "sk-aaaa", "sk-bbbb"]
    monkeypatch.setenv("RF_MUT_A", "sk-changed")  # env: read once, as documented
    assert resolver.get("a") == "sk-aaaa"
