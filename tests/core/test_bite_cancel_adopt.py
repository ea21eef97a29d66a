"""Survivors of the mutation run over dispatcher/core that a user would notice, pinned down:
a cancelled call gives back exactly its slot, request token and cost tokens (else a key
leaks concurrency until it looks busy for good, or runs slower after every handback), and
calls adopted from a previous leader count against concurrency and feed the breaker like
any other (else a failover forgets a failing key's errors or overfills a key).
"""

from __future__ import annotations

import pytest
from core_helpers import dispatch, job, key, make, pool

from ratefleet.dispatcher.core import Dispatch, Outcome

t0, t1, t2 = 100.0, 100.5, 200.0
OK = Outcome("ok", 200)
FAIL = Outcome("upstream_error", 503)


def snap(s, key_id: str, now: float) -> dict:
    return s.snapshot(now)["keys"][key_id]


def test_a_cancelled_call_gives_back_its_slot_its_request_token_and_its_cost():
    s = make(pool("p", key("k1", rps=1, burst=3, concurrency=2, cost_per_minute=60)))
    for _ in range(3):
        s.add(job(cost=20), t0)
    first, second = dispatch(s, t0), dispatch(s, t0)
    before = snap(s, "k1", t0)
    assert (before["in_flight"], before["tokens"], before["cost_tokens"]) == (2, 1.0, 20.0)
    s.cancel(second.reservation, t0)
    after = snap(s, "k1", t0)
    assert (after["in_flight"], after["tokens"], after["cost_tokens"]) == (1, 2.0, 40.0)
    assert s.pending("normal") == 2
    again = dispatch(s, t0)
    assert again.job == second.job, "the cancelled job did not go back to the head of its queue"
    assert snap(s, "k1", t0)["in_flight"] == 2
    s.complete(first.reservation, OK, t0)
    s.complete(again.reservation, OK, t0)
    assert snap(s, "k1", t0)["in_flight"] == 0


def test_a_key_without_a_cost_budget_cancels_cleanly():
    s = make(pool("p", key("k1", rps=1, burst=2, concurrency=1)))
    s.add(job(), t0)
    d = dispatch(s, t0)
    s.cancel(d.reservation, t0)
    assert (snap(s, "k1", t0)["in_flight"], snap(s, "k1", t0)["tokens"]) == (0, 2.0)
    assert isinstance(s.next(t0), Dispatch)


def test_cancelling_twice_gives_back_once():
    s = make(pool("p", key("k1", rps=1, burst=3, concurrency=3)))
    s.add(job(), t0)
    d = dispatch(s, t0)
    s.cancel(d.reservation, t0)
    s.cancel(d.reservation, t0)
    assert (snap(s, "k1", t0)["in_flight"], snap(s, "k1", t0)["tokens"]) == (0, 3.0)


def test_adopted_calls_fill_the_keys_concurrency_until_they_end():
    s = make(pool("p", key("k1", rps=100, burst=10, concurrency=2)))
    adopted = s.adopt_in_flight("k1", 2, t0)
    assert len(adopted) == 2 and len({r.id for r in adopted}) == 2
    assert all(r.adopted and not r.probe and r.cost == 0.0 and r.key_id == "k1" and r.pool == "p" for r in adopted)
    s.add(job(), t0)
    assert not isinstance(s.next(t0), Dispatch), "a key full of adopted calls took another"
    s.complete(adopted[0], OK, t0)
    assert isinstance(s.next(t0), Dispatch)
    assert s.adopt_in_flight("k1", 0, t0) == []
    with pytest.raises(ValueError, match="count must be >= 0"):
        s.adopt_in_flight("k1", -1, t0)


def test_failures_of_adopted_calls_open_the_breaker():
    s = make(pool("p", key("k1", rps=100, burst=10)), fail_max=3)
    for reservation in s.adopt_in_flight("k1", 3, t0):
        s.complete(reservation, FAIL, t1)
    assert snap(s, "k1", t1)["breaker"] == "open"
    assert snap(s, "k1", t1)["in_flight"] == 0


