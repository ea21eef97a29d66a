"""RATEFLEET_* environment overrides (schemas/config_env.py): a flag beats the environment,
the environment beats the file, a bad value names the field and the variable, and the
existing variable names (RATEFLEET_CONFIG, RATEFLEET_NATS_URL) keep working."""

from __future__ import annotations

import pytest

from ratefleet.schemas import ConfigError, load_config
from ratefleet.schemas.config_env import OVERRIDES, EnvOverrides

FILE = """
[nats]
url = "nats://file:4222"

[workers]
slots = 12

[upstreams.u]
base_url = "http://127.0.0.1:9"

[pools.p]
keys = [{ id = "k1", secret = "env:K1", rps = 1 }]
"""


@pytest.fixture
def path(tmp_path, monkeypatch):
    for name in [*(f"RATEFLEET_{n.upper()}" for n in OVERRIDES), "RATEFLEET_CONFIG"]:
        monkeypatch.delenv(name, raising=False)
    file = tmp_path / "fleet.toml"
    file.write_text(FILE)
    return file


def test_the_environment_beats_the_file_and_a_flag_beats_the_environment(path, monkeypatch):
    monkeypatch.setenv("RATEFLEET_WORKERS_SLOTS", "7")
    monkeypatch.setenv("RATEFLEET_NATS_URL", "nats://env:4222")
    monkeypatch.setenv("RATEFLEET_NATS_PREFIX", "blue")
    monkeypatch.setenv("RATEFLEET_DISPATCHER_LEASE_TTL_S", "4.5")
    monkeypatch.setenv("RATEFLEET_GATEWAY_LISTEN", "0.0.0.0:9000")
    config = load_config(path)
    assert config.workers.slots == 7 and config.nats.url == "nats://env:4222" and config.nats.prefix == "blue"
    assert config.dispatcher.lease_ttl_s == 4.5 and config.gateway.listen == "0.0.0.0:9000"
    assert load_config(path, nats_url="nats://flag:4222").nats.url == "nats://flag:4222"


def test_without_variables_the_file_holds(path):
    config = load_config(path)
    assert config.workers.slots == 12 and config.nats.url == "nats://file:4222"


def test_a_bad_value_names_the_field_and_the_variable(path, monkeypatch):
    monkeypatch.setenv("RATEFLEET_WORKERS_SLOTS", "many")
    with pytest.raises(ConfigError) as caught:
        load_config(path)
    message = str(caught.value)
    assert f"{path} (with RATEFLEET_WORKERS_SLOTS): workers.slots:" in message, message


def test_ratefleet_config_names_the_file(path, monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path / "..")
    monkeypatch.setenv("RATEFLEET_CONFIG", str(path))
    assert load_config().workers.slots == 12
    assert EnvOverrides().config == str(path)


def test_an_empty_variable_counts_as_unset(path, monkeypatch):
    monkeypatch.setenv("RATEFLEET_WORKERS_SLOTS", "")
    assert load_config(path).workers.slots == 12


@pytest.mark.parametrize("listen", ["nonsense", "8080", "127.0.0.1:0", "127.0.0.1:99999", ":8080",
                                    "127.0.0.1:\u00b2", "127.0.0.1:\u0668\u0660\u0668\u0660"])
def test_a_bad_gateway_listen_names_the_variable(path, monkeypatch, listen):
    # it loaded, and `ratefleet gateway` then blamed `--listen 'nonsense'`, a flag nobody gave
    monkeypatch.setenv("RATEFLEET_GATEWAY_LISTEN", listen)
    with pytest.raises(ConfigError) as caught:
        load_config(path)
    message = str(caught.value)
    assert f"{path} (with RATEFLEET_GATEWAY_LISTEN): gateway.listen: {listen!r}: give HOST:PORT" in message, message


@pytest.mark.parametrize("listen", ["127.0.0.1:8080", "0.0.0.0:1", "[::1]:8080", "gateway.local:65535"])
def test_a_gateway_listen_of_host_and_port_loads(path, monkeypatch, listen):
    monkeypatch.setenv("RATEFLEET_GATEWAY_LISTEN", listen)
    assert load_config(path).gateway.listen == listen


@pytest.mark.parametrize("listen", ["127.0.0.1:\u00b2", "127.0.0.1:\u0668\u0660\u0668\u0660"])
def test_the_gateways_listen_flag_refuses_a_port_of_other_digits(listen):
    # str.isdigit() takes a superscript two or Arabic-Indic digits: the config said "invalid literal
    # for int()" and `ratefleet gateway --listen 127.0.0.1:²` ended "unexpected ValueError" (exit 1)
    from ratefleet.gateway.server import parse_listen

    with pytest.raises(ConfigError, match="give HOST:PORT"):
        parse_listen(listen)


@pytest.mark.parametrize("listen", ["::1", "::1:8080", "fe80::1:443"])
def test_an_ipv6_gateway_listen_without_brackets_is_refused(path, monkeypatch, listen):
    # "::1" (the port forgotten) loaded as host ":" and port 1
    monkeypatch.setenv("RATEFLEET_GATEWAY_LISTEN", listen)
    with pytest.raises(ConfigError) as refused:
        load_config(path)
    assert "write an IPv6 address in brackets, e.g. [::1]:8080" in str(refused.value)
    from ratefleet.gateway.server import parse_listen  # and as --listen

    with pytest.raises(ConfigError, match=r"--listen .*: write an IPv6 address in brackets"):
        parse_listen(listen)
