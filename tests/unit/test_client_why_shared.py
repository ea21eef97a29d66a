"""Requests timing out together ask the fleet why once, not once each: the leader answers about
200 status requests a second (measured on a trial fleet: 1,000 at once took 5 s and 446 went
unanswered), and 1,000 user requests timing out at the same moment (the fleet already slow)
sent it 1,000. Now one status answer serves every request of the Client timing out within
WHY_SHARED_S of it; a later timeout asks again."""

from __future__ import annotations

import asyncio
import json
from types import SimpleNamespace

import pytest

from ratefleet.client import Client

pytestmark = pytest.mark.anyio


class StatusNats:
    is_connected = True
    is_closed = is_draining = False

    def __init__(self) -> None:
        self.asked = 0

    def jetstream(self):
        return SimpleNamespace()

    async def request(self, subject, payload, timeout):
        self.asked += 1
        await asyncio.sleep(0.05)  # the leader's answer takes a moment
        return SimpleNamespace(data=json.dumps({"leader": "d1", "workers": {}}).encode())


async def test_concurrent_timeouts_share_one_status_request(monkeypatch):
    import ratefleet.client_request as client_module

    # (the window made long: on a loaded CI machine the 1,000 starts once spanned more than the
    # real 1 s and a second request went out; the window itself is the next test's)
    monkeypatch.setattr(client_module, "WHY_SHARED_S", 60.0)
    nc = StatusNats()
    client = Client(nc)  # type: ignore[arg-type]
    answers = await asyncio.gather(*(client.why_unrun() for _ in range(1000)))
    assert nc.asked == 1  # before: 1,000
    assert {reason for reason, _ in answers} == {"no_worker"}


async def test_a_timeout_later_than_the_shared_window_asks_again(monkeypatch):
    import ratefleet.client_request as client_module

    nc = StatusNats()
    client = Client(nc)  # type: ignore[arg-type]
    await client.why_unrun()
    assert client_module.WHY_SHARED_S > 0
    monkeypatch.setattr(client_module, "WHY_SHARED_S", 0.0)  # the window over: as if WHY_SHARED_S passed
    await client.why_unrun()
    assert nc.asked == 2


class KeysNats(StatusNats):
    def __init__(self, keys: dict) -> None:
        super().__init__()
        self.keys = keys

    async def request(self, subject, payload, timeout):
        self.asked += 1
        return SimpleNamespace(data=json.dumps({"leader": "d1", "workers": {"w1": {}}, "keys": self.keys}).encode())


@pytest.mark.parametrize(("keys", "reason"), [
    # both keys between two cooldowns (Retry-After run out), each last answered 429: before, no reason
    ({"k1": {"cooldown_s": 0.0, "throttled": True}, "k2": {"cooldown_s": 0.0, "throttled": True}}, "no_key_ready"),
    ({"k1": {"cooldown_s": 0.7, "throttled": True}, "k2": {"cooldown_s": 0.0, "throttled": True}}, "no_key_ready"),
    ({"k1": {"cooldown_s": 0.0, "throttled": True}, "k2": {"disabled": True}}, "no_key_ready"),
    # one key never refused (or answered since): it can take the job, so no reason is claimed
    ({"k1": {"cooldown_s": 0.0, "throttled": True}, "k2": {"cooldown_s": 0.0, "throttled": False}}, None),
    ({"k1": {"cooldown_s": 0.0}, "k2": {"cooldown_s": 2.0, "throttled": True}}, None),
])
async def test_keys_that_last_answered_429_count_as_not_ready(keys, reason):
    client = Client(KeysNats(keys))  # type: ignore[arg-type]
    got, text = await client.why_unrun()
    assert got == reason, text
    if reason:
        assert "cooling down" in text


async def test_every_key_disabled_is_named_with_each_keys_reason():
    """A gateway trial: with the provider refusing both keys (401), each request waited its
    whole timeout and the answer said only that every key was cooling down, breaker open or
    disabled; the keys' reasons were only in the dispatcher's log."""
    keys = {"k1": {"disabled": True, "disabled_by": "provider", "disabled_reason": "invalid_api_key (HTTP 401)"},
            "k2": {"disabled": True, "disabled_by": "operator", "disabled_reason": "leaked"}}
    got, text = await Client(KeysNats(keys)).why_unrun()  # type: ignore[arg-type]
    assert got == "no_key_ready"
    assert text.startswith("every key is disabled (k1: invalid_api_key (HTTP 401); k2: leaked)")
    assert "`ratefleet keys enable KEY`" in text


