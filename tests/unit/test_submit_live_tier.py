"""`ratefleet submit` reads the fleet's live config before sending: a tier that a config push
removed is still a subject of the JOBS stream (the stream keeps it so queued jobs wait for the
tier's return), so the stream check passes; the live config says whether anything runs it."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from ratefleet.schemas import Subjects
from ratefleet.schemas.config_store import StoredConfig
from ratefleet.submit_report import fleet_upstreams

pytestmark = pytest.mark.anyio

CONFIG = {"upstreams": {"u": {"base_url": "https://api.example.test"}},
          "pools": {"p": {"keys": [{"id": "k1", "secret": "env:RF_K1", "rps": 10}]}},
          "tiers": {"vip": {"weight": 4, "pools": ["p"]}, "normal": {"weight": 1, "pools": ["p"]}}}


class KV:
    async def get(self, key):
        doc = StoredConfig(config=CONFIG, source="fleet.toml", pushed_at=0.0, sha256="0" * 64)
        return SimpleNamespace(value=doc.model_dump_json().encode(), revision=7)


class JS:
    async def key_value(self, bucket):
        return KV()


def client():
    return SimpleNamespace(js=JS(), subjects=Subjects("ratefleet"))


async def test_submit_warns_when_its_tier_is_not_in_the_live_config():
    said: list[str] = []
    assert await fleet_upstreams(client(), warn=said.append, tier="guest") == {"u": "Authorization"}
    assert len(said) == 1 and "tier 'guest' is not in the fleet's live config (revision 7" in said[0]
    assert "[tiers.guest]" in said[0]
    said.clear()
    await fleet_upstreams(client(), warn=said.append, tier="vip")
    assert said == []
