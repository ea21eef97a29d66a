"""`tiers.<t>.pools = []` was a valid config (check, push) and ended every job of the tier
`failed` / `no_key_available` ("its pools: none") at once; it is refused with the field."""

import pytest

from ratefleet.schemas.config import parse_config
from ratefleet.schemas.errors import ConfigError

BASE = {"upstreams": {"u": {"base_url": "https://api.example.test"}},
        "pools": {"p": {"keys": [{"id": "k1", "secret": "env:RF_K1", "rps": 10}]}}}


def test_a_tier_with_an_empty_pool_list_is_refused():
    with pytest.raises(ConfigError, match=r"tiers\.vip\.pools"):
        parse_config({**BASE, "tiers": {"vip": {"pools": []}}}, source="fleet.toml")
    assert parse_config({**BASE, "tiers": {"vip": {}}}).tier_pools("vip") == ["p"]
    assert parse_config({**BASE, "tiers": {"vip": {"pools": ["p"]}}}).tier_pools("vip") == ["p"]
