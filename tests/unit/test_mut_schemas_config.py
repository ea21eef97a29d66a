"""The config file (schemas/config.py, config_nats.py): where it is found, what `--nats`
keeps of the file's `[nats]`, the exact error text a user reads, and which NATS secrets count
as literal (they warn). Deterministic, no server."""

from __future__ import annotations

import warnings
from pathlib import Path

import pytest

from ratefleet.schemas.config import NatsConfig, config_path, load_config, parse_config
from ratefleet.schemas.config_env import OVERRIDES
from ratefleet.schemas.errors import ConfigError

GOOD = """
[upstreams.u]
base_url = "http://127.0.0.1:9"

[pools.p]
keys = [{ id = "k1", secret = "env:K1", rps = 5 }]
"""


@pytest.fixture(autouse=True)
def no_overrides(monkeypatch, tmp_path):
    """No RATEFLEET_* variable of the machine, and a working directory without a config file."""
    for name in ["config", *OVERRIDES]:
        monkeypatch.delenv(f"RATEFLEET_{name.upper()}", raising=False)
    monkeypatch.chdir(tmp_path)


def test_the_config_file_is_the_flag_then_the_variable_then_ratefleet_toml_in_the_working_directory(
        monkeypatch, tmp_path):
    assert config_path(None) is None
    (tmp_path / "ratefleet.toml").write_text(GOOD)
    assert config_path(None) == Path("ratefleet.toml")
    assert load_config().keys()["k1"].rps == 5
    monkeypatch.setenv("RATEFLEET_CONFIG", "/etc/other.toml")
    assert config_path(None) == Path("/etc/other.toml")
    assert config_path("given.toml") == Path("given.toml")


def test_without_any_file_the_defaults_apply_and_errors_name_them(monkeypatch):
    config = load_config()
    assert config.workers.slots == 64 and list(config.tiers) == ["vip", "premium", "normal", "guest"]
    monkeypatch.setenv("RATEFLEET_WORKERS_SLOTS", "0")
    with pytest.raises(ConfigError) as caught:
        load_config()
    assert "\n  <defaults> (with RATEFLEET_WORKERS_SLOTS): workers.slots: " in str(caught.value)


def test_the_nats_flag_replaces_the_url_and_keeps_the_rest_of_the_files_nats(tmp_path):
    path = tmp_path / "f.toml"
    path.write_text(GOOD + '\n[nats]\nprefix = "blue"\nurl = "nats://file:4222"\n')
    config = load_config(path, nats_url="nats://flag:4222")
    assert (config.nats.url, config.nats.prefix) == ("nats://flag:4222", "blue")
    path.write_text(GOOD)
    assert load_config(path, nats_url="nats://flag:4222").nats.url == "nats://flag:4222"


def test_an_error_lists_each_problem_on_its_own_line_naming_file_and_field(tmp_path):
    path = tmp_path / "f.toml"
    path.write_text(GOOD.replace("rps = 5", "rps = 0") + "\n[workers]\nslots = 0\n")
    with pytest.raises(ConfigError) as caught:
        load_config(path)
    lines = str(caught.value).split("\n")
    assert lines[0] == "invalid configuration:" and len(lines) == 3
    assert lines[1].startswith(f"  {path}: pools.p.keys.0.rps: ") and lines[2].startswith(f"  {path}: workers.slots: ")


def test_an_error_of_the_whole_file_names_the_file_and_the_field_once():
    with pytest.raises(ConfigError) as caught:
        parse_config({"upstreams": {"u": {"base_url": "http://a"}},
                      "pools": {"p": {"upstream": "v", "keys": [{"id": "k1", "secret": "env:K", "rps": 1}]}}})
    assert str(caught.value) == ("invalid configuration:\n  <config>: pools.p.upstream: unknown upstream 'v'; "
                                 "known: ['u']")


@pytest.mark.parametrize("fields, literal", [
    ({"token": "env:NATS_TOKEN"}, []), ({"token": "file:/run/secrets/t"}, []), ({"token": "s3cret"}, ["token"]),
    ({"user": "u", "password": "env:P"}, []), ({"user": "u", "password": "file:/p"}, []),
    ({"user": "u", "password": "pw"}, ["password"]), ({"nkey_seed": "file:/run/fleet.nk"}, []),
    ({"nkey_seed": "SUAB"}, ["nkey_seed"]), ({}, []),
])
def test_which_nats_secrets_are_literal(fields, literal):
    nats = NatsConfig(**fields)
    assert nats.literal_secrets() == literal
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        parse_config({"nats": fields})
    # ResourceWarnings of objects an earlier test left to the garbage collector may land here too
    assert [str(w.message) for w in caught if not issubclass(w.category, ResourceWarning)] == [
        f"<config>: nats.{name} is a literal secret; use env:NAME or file:PATH outside local tests" for name in literal]


@pytest.mark.parametrize(("url", "says"), [
    ("http://admin:hunter2PW@127.0.0.1:18901", "must not hold credentials"),
    ("http://user@api.example.com", "must not hold credentials"),
    ("http://127.0.0.1:99999", "port from 1 to 65535"),
    ("http://127.0.0.1:0", "port from 1 to 65535"),
    ("https://", "must name a host"),
    ("https://api.example.com/base?k=v", "must not hold a query (?) or a fragment (#)"),  # sent /base?k=v/v1/x
    ("https://api.example.com/a#b", "must not hold a query (?) or a fragment (#)"),  # sent /a, the job's path lost
])
def test_an_upstream_url_with_credentials_or_no_usable_address_is_refused(url, says):
    # accepted before: credentials then showed in `config show`, and every call failed at the
    # HTTP client (it refuses them next to the key's Authorization header), as did a bad port
    with pytest.raises(ConfigError) as refused:
        parse_config({"upstreams": {"u": {"base_url": url}},
                      "pools": {"p": {"keys": [{"id": "k1", "rps": 1, "secret": "env:UNUSED"}]}}})
    assert says in str(refused.value) and "hunter2PW" not in str(refused.value)


@pytest.mark.parametrize("url", ["https://api.openai.com", "http://127.0.0.1:8080/v1/", "http://[::1]:8080"])
def test_ordinary_upstream_urls_pass(url):
    config = parse_config({"upstreams": {"u": {"base_url": url}},
                           "pools": {"p": {"keys": [{"id": "k1", "rps": 1, "secret": "env:UNUSED"}]}}})
    assert config.upstreams["u"].base_url == url.rstrip("/")


@pytest.mark.parametrize("url", ["foo://::::", "nats://127.0.0.1:99999", "nats://127.0.0.1:0", "http://127.0.0.1:4222",
                                 "nats://a:4222,nats://", ",", "nats://u:s3cret-pw@127.0.0.1:99999"])
def test_a_nats_url_that_names_no_server_is_a_config_error(url):
    # `status --nats 'foo://::::'` ended in "unexpected ValueError: Port could not be cast ...", exit 1
    with pytest.raises(ConfigError, match="nats.url") as refused:
        parse_config({"nats": {"url": url}})
    assert "s3cret-pw" not in str(refused.value)


@pytest.mark.parametrize("url", ["nats://127.0.0.1:4222", "127.0.0.1:4222", "localhost", "tls://nats.example:4443",
                                 "nats://a:1, nats://u:p@b:2", "ws://127.0.0.1:8080", "nats://[::1]:4222"])
def test_nats_urls_nats_py_connects_with_pass(url):
    assert parse_config({"nats": {"url": url}}).nats.url == url
