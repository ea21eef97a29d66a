"""A key's circuit breaker (dispatcher/core/breaker.py) driven directly, at exact values:
the failure count that opens it (fail_max, not one more or less), the instant the reset
timeout ends (`now == opened_at + reset` already half-opens), the single probe slot, which
verdict each outcome kind gives (closed and as the probe), and the generation that keeps
late outcomes from flipping a fresh state. A wrong value here lets calls through to a
failing upstream, or keeps a healthy key shut."""

from __future__ import annotations

import pytest

from ratefleet.dispatcher.core.breaker import BreakerState, KeyBreaker, verdict
from ratefleet.dispatcher.core.types import BreakerPolicy
from ratefleet.schemas.outcome import OutcomeKind as K

RESET = 10.0


def fresh(fail_max: int = 3) -> KeyBreaker:
    return KeyBreaker(BreakerPolicy(fail_max=fail_max, reset_timeout_s=RESET), "k1")


def fail(b: KeyBreaker, n: int, now: float, first_id: int = 100) -> None:
    for i in range(n):
        b.settle(first_id + i, b.generation, K.UPSTREAM_ERROR, now)


def opened(now: float = 5.0) -> KeyBreaker:
    b = fresh()
    fail(b, 3, now)
    assert b.state is BreakerState.OPEN
    return b


def half_open(now: float = 5.0) -> KeyBreaker:
    b = opened(now)
    assert b.gate(now + RESET) == now + RESET
    assert b.state is BreakerState.HALF_OPEN
    return b


@pytest.mark.parametrize("kind, closed, probe", [
    (K.UPSTREAM_ERROR, False, False),
    (K.OK, True, True),
    (K.RATE_LIMITED, None, True),
    (K.BAD_REQUEST, None, True),
    (K.KEY_ERROR, None, None),
    (K.DENIED, None, None),
    (K.NONE, None, None),
])
def test_each_outcome_kind_s_verdict_while_closed_and_as_the_probe(kind, closed, probe):
    assert verdict(kind, False) is closed
    assert verdict(kind, True) is probe


def test_a_new_breaker_is_closed_at_generation_zero_without_probe_or_open_time():
    b = fresh()
    assert (b.state, b.generation, b.opened_at, b.probe, b.reset_timeout_s) == (
        BreakerState.CLOSED, 0, None, None, RESET)
    assert b.gate(7.0) == 7.0
    assert b.view(7.0) is BreakerState.CLOSED


@pytest.mark.parametrize("fail_max", [1, 2, 3, 5])
def test_it_opens_on_exactly_the_fail_max_th_consecutive_failure(fail_max):
    b = fresh(fail_max)
    fail(b, fail_max - 1, 1.0)
    assert (b.state, b.generation, b.opened_at) == (BreakerState.CLOSED, 0, None)
    fail(b, 1, 2.5)
    assert (b.state, b.generation, b.opened_at) == (BreakerState.OPEN, 1, 2.5)


def test_a_success_resets_the_count_of_consecutive_failures():
    b = fresh(3)
    fail(b, 2, 1.0)
    b.settle(1, 0, K.OK, 1.5)
    fail(b, 2, 2.0)
    assert b.state is BreakerState.CLOSED
    fail(b, 1, 3.0)
    assert (b.state, b.opened_at) == (BreakerState.OPEN, 3.0)


@pytest.mark.parametrize("kind", [K.RATE_LIMITED, K.BAD_REQUEST, K.KEY_ERROR, K.DENIED, K.NONE])
def test_outcomes_that_are_no_verdict_neither_count_nor_reset_the_failures(kind):
    b = fresh(3)
    fail(b, 2, 1.0)
    b.settle(1, 0, kind, 1.5)
    assert b.state is BreakerState.CLOSED
    fail(b, 1, 2.0)
    assert (b.state, b.opened_at) == (BreakerState.OPEN, 2.0)


def test_open_admits_nothing_before_the_reset_and_half_opens_at_exactly_the_reset():
    b = opened(5.0)
    assert b.gate(5.0) == 15.0
    assert b.gate(14.999) == 15.0
    assert (b.state, b.generation) == (BreakerState.OPEN, 1)
    assert b.view(14.999) is BreakerState.OPEN
    assert b.view(15.0) is BreakerState.HALF_OPEN
    assert b.state is BreakerState.OPEN  # view moves nothing
    assert b.gate(15.0) == 15.0
    assert (b.state, b.generation, b.probe) == (BreakerState.HALF_OPEN, 2, None)
    assert b.view(15.0) is BreakerState.HALF_OPEN


def test_a_late_gate_half_opens_and_admits_at_its_own_now():
    b = opened(5.0)
    assert b.gate(40.0) == 40.0
    assert b.state is BreakerState.HALF_OPEN


