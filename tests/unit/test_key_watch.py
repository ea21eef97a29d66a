"""`submit --wait` / `results --wait` name the keys that go out of use and come back (ratefleet/key_watch.py)."""

from __future__ import annotations

from types import SimpleNamespace

import anyio
import pytest

from ratefleet.key_watch import key_changes, watch_keys
from ratefleet.schemas import Subjects


def _key(pool: str = "main", **state) -> dict:
    return {"pool": pool, "disabled": False, **state}


PROVIDER = {"disabled": True, "disabled_by": "provider", "disabled_reason": "invalid_api_key", "probe_in_s": 30}
OPERATOR = {"disabled": True, "disabled_by": "operator", "disabled_reason": "leaked in a CI log"}


def test_the_first_look_names_the_keys_already_out_of_use_only():
    keys = {"k1": _key(**PROVIDER), "k2": _key(), "k3": _key(throttled=True, breaker="open")}
    now, lines = key_changes(None, keys)
    assert set(now) == {"k1"}  # a 429 cooldown or an open breaker comes back by itself: not named
    assert lines == ["key k1 (pool main) is out of use: DISABLED by provider evidence: invalid_api_key; probe in "
                     "30 s; once its secret or account is fixed: `ratefleet keys enable k1`"]  # (KEY before)


def test_a_key_going_out_and_coming_back_is_said_once_each():
    before, _ = key_changes(None, {"k1": _key(), "k2": _key()})
    before, lines = key_changes(before, {"k1": _key(**OPERATOR), "k2": _key()})
    assert lines == ["key k1 (pool main) is out of use: DISABLED by an operator: leaked in a CI log"]
    before, lines = key_changes(before, {"k1": _key(**OPERATOR), "k2": _key()})
    assert lines == []  # no change: nothing printed again
    before, lines = key_changes(before, {"k1": _key(), "k2": _key()})
    assert lines == ["key k1 is back in use"]
    _, lines = key_changes(before, {"k2": _key()})  # k1 removed by a config push: no "back in use"
    assert lines == []


def test_a_pool_losing_its_last_key_is_said_once_and_other_pools_are_not():
    keys = {"k1": _key(**PROVIDER), "k2": _key(), "k3": _key("other")}
    before, _ = key_changes(None, keys)
    before, lines = key_changes(before, {**keys, "k2": _key(**OPERATOR)})
    assert lines[0].startswith("key k2 (pool main) is out of use: DISABLED by an operator")
    assert lines[1].startswith("no key of pool main is in use: its jobs wait for a key's probe to succeed")
    assert "`ratefleet keys enable KEY`" in lines[1] and len(lines) == 2
    _, lines = key_changes(before, {**keys, "k2": _key(**OPERATOR)})
    assert lines == []


@pytest.mark.anyio
async def test_the_watch_skips_answers_without_a_leader_or_while_one_loads_its_keys():
    answers = [RuntimeError("no responders"), {"leader": None, "keys": {}},
               {"leader": "d1", "starting": True, "keys": {"k1": _key(**OPERATOR)}},
               {"leader": "d1", "keys": {"k1": _key(**OPERATOR)}}, {"leader": "d1", "keys": {"k1": _key()}}]
    said: list[str] = []

    async def status():
        answer = answers.pop(0) if answers else {"leader": "d1", "keys": {"k1": _key()}}
        if isinstance(answer, Exception):
            raise answer
        return answer

    client = SimpleNamespace(status=status, subjects=Subjects("ratefleet"))
    with anyio.move_on_after(2):
        await watch_keys(client, said.append, poll_s=0.01)
    assert said[0] == "key k1 (pool main) is out of use: DISABLED by an operator: leaked in a CI log"
    assert said[1].startswith("no key of pool main is in use")  # its only key
    assert said[2:] == ["key k1 is back in use"]


@pytest.mark.anyio
async def test_the_watch_ends_quietly_for_a_user_nats_does_not_allow_to_ask(monkeypatch):
    """A full-suite run: the producer user of examples/nats-accounts.conf got a "nats error ...
    permissions violation" warning in its `submit --wait` output from the watch's status request."""
    import ratefleet.runtime.connect as connect

    asked = []

    async def status():
        asked.append(1)
        connect._REFUSED_OPTIONAL.add("ratefleet.admin.status")  # what the error callback notes inside denial_expected
        raise RuntimeError("no dispatcher answered")

    monkeypatch.setattr(connect, "_REFUSED_OPTIONAL", set())
    with anyio.fail_after(2):
        await watch_keys(SimpleNamespace(status=status, subjects=Subjects("ratefleet")), print, poll_s=0.01)
    assert asked == [1]  # asked once, then no more


def test_a_wait_says_when_a_keys_breaker_opens_and_closes():
    """A trial: jobs the upstream always answered 500 opened the keys' breakers and the batch
    stalled 151 s; the wait said only "nothing new for 29s"."""
    from ratefleet.key_watch import breaker_changes

    closed = {"k1": {"breaker": "closed"}, "k2": {"breaker": "closed"}}
    opened, lines = breaker_changes(None, closed)
    assert opened == set() and lines == []
    opened, lines = breaker_changes(opened, {"k1": {"breaker": "open"}, "k2": {"breaker": "half_open"},
                                             "k3": {"breaker": "open", "disabled": True}})  # (disabled: said apart)
    assert opened == {"k1", "k2"} and len(lines) == 2 and lines[0].startswith("key k1's breaker is open after")
    assert "`dispatcher.breaker_reset_s`" in lines[0]
    opened, lines = breaker_changes(opened, {"k1": {"breaker": "half_open"}, "k2": {"breaker": "open"}})
    assert lines == []  # a probe that failed again: still out, nothing new to say
    opened, lines = breaker_changes(opened, {"k1": {"breaker": "closed"}, "k2": {"breaker": "open"}})
    assert lines == ["key k1's breaker has closed: it takes calls again"]


def test_a_key_disabled_while_its_breaker_was_open_is_not_said_to_take_calls_again():
    from ratefleet.key_watch import breaker_changes
    opened, _ = breaker_changes(None, {"k1": {"breaker": "open"}})
    _, lines = breaker_changes(opened, {"k1": {"breaker": "open", "disabled": True}})
    assert lines == []  # (key_changes says it is out of use)


def test_a_half_open_breaker_reads_probing_in_the_status():
    # the status compared with "half-open" while the leader says "half_open" (BreakerState): never shown
    from ratefleet.status_view import key_state
    assert key_state({"breaker": "half_open"}).startswith("probing: breaker half-open")
