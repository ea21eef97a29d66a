"""The gateway's pure parts: caller identity by hashed key, the callers' own limits (token
buckets over named instants, never sleeping) and the [callers] config."""

from __future__ import annotations

import pytest

from ratefleet.gateway.callers import CallerTable, bearer_token, key_digest, unusable_callers
from ratefleet.gateway.limits import Admission, CallerLimits, Refusal
from ratefleet.schemas.config import parse_config
from ratefleet.schemas.errors import ConfigError

BASE = {"upstreams": {"openai": {"base_url": "https://api.openai.com"}},
        "pools": {"shared": {"keys": [{"id": "k1", "secret": "env:K1", "rps": 5}]}}}
T0, T1, T2, T3 = 100.0, 100.5, 105.0, 160.0


def config(callers: dict):
    return parse_config({**BASE, "callers": callers})


def table(monkeypatch, tmp_path, **callers) -> CallerTable:
    monkeypatch.setenv("RF_UNIT_ALICE", "rk-alice-secret")
    (tmp_path / "bob.key").write_text("rk-bob-secret\n")
    return CallerTable.from_config(config(callers))


def test_keys_from_env_file_and_literal_identify_their_caller_and_only_digests_are_kept(monkeypatch, tmp_path):
    with pytest.warns(UserWarning, match="caller 'carol' has a literal key"):
        found = table(monkeypatch, tmp_path,
                      alice={"key": "env:RF_UNIT_ALICE", "tier": "vip"},
                      bob={"key": f"file:{tmp_path / 'bob.key'}", "tier": "guest"},
                      carol={"key": "rk-carol-secret", "tier": "normal"})
    assert found.identify("Bearer rk-alice-secret").tier == "vip"
    assert found.identify("bearer  rk-bob-secret ").name == "bob"
    assert found.identify("Bearer rk-carol-secret").name == "carol"
    for wrong in (None, "", "Bearer", "Basic rk-alice-secret", "Bearer rk-alice-secreT", "rk-alice-secret"):
        assert found.identify(wrong) is None
    kept = repr(vars(found)) + repr(found._by_digest)  # noqa: SLF001 - what the table holds
    assert "rk-" not in kept and key_digest("rk-alice-secret") in found._by_digest  # noqa: SLF001


def unusable(tmp_path) -> dict:
    """Five callers whose keys cannot be used here, and the reasons they are left out with."""
    (tmp_path / "empty.key").write_text(" \n")
    return {"unset": ({"key": "env:RF_UNIT_UNSET", "tier": "vip"}, "RF_UNIT_UNSET not set"),
            "blank": ({"key": "env:RF_UNIT_BLANK", "tier": "vip"}, "RF_UNIT_BLANK not set"),
            "missing": ({"key": f"file:{tmp_path / 'nope.key'}", "tier": "vip"},
                        f"file {tmp_path / 'nope.key'} unreadable (No such file or directory)"),
            "empty": ({"key": f"file:{tmp_path / 'empty.key'}", "tier": "vip"}, f"file {tmp_path / 'empty.key'} empty"),
            "broken": ({"key": "env:RF_UNIT_BROKEN", "tier": "vip"},
                       "RF_UNIT_BROKEN contains a line break (CR/LF)")}


def test_a_caller_whose_key_cannot_be_used_is_left_out_with_why_and_the_others_are_served(monkeypatch, tmp_path):
    monkeypatch.delenv("RF_UNIT_UNSET", raising=False)
    monkeypatch.setenv("RF_UNIT_BLANK", "  ")
    monkeypatch.setenv("RF_UNIT_BROKEN", "rk-broken\nsecret")
    bad = unusable(tmp_path)
    found = table(monkeypatch, tmp_path, alice={"key": "env:RF_UNIT_ALICE", "tier": "vip"},
                  **{name: caller for name, (caller, _why) in bad.items()})
    assert found.left_out == {name: why for name, (_caller, why) in bad.items()}
    assert len(found) == 1 and found.identify("Bearer rk-alice-secret").name == "alice"
    for presented in ("rk-broken", "rk-broken\nsecret", "  ", ""):  # a left-out caller's key names no caller: 401
        assert found.identify(f"Bearer {presented}") is None
    assert "rk-broken" not in repr(found.left_out) + repr(vars(found))
    assert unusable_callers(config({"alice": {"key": "env:RF_UNIT_ALICE", "tier": "vip"},
                                    **{name: caller for name, (caller, _why) in bad.items()}})) == found.left_out