# -- a new leader restores the disabled keys its predecessor persisted ---------------------------


def test_a_restored_key_keeps_its_probe_backoff_its_next_probe_and_how_long_it_was_disabled():
    from ratefleet.dispatcher.core import ProbePolicy

    s = make(pool("p", key("k1"), key("k2")), probe=ProbePolicy(base_s=10.0, max_s=1000.0))
    record = {"by": "provider", "reason": "invalid_api_key (HTTP 401)", "probe_delay_s": 40.0,
              "probe_in_s": 12.5, "disabled_for_s": 300.0}
    s.restore_key("k1", record, t0)
    view = snap(s, "k1", t0)
    assert (view["disabled"], view["disabled_by"], view["disabled_reason"]) == (True, "provider", record["reason"])
    assert (view["disabled_for_s"], view["probe_in_s"]) == (300.0, 12.5)
    assert s.key_record("k1", t0) == record, "a second failover would not carry the same state on"
    assert s.key_record("k1", t0 + 2.5) == {**record, "probe_in_s": 10.0, "disabled_for_s": 302.5}


def test_a_restored_record_without_times_starts_them_at_zero():
    s = make(pool("p", key("k1")))
    s.restore_key("k1", {"by": "operator", "reason": "leaked"}, t0)
    view = snap(s, "k1", t0)
    assert (view["disabled_by"], view["disabled_for_s"], view["probe_in_s"]) == ("operator", 0.0, None)
    with pytest.raises(ValueError, match="unknown disabled_by 'nobody'"):
        s.restore_key("k1", {"by": "nobody", "reason": "x"}, t0)


# -- a 429 slows the budget that ran out -----------------------------------------------------------


def _after_429(remaining_requests, remaining_tokens) -> dict:
    from ratefleet.dispatcher.core import RateLimitInfo

    s = make(pool("p", key("k1", rps=10, burst=5, cost_per_minute=600)))
    s.add(job(cost=1), t0)
    d = dispatch(s, t0)
    info = RateLimitInfo(remaining_requests=remaining_requests, remaining_tokens=remaining_tokens)
    s.complete(d.reservation, Outcome("rate_limited", 429, ratelimit=info), t0)
    return snap(s, "k1", t0)


def test_a_429_with_the_token_budget_out_slows_tokens_not_requests():
    view = _after_429(remaining_requests=5, remaining_tokens=0)
    assert view["effective_rps"] == 10 and view["effective_cost_per_minute"] < 600, view


@pytest.mark.parametrize("remaining_requests, remaining_tokens", [(0, 0), (0, 100), (None, None), (3, 50), (3, 1)])
def test_any_other_429_slows_requests_not_tokens(remaining_requests, remaining_tokens):
    view = _after_429(remaining_requests, remaining_tokens)
    assert view["effective_rps"] < 10 and view["effective_cost_per_minute"] == 600, view


# -- operator decisions --------------------------------------------------------------------------


def test_an_operator_disabled_key_is_never_probed_and_a_repeated_decision_is_no_change():
    s = make(pool("p", key("k1", rps=100, burst=10)))
    assert s.disable_key("k1", "leaked in a CI log", t0) is True
    assert s.key_changes() == ["k1"]
    assert s.disable_key("k1", "leaked in a CI log", t0) is False  # the same decision again
    assert s.key_changes() == []
    s.add(job(), t0)
    assert not isinstance(s.next(t2 + 10_000), Dispatch), "an operator-disabled key took a job (a probe?)"
    view = snap(s, "k1", t2)
    assert (view["disabled_by"], view["probe_in_s"]) == ("operator", None)
    assert s.key_record("k1", t2)["probe_in_s"] is None
    assert s.disable_key("k1", "rotated", t2) is True and s.key_changes() == ["k1"]  # a new reason is a change
    assert s.enable_key("k1", t2) is True and s.key_changes() == ["k1"]
    s.add(job(), t2 + 10_000)
    assert isinstance(s.next(t2 + 10_000), Dispatch)
