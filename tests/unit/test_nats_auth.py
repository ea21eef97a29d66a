"""[nats] credentials and TLS: validation, resolution into nats-py options, redaction of
credentials in URLs and log lines, and the worker's key/upstream pairing check."""

from __future__ import annotations

import ssl
import warnings

import pytest

from ratefleet.runtime.connect import _Scrubber, _url_secrets, redact_url
from ratefleet.runtime.logs import _scrub, redact_text
from ratefleet.runtime.nats_auth import connect_options, secret_values
from ratefleet.schemas.config import parse_config
from ratefleet.schemas.config_nats import NatsAuthConfig
from ratefleet.schemas.errors import ConfigError
from ratefleet.workers.pairing import pairing_problem

SEED = "SUAGHI6EKEUIMEMEITBM3M5GEIO63WJMUE46YJOT2EO5KUDFCOD2XSVRWA"  # a throwaway user seed


@pytest.mark.parametrize(("nats", "why"), [
    ({"password": "env:P"}, "nats.password needs nats.user"),
    ({"user": "u"}, "nats.user needs nats.password"),
    ({"user": "u", "password": "env:P", "token": "env:T"}, "not user/password and token"),
    ({"token": "env:T", "creds": "/x.creds"}, "not token and creds"),
    ({"tls_cert": "c.pem"}, "tls_cert and nats.tls_key go together"),
    ({"token": "env:"}, "env: needs a variable name"),
    ({"nkey_seed": "file:"}, "file: needs a path"),
    ({"inbox_prefix": "INBOX"}, "inbox_prefix"),
    ({"inbox_prefix": "_INBOX.a b"}, "inbox_prefix"),
])
def test_bad_nats_credentials_are_refused_naming_the_field(nats, why):
    with pytest.raises(ConfigError, match=why):
        parse_config({"nats": nats})


def test_secrets_stay_references_and_literals_warn():
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        config = parse_config({"nats": {"user": "fleet", "password": "hunter2-literal"}})
    assert any("nats.password is a literal secret" in str(w.message) for w in caught)
    assert "hunter2-literal" not in config.model_dump_json() and "hunter2-literal" not in repr(config)
    quiet = parse_config({"nats": {"token": "env:NATS_TOKEN", "inbox_prefix": "_INBOX.producer"}})
    assert quiet.nats.has_credentials and not quiet.nats.uses_tls


def test_options_resolve_env_and_file_references(tmp_path, monkeypatch):
    monkeypatch.setenv("NATS_PW", "pw-from-env")
    (tmp_path / "seed").write_text(SEED + "\n")
    assert connect_options(None) == {}
    options = connect_options(NatsAuthConfig(user="fleet", password="env:NATS_PW", inbox_prefix="_INBOX.fleet"))
    assert options == {"inbox_prefix": "_INBOX.fleet", "user": "fleet", "password": "pw-from-env"}
    seeded = connect_options(NatsAuthConfig(nkey_seed=f"file:{tmp_path / 'seed'}"))
    assert seeded["nkeys_seed_str"] == SEED and secret_values(seeded) == [SEED]
    (tmp_path / "u.creds").write_text("-----BEGIN NATS USER JWT-----\n")
    assert connect_options(NatsAuthConfig(creds=str(tmp_path / "u.creds")))["user_credentials"] == str(tmp_path / "u.creds")


def test_unresolvable_references_name_where_they_looked_never_a_value(tmp_path, monkeypatch):
    monkeypatch.delenv("NATS_MISSING", raising=False)
    with pytest.raises(ConfigError, match="nats.token: environment variable NATS_MISSING is not set"):
        connect_options(NatsAuthConfig(token="env:NATS_MISSING"))
    (tmp_path / "empty").write_text("\n")
    with pytest.raises(ConfigError, match="is empty"):
        connect_options(NatsAuthConfig(token=f"file:{tmp_path / 'empty'}"))
    with pytest.raises(ConfigError, match="nats.creds: .* is not a readable file"):
        connect_options(NatsAuthConfig(creds=str(tmp_path / "none.creds")))


