"""Which workers may take a key's jobs (secrets per worker), and how status shows a key's state."""

from __future__ import annotations

from ratefleet.dispatcher.core.fleet import Fleet
from ratefleet.schemas.internal import Heartbeat
from ratefleet.status_view import key_state

KEYS = ["k1", "k2"]


def beat(fleet: Fleet, worker: str, slots: int = 2, **unusable: str) -> None:
    fleet.beat(Heartbeat(worker=worker, slots=slots, unusable_keys=unusable), 0.0)


def test_a_key_goes_only_to_workers_that_hold_its_secret():
    fleet = Fleet(3.0)
    beat(fleet, "w1", slots=8, k1="LOCAL_KEY_1 not set")
    beat(fleet, "w2", slots=1)
    assert fleet.pick("k1").id == "w2" and fleet.pick("k2").id == "w1"
    assert fleet.keys_without_free_holder(KEYS) == frozenset()
    assert fleet.missing_everywhere(KEYS) == {}
    fleet.workers["w2"].slots = 0  # w2 full: k1 has no free holder, k2 does
    assert fleet.keys_without_free_holder(KEYS) == {"k1"} and fleet.pick("k1") is None


def test_a_key_no_live_worker_holds_is_missing_with_the_workers_reasons():
    fleet = Fleet(3.0)
    beat(fleet, "w1", k1="LOCAL_KEY_1 not set")
    beat(fleet, "w2", k1="LOCAL_KEY_1 not set", k2="file /run/k2 empty")
    assert fleet.missing_everywhere(KEYS) == {"k1": "LOCAL_KEY_1 not set"}
    assert Fleet(3.0).missing_everywhere(KEYS) == {}  # no worker known: nothing to say


def test_status_says_who_disabled_a_key_and_when_the_probe_is_due():
    assert key_state({"disabled": False}) == "ok"
    assert key_state({"disabled": True, "disabled_by": "secret", "secret_missing": "LOCAL_KEY_1 not set"}) == (
        "no worker has its secret (LOCAL_KEY_1 not set)")
    assert key_state({"disabled": True, "disabled_by": "provider", "disabled_reason": "invalid_api_key (HTTP 401)",
                      "probe_in_s": 41.6}) == ("DISABLED by provider evidence: invalid_api_key (HTTP 401); probe in 42 s; "
                                               "once its secret or account is fixed: `ratefleet keys enable KEY`")
    assert key_state({"disabled": True, "disabled_by": "operator", "disabled_reason": "rotating"}) == (
        "DISABLED by an operator: rotating")
    # a probe due with no job to send is not "in flight" (an operator's trial: it read so for 90 s, idle)
    due = {"disabled": True, "disabled_by": "provider", "disabled_reason": "invalid_api_key (HTTP 401)", "probe_in_s": 0.0}
    assert "; probe due: the next job that can run on it is sent as the probe;" in key_state(
        {**due, "probe_in_flight": False})
    assert "; probe job in flight;" in key_state({**due, "probe_in_flight": True})
    # an enabled key idle on a token debt says so (it read "ok" while it got no call for minutes)
    assert key_state({"disabled": False, "cost_tokens": -600.0, "cost_per_minute": 600.0,
                      "effective_cost_per_minute": 300.0}) == (
        "ok; token budget overdrawn by 600 (usage above the estimates): no call for about 120 s")
    assert key_state({"disabled": False, "cost_tokens": 12.5, "cost_per_minute": 600.0}) == "ok"


def test_status_does_not_say_ok_for_a_key_whose_breaker_is_open():
    """A config push pointing the upstream at a dead port opened every key's breaker: status showed
    breaker 'open' and state 'ok' side by side, and no word on why nothing was called."""
    assert key_state({"disabled": False, "breaker": "open"}).startswith("no calls: breaker open")
    assert key_state({"disabled": False, "breaker": "half-open"}).startswith("probing")
    assert key_state({"disabled": False, "breaker": "closed"}) == "ok"
