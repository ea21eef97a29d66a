"""`ratefleet keys disable` of a pool's last key in rotation: the leader then ends the queued jobs
of tiers with no other pool as `failed` / `no_key_available` (an operator's drill failed a whole
queued batch without a word of warning). The command now says so."""

from ratefleet.key_watch import pools_left_without_keys


def test_a_pool_whose_every_key_is_disabled_is_named():
    keys = {"k1": {"pool": "shared", "disabled": True}, "k2": {"pool": "shared", "disabled": True},
            "v1": {"pool": "vip", "disabled": False}, "x": {"pool": "spare", "disabled": True}}
    assert pools_left_without_keys(keys) == ["shared", "spare"]
    keys["k2"]["disabled"] = False
    assert pools_left_without_keys(keys) == ["spare"]
    assert pools_left_without_keys({}) == []