def test_tls_options_build_a_verifying_context(tmp_path):
    context = connect_options(NatsAuthConfig(tls=True))["tls"]
    assert isinstance(context, ssl.SSLContext) and context.verify_mode == ssl.CERT_REQUIRED and context.check_hostname
    (tmp_path / "ca.pem").write_text("not a certificate")
    with pytest.raises(ConfigError, match="nats.tls_"):
        connect_options(NatsAuthConfig(tls_ca=str(tmp_path / "ca.pem")))


@pytest.mark.parametrize(("url", "shown"), [
    ("nats://user:pa55word@host:4222", "nats://user:***@host:4222"),
    ("nats://user:p@ss@word@host:4222", "nats://user:***@host:4222"),
    ("nats://s3cr3t-token@host:4222", "nats://***@host:4222"),
    ("user:pa55word@host:4222", "user:***@host:4222"),
    ("tls://a:one1@h1:4222, nats://b:two2@h2:4222", "tls://a:***@h1:4222, nats://b:***@h2:4222"),
    ("nats://host:4222", "nats://host:4222"),
])
def test_redact_url(url, shown):
    assert redact_url(url) == shown


def test_redact_text_masks_credentials_inside_any_message():
    text = f"cannot reach nats://u:pw-1@x@h:4222 (seed {SEED}); header Bearer abcdef123"
    assert redact_text(text) == "cannot reach nats://u:***@h:4222 (seed ***); header Bearer ***"
    assert redact_text("mail me at a@b.c or see https://example.com/x") == "mail me at a@b.c or see https://example.com/x"
    event = _scrub(None, "warning", {"event": "nats disconnected", "url": "nats://fleet:pw-9@host:4222", "n": 3})
    assert event == {"event": "nats disconnected", "url": "nats://fleet:***@host:4222", "n": 3}


def test_nats_py_error_texts_lose_the_url_and_the_configured_secrets():
    url = "nats://fleet:pw-A@B@h:4222"
    scrub = _Scrubber(url, ["tok-123456"] + _url_secrets(url))
    assert _url_secrets(url) == ["pw-A@B"] and _url_secrets("nats://tok-xyz@h") == ["tok-xyz"]
    assert scrub(f"nats: no servers ({url}) token tok-123456, raw pw-A@B") == \
        "nats: no servers (nats://fleet:***@h:4222) token ***, raw ***"


TWO_UPSTREAMS = {
    "upstreams": {"a": {"base_url": "http://a.example"}, "b": {"base_url": "http://b.example"}},
    "pools": {"pa": {"upstream": "a", "keys": [{"id": "ka", "secret": "env:KA", "rps": 1}]},
              "pb": {"upstream": "b", "keys": [{"id": "kb", "secret": "env:KB", "rps": 1}]}},
}


@pytest.mark.parametrize(("key", "upstream", "job", "problem"), [
    ("ka", "a", {"upstream": "a"}, None),
    ("kb", "b", {"upstream": "b"}, None),
    ("ka", "b", {"upstream": "b"}, "key 'ka' belongs to pools of ['a'], not of 'b'"),
    ("ka", "b", {}, "key 'ka' belongs to pools of ['a'], not of 'b'"),
    ("ka", "a", {"upstream": "b"}, "the job is for upstream 'b' but the assignment sends it to 'a'"),
    # an upstream of a revision this worker has not applied yet: handed back unrun, not refused
    ("ka", "c", {"upstream": "c"}, None),
    ("unknown", "a", {"upstream": "a"}, None),  # left to the secret resolver: "key not in this worker's config"
])
def test_a_key_is_used_only_for_an_upstream_of_its_pools(key, upstream, job, problem):
    assert pairing_problem(parse_config(TWO_UPSTREAMS), key, upstream, job) == problem


def test_one_upstream_jobs_without_an_upstream_pair_with_its_keys():
    config = parse_config({"upstreams": {"a": {"base_url": "http://a.example"}},
                           "pools": {"p": {"keys": [{"id": "k", "secret": "env:K", "rps": 1}]}}})
    assert pairing_problem(config, "k", "a", {}) is None