def test_half_open_has_one_probe_slot_and_a_busy_slot_admits_nothing():
    b = half_open(5.0)
    assert b.take_probe(7) is True
    assert b.probe == 7
    assert b.gate(16.0) is None
    assert b.gate(100.0) is None


def test_only_a_half_open_breaker_hands_out_the_probe():
    b = fresh()
    assert b.take_probe(7) is False
    assert b.probe is None
    b = opened()
    assert b.take_probe(7) is False
    assert b.probe is None


def test_only_the_reservation_holding_the_probe_frees_it():
    b = half_open()
    b.take_probe(7)
    assert b.release_probe(8) is False
    assert b.probe == 7
    assert b.release_probe(7) is True
    assert b.probe is None
    assert b.release_probe(7) is False
    assert b.gate(16.0) == 16.0


def test_a_successful_probe_closes_and_starts_a_new_generation():
    b = half_open(5.0)
    b.take_probe(7)
    b.settle(7, b.generation, K.OK, 16.0)
    assert (b.state, b.generation, b.probe) == (BreakerState.CLOSED, 3, None)
    assert b.gate(16.0) == 16.0
    fail(b, 2, 17.0)
    assert b.state is BreakerState.CLOSED  # the count starts again from zero


def test_a_failed_probe_opens_again_for_a_full_reset_from_its_answer():
    b = half_open(5.0)
    b.take_probe(7)
    b.settle(7, b.generation, K.UPSTREAM_ERROR, 18.0)
    assert (b.state, b.generation, b.probe, b.opened_at) == (BreakerState.OPEN, 3, None, 18.0)
    assert b.gate(27.9) == 28.0
    assert b.gate(28.0) == 28.0
    assert b.state is BreakerState.HALF_OPEN


@pytest.mark.parametrize("kind", [K.RATE_LIMITED, K.BAD_REQUEST])
def test_a_coherent_refusal_of_the_probe_closes(kind):
    b = half_open()
    b.take_probe(7)
    b.settle(7, b.generation, kind, 16.0)
    assert b.state is BreakerState.CLOSED


@pytest.mark.parametrize("kind", [K.KEY_ERROR, K.DENIED, K.NONE])
def test_a_probe_without_a_verdict_only_frees_the_slot(kind):
    b = half_open()
    generation = b.generation
    b.take_probe(7)
    b.settle(7, generation, kind, 16.0)
    assert (b.state, b.generation, b.probe) == (BreakerState.HALF_OPEN, generation, None)
    assert b.gate(16.0) == 16.0


def test_a_call_that_was_not_the_probe_gives_no_probe_verdict():
    b = half_open()
    b.take_probe(7)
    b.settle(8, b.generation, K.RATE_LIMITED, 16.0)  # not the probe: no verdict, slot kept
    assert (b.state, b.probe) == (BreakerState.HALF_OPEN, 7)


def test_outcomes_of_an_older_generation_do_not_feed_the_breaker():
    b = fresh(1)
    b.settle(1, 0, K.UPSTREAM_ERROR, 1.0)
    assert (b.state, b.generation) == (BreakerState.OPEN, 1)
    b.gate(11.0)
    b.take_probe(9)
    b.settle(9, b.generation, K.OK, 12.0)  # closed again, generation 3
    assert (b.state, b.generation) == (BreakerState.CLOSED, 3)
    b.settle(2, 2, K.UPSTREAM_ERROR, 12.5)  # reserved while half-open: too late to count
    assert b.state is BreakerState.CLOSED
    b.settle(3, 3, K.UPSTREAM_ERROR, 13.0)
    assert (b.state, b.opened_at) == (BreakerState.OPEN, 13.0)


def test_an_outcome_arriving_while_open_neither_closes_nor_moves_the_open_time():
    b = opened(5.0)
    b.settle(50, b.generation, K.OK, 6.0)
    b.settle(51, b.generation, K.UPSTREAM_ERROR, 7.0)
    assert (b.state, b.generation, b.opened_at) == (BreakerState.OPEN, 1, 5.0)
    assert b.gate(14.0) == 15.0


def test_a_late_outcome_still_frees_the_probe_it_held():
    b = half_open()
    b.take_probe(7)
    b.settle(7, b.generation - 1, K.OK, 16.0)  # an older generation: frees the slot only
    assert (b.state, b.probe) == (BreakerState.HALF_OPEN, None)


def test_each_state_change_clears_the_probe_slot():
    b = half_open(5.0)
    b.take_probe(7)
    b.settle(8, b.generation, K.OK, 16.0)  # another reservation's success closes
    assert (b.state, b.probe) == (BreakerState.CLOSED, None)
