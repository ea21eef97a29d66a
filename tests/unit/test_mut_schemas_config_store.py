"""The fleet config as pushed to NATS (schemas/config_store.py): what `config push` stores
(validated, secret references only, `[nats]` left out, a digest that only content changes)
and which sections of a stored revision a running process applies live. Deterministic, no
server (the KV side is tests/e2e/test_live_config_follower.py)."""

from __future__ import annotations

import hashlib
import json
from datetime import UTC, datetime

import pytest

from ratefleet.schemas.config import parse_config
from ratefleet.schemas.config_store import LiteralSecretRefused, StoredConfig, fleet_view, literal_secrets, storable
from ratefleet.schemas.errors import ConfigError

T1 = datetime(2026, 12, 1, tzinfo=UTC)


def data(secret: str = "env:K1", **extra) -> dict:
    return {"upstreams": {"u": {"base_url": "http://127.0.0.1:9"}},
            "pools": {"p": {"keys": [{"id": "k1", "rps": 5, "secret": secret}]}}, **extra}


def test_a_pushed_document_keeps_everything_but_nats_with_its_provenance():
    doc = storable(data(nats={"url": "nats://10.0.0.1:4222"}, workers={"slots": 8}), source="f.toml",
                   pushed_at=12.5, pushed_by="host-a")
    assert "nats" not in doc.config and doc.config["workers"] == {"slots": 8}
    assert doc.config["pools"]["p"]["keys"][0]["secret"] == "env:K1"
    assert (doc.source, doc.pushed_at, doc.pushed_by, doc.format) == ("f.toml", 12.5, "host-a", 1)
    assert storable(data(), source="f.toml", pushed_at=1.0).pushed_by is None


def test_the_digest_is_the_sha256_of_the_canonical_content_without_nats():
    doc = storable(data(), source="a.toml", pushed_at=1.0)
    assert doc.sha256 == hashlib.sha256(json.dumps(data(), sort_keys=True).encode()).hexdigest()
    reordered = dict(reversed(list(data(nats={"url": "nats://x:4222"}).items())))
    assert storable(reordered, source="b.toml", pushed_at=2.0).sha256 == doc.sha256  # same content
    assert storable(data(secret="env:K2"), source="a.toml", pushed_at=1.0).sha256 != doc.sha256


def test_times_in_a_pushed_file_are_digested_and_stored():
    versioned = data()
    versioned["pools"]["p"]["keys"][0] = {"id": "k1", "rps": 5, "versions": [
        {"id": "v1", "secret": "env:OLD", "not_after": T1}, {"id": "v2", "secret": "env:NEW", "not_before": T1}]}
    doc = storable(versioned, source="f.toml", pushed_at=1.0)
    assert doc.sha256 == hashlib.sha256(json.dumps(versioned, sort_keys=True, default=str).encode()).hexdigest()
    assert StoredConfig.model_validate_json(doc.model_dump_json()).validated(3).keys()["k1"].versions[1].not_before == T1


@pytest.mark.parametrize("secret_data, where", [
    (data(secret="sk-live-123"), "pools.p.keys.0.secret (key 'k1')"),
    ({**data(), "pools": {"p": {"keys": [{"id": "k1", "rps": 5, "secret": "env:K1"},
                                         {"id": "k2", "rps": 5, "versions": [{"id": "v1", "secret": "env:A"},
                                                                             {"id": "v2", "secret": "sk-live-123"}]}]}}},
     "pools.p.keys.1.secret (key 'k2')"),
    (data(callers={"app": {"key": "sk-live-123", "tier": "vip"}}), "callers.app.key"),
])
def test_a_literal_secret_is_refused_naming_where_never_the_value(secret_data, where):
    with pytest.warns(UserWarning):
        with pytest.raises(ConfigError) as caught:
            storable(secret_data, source="f.toml", pushed_at=1.0)
    text = str(caught.value)
    assert text.startswith("f.toml: refused") and text.endswith(where) and "sk-live-123" not in text


def test_literal_secrets_lists_every_place_and_nothing_for_references():
    with pytest.warns(UserWarning):
        config = parse_config({**data(secret="sk-1"), "callers": {"a": {"key": "env:C", "tier": "vip"},
                                                                   "b": {"key": "ck-2", "tier": "vip"}}})
    assert literal_secrets(config) == ["pools.p.keys.0.secret (key 'k1')", "callers.b.key"]
    assert literal_secrets(parse_config(data(callers={"a": {"key": "file:/run/c", "tier": "vip"}}))) == []


def test_a_pushed_config_that_fails_validation_names_the_file():
    with pytest.raises(ConfigError, match=r"f\.toml: pools\.p\.keys\.0\.rps"):
        storable(data() | {"pools": {"p": {"keys": [{"id": "k1", "rps": 0, "secret": "env:K"}]}}}, source="f.toml",
                 pushed_at=1.0)


def test_a_stored_revision_is_validated_again_naming_the_revision_or_its_file():
    bad = StoredConfig(config={"pools": {"p": {"keys": []}}}, source="f.toml", pushed_at=1.0, sha256="x")
    with pytest.raises(ConfigError, match=r"config revision 7: pools\.p\.keys"):
        bad.validated(7)
    with pytest.raises(ConfigError, match=r"config revision 0: "):
        bad.validated(0)
    with pytest.raises(ConfigError, match=r"f\.toml: pools\.p\.keys"):
        bad.validated()
    good = StoredConfig(config=data(), source="f.toml", pushed_at=1.0, sha256="x")
    assert list(good.validated(2).keys()) == ["k1"]


def test_a_process_applies_the_live_sections_of_a_stored_revision_and_keeps_its_own_rest():
    local = parse_config(data(nats={"url": "nats://10.0.0.1:4222"}, workers={"slots": 8},
                              dispatcher={"policy": "weighted", "priority_reserve": 1.0, "lease_ttl_s": 9.0}))
    stored = parse_config({"upstreams": {"v": {"base_url": "http://127.0.0.1:10"}},
                           "pools": {"q": {"keys": [{"id": "k9", "rps": 2, "secret": "env:K9"}]}},
                           "tiers": {"gold": {"weight": 3}}, "workers": {"slots": 99},
                           "dispatcher": {"policy": "strict", "priority_reserve": 0.25, "lease_ttl_s": 1.0}})
    view = fleet_view(local, stored)
    assert list(view.upstreams) == ["v"] and list(view.keys()) == ["k9"] and list(view.tiers) == ["gold"]
    assert view.dispatcher.policy == "strict" and view.dispatcher.priority_reserve == 0.25
    assert view.dispatcher.lease_ttl_s == 9.0 and view.workers.slots == 8
    assert view.nats.url == "nats://10.0.0.1:4222"
    assert local.dispatcher.policy == "weighted" and list(local.keys()) == ["k1"]  # the local config is untouched


@pytest.mark.parametrize("tables", [{}, {"nats": {"url": "nats://127.0.0.1:4222"}},
                                    {"upstreams": {"mock": {"base_url": "http://127.0.0.1:1"}}}])
def test_a_config_without_keys_is_refused_for_a_push(tables):
    """An operations trial: the watched file emptied for 3 s (an editor's truncate-then-write) was
    pushed live, every key removed, and 242 of 300 queued jobs ended without a call."""
    with pytest.raises(ConfigError, match=r"^empty\.toml: refused: it defines no API keys") as caught:
        storable(tables, source="empty.toml", pushed_at=1.0)
    assert not isinstance(caught.value, LiteralSecretRefused)  # (the watcher logs it as an error, not a note)