def test_no_usable_caller_key_or_a_shared_key_stops_the_start_naming_the_caller_not_the_key(monkeypatch, tmp_path):
    with pytest.raises(ConfigError, match=r"callers.dave.key: RF_UNIT_DAVE not set"):
        table(monkeypatch, tmp_path, dave={"key": "env:RF_UNIT_DAVE", "tier": "vip"})
    with pytest.raises(ConfigError, match=r"no caller has a usable key \(callers.dave.key: RF_UNIT_DAVE not set; "
                                          r"callers.erin.key: RF_UNIT_ERIN not set\)"):
        table(monkeypatch, tmp_path, dave={"key": "env:RF_UNIT_DAVE", "tier": "vip"},
              erin={"key": "env:RF_UNIT_ERIN", "tier": "vip"})
    assert len(CallerTable.from_config(config({}))) == 0  # no [callers] at all: started, every request 401
    with pytest.raises(ConfigError, match="same key as caller 'alice'") as shared:
        table(monkeypatch, tmp_path, alice={"key": "env:RF_UNIT_ALICE", "tier": "vip"},
              eve={"key": "env:RF_UNIT_ALICE", "tier": "guest"})
    assert "rk-alice-secret" not in str(shared.value)


@pytest.mark.parametrize(("caller", "error"), [
    ({"key": "env:X", "tier": "gold"}, "callers.c.tier: unknown tier 'gold'"),
    ({"key": "env:X", "tier": "vip", "upstreams": ["anthropic"]}, "callers.c.upstreams: unknown upstream 'anthropic'"),
    ({"key": "env:", "tier": "vip"}, "callers.c.key: env: needs a variable name"),
    ({"key": "env:X", "tier": "vip", "rps": 0}, "callers.c.rps: Input should be greater than 0"),
    ({"tier": "vip"}, "callers.c.key: Field required"),
])
def test_bad_caller_config_is_refused_with_the_field_and_why(caller, error):
    with pytest.raises(ConfigError, match=error.replace(".", r"\.")):
        config({"c": caller})


@pytest.mark.parametrize(("authorization", "token"), [
    ("Bearer abc", "abc"), ("BEARER abc", "abc"), ("  Bearer   abc  ", "abc"), ("Bearer", None), ("Token abc", None),
])
def test_bearer_token(authorization, token):
    assert bearer_token(authorization) == token


def caller(monkeypatch, tmp_path, **limits):
    return table(monkeypatch, tmp_path, alice={"key": "env:RF_UNIT_ALICE", "tier": "vip", **limits}).identify(
        "Bearer rk-alice-secret")


def test_requests_per_second_is_a_token_bucket_per_caller(monkeypatch, tmp_path):
    alice = caller(monkeypatch, tmp_path, rps=2, burst=2)
    limits = CallerLimits()
    assert isinstance(limits.admit(alice, T0, 10), Admission)
    assert isinstance(limits.admit(alice, T0, 10), Admission)
    refused = limits.admit(alice, T0, 10)
    assert refused == Refusal("requests", pytest.approx(0.5))
    assert isinstance(limits.admit(alice, T1, 10), Admission)  # one token back after 0.5 s
    assert isinstance(limits.admit(alice, T1, 10), Refusal)


def test_tokens_per_minute_charge_the_estimate_then_the_real_usage(monkeypatch, tmp_path):
    alice = caller(monkeypatch, tmp_path, tokens_per_minute=600)  # 10 tokens/s, capacity 600
    limits = CallerLimits()
    first = limits.admit(alice, T0, 100)
    assert isinstance(first, Admission)
    limits.settle(first, T0, 700)  # the answer used 700: 100 in debt
    refused = limits.admit(alice, T0, 100)
    assert refused == Refusal("tokens", pytest.approx(20.0))  # (100 debt + 100 asked) at 10/s
    assert isinstance(limits.admit(alice, T0 + 20.0, 100), Admission)


def test_a_smaller_real_usage_gives_tokens_back_and_a_huge_estimate_still_fits_an_empty_bucket(monkeypatch, tmp_path):
    alice = caller(monkeypatch, tmp_path, tokens_per_minute=600)
    limits = CallerLimits()
    first = limits.admit(alice, T0, 500)
    limits.settle(first, T0, 50)  # 450 given back
    assert isinstance(limits.admit(alice, T0, 500), Admission)
    later = CallerLimits()
    assert isinstance(later.admit(alice, T3, 100_000), Admission)  # capped at the capacity: never refused forever
    assert isinstance(later.admit(alice, T3, 1), Refusal)


def test_a_caller_without_limits_is_never_refused(monkeypatch, tmp_path):
    alice = caller(monkeypatch, tmp_path)
    limits = CallerLimits()
    assert all(isinstance(limits.admit(alice, T2, 10**9), Admission) for _ in range(1000))