async def test_a_leader_taking_over_is_not_called_a_fleet_without_workers():
    """A review: a dispatcher whose own session restarts answers `starting` with no workers; the
    timeout's reason read "the leader has no worker ... once one starts (`ratefleet worker`)"."""
    class TakingOver(StatusNats):
        async def request(self, subject, payload, timeout):
            return SimpleNamespace(data=json.dumps({"leader": "d1", "starting": True}).encode())

    got, text = await Client(TakingOver()).why_unrun()  # type: ignore[arg-type]
    assert got == "no_leader" and text.startswith("the leader d1 is taking over"), text


def test_the_gateways_504_keeps_key_reasons_and_a_not_stored_jobs_cause_apart():
    """A review: the 504 named each key's reason to outside callers (a secret's variable or file
    can be in it), and said "it is stored and still runs" of a job NATS never confirmed storing."""
    from ratefleet.gateway.errors import timed_out

    keys = timed_out("j1", 30, "no_key_ready", "every key is disabled (k1: LOCAL_KEY_1 not set)")
    assert "LOCAL_KEY_1" not in keys.message and "k1" not in keys.message
    assert "no key of the fleet can take it now" in keys.message and "`ratefleet status`" in keys.message
    unstored = timed_out("j1", 30, None, "NATS did not confirm storing it (its acknowledgement had not come); it may "
                         "be stored, and then runs (and is paid)")
    assert "NATS did not confirm storing it" in unstored.message and "stored and still runs" not in unstored.message
    assert "it may still run (and be paid)" in timed_out("j1", 30).message  # nothing known: as before


async def test_a_job_past_its_deadline_is_said_to_end_expired_not_to_run_later():
    """A gateway trial: with the workers stopped, the 504 said "the job is stored and runs (and
    is paid) once one starts" of a job whose deadline (the caller's timeout) had passed: it ended
    `expired`, never called. The same status with the deadline not passed keeps the old text."""
    from datetime import UTC, datetime, timedelta

    class NoWorkers(StatusNats):
        async def request(self, subject, payload, timeout):
            return SimpleNamespace(data=json.dumps({"leader": "d1", "workers": {}}).encode())

    past, later = datetime.now(UTC) - timedelta(seconds=1), datetime.now(UTC) + timedelta(minutes=5)
    client = Client(NoWorkers())  # type: ignore[arg-type]
    got, text = await client.why_unrun(past)
    assert got == "no_worker" and text == ("the leader has no worker: its deadline has passed, so it is not called any "
                                           "more: it ends `expired`, unpaid")
    for deadline in (later, None):
        got, text = await client.why_unrun(deadline)
        assert text == "the leader has no worker: the job is stored and runs (and is paid) once one starts (`ratefleet worker`)"

    class Silent(StatusNats):
        async def request(self, subject, payload, timeout):
            raise TimeoutError

    got, text = await Client(Silent()).why_unrun(past)  # nothing known: it may be in its call
    assert got is None and "if it is in its call it may still finish (and be paid)" in text and "`expired`" in text
    assert (await Client(Silent()).why_unrun())[1] == "it is stored and still runs"


class TwoUpstreamsNats(StatusNats):
    async def request(self, subject, payload, timeout):
        self.asked += 1
        keys = {"a1": {"upstream": "openai", "disabled": False}, "b1": {"upstream": "bad", "disabled": True,
                                                                           "disabled_by": "provider",
                                                                           "disabled_reason": "invalid_api_key"}}
        return SimpleNamespace(data=json.dumps({"leader": "d1", "workers": {"w1": {}}, "keys": keys}).encode())


async def test_the_reason_judges_the_keys_of_the_jobs_upstream():
    """A break-it trial: the only key of the job's upstream was disabled, the other upstream's key
    ready, and the timeout gave no reason ("it is stored and still runs")."""
    nc = TwoUpstreamsNats()
    client = Client(nc)  # type: ignore[arg-type]
    reason, why = await client.why_unrun(upstream="bad")
    assert reason == "no_key_ready" and "every key of upstream 'bad' is disabled (b1: invalid_api_key)" in why
    assert (await client.why_unrun(upstream="openai"))[0] is None
    assert (await client.why_unrun())[0] is None  # a job naming none: every key, one is ready
    assert nc.asked == 1  # one status answer, judged per request
