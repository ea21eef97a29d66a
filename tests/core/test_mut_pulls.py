"""The leader's pull accounting (dispatcher/core/pulls.py) driven directly at named instants:
how much a tier asks for (half its window free, never past it), what a delivery, a request's
end and a lost request give back, and a config change of the windows. A wrong count here
either overfills the leader's memory or stops a tier from being fed."""

from __future__ import annotations

import pytest

from ratefleet.dispatcher.core.commands import Pull
from ratefleet.dispatcher.core.pulls import HANDBACK_MARGIN_S, PULL_EXPIRES_S, STALE_AFTER_S, PullBook

t0, t1, t2 = 100.0, 101.0, 102.0


def book(**windows: int) -> PullBook:
    pulls = PullBook(windows or {"normal": 8}, t0)
    pulls.active = True
    return pulls


def test_the_timings_are_the_documented_ones():
    assert (PULL_EXPIRES_S, HANDBACK_MARGIN_S, STALE_AFTER_S) == (1.0, 0.25, 3.0)


def test_nothing_is_asked_before_the_leader_is_ready_or_without_the_lease():
    pulls = PullBook({"normal": 8}, t0)
    assert pulls.top_up("normal", 0, t0, True) == [] and not pulls.open()
    pulls.active = True
    assert pulls.top_up("normal", 0, t0, False) == [] and not pulls.open()


@pytest.mark.parametrize("window, pending, outstanding, asked", [
    (8, 0, 0, 8), (8, 3, 0, 5), (8, 4, 0, 4), (8, 5, 0, None), (8, 2, 2, 4), (8, 2, 3, None),
    (1, 0, 0, 1), (1, 1, 0, None), (3, 2, 0, 1), (3, 3, 0, None),
])
def test_a_tier_asks_for_its_free_room_once_half_its_window_is_free(window, pending, outstanding, asked):
    pulls = book(normal=window)
    pulls.tiers["normal"].outstanding = outstanding
    got = pulls.top_up("normal", pending, t1, True)
    assert got == ([Pull("normal", asked, PULL_EXPIRES_S)] if asked else [])
    assert pulls.tiers["normal"].outstanding == outstanding + (asked or 0)


def test_deliveries_and_request_ends_count_down_and_never_below_zero():
    pulls = book()
    pulls.top_up("normal", 0, t0, True)  # 8 on their way
    pulls.delivered("normal", t1)
    assert pulls.tiers["normal"].outstanding == 7 and pulls.open()
    pulls.status("normal", 2, t1)  # two will not come
    assert pulls.tiers["normal"].outstanding == 5
    pulls.status("normal", 9, t1)
    assert pulls.tiers["normal"].outstanding == 0 and not pulls.open()
    pulls.delivered("normal", t1)
    assert pulls.tiers["normal"].outstanding == 0
    pulls.top_up("normal", 0, t1, True)
    pulls.status("normal", 0, t1)  # 0: none of the request will come
    assert pulls.tiers["normal"].outstanding == 0


@pytest.mark.parametrize("last, stale", [("top_up", False), ("delivered", False), ("status", False), (None, True)])
def test_a_request_is_stale_after_its_last_sign_of_life(last, stale):
    pulls = book()
    pulls.top_up("normal", 0, t0, True)
    if last == "delivered":
        pulls.delivered("normal", t1)
    elif last == "status":
        pulls.status("normal", 1, t1)
    elif last == "top_up":
        pulls.tiers["normal"].outstanding = 2
        pulls.top_up("normal", 0, t1, True)  # room 6: asked at t1
    before = pulls.tiers["normal"].outstanding
    pulls.forget_stale("normal", t1 + STALE_AFTER_S - 0.5)
    assert pulls.tiers["normal"].outstanding == (0 if stale else before)


def test_a_lost_request_is_forgotten_strictly_after_stale_after_s_and_the_clock_restarts():
    pulls = book()
    pulls.top_up("normal", 0, t0, True)
    pulls.forget_stale("normal", t0 + STALE_AFTER_S)
    assert pulls.tiers["normal"].outstanding == 8
    pulls.forget_stale("normal", t0 + STALE_AFTER_S + 0.01)
    assert pulls.tiers["normal"].outstanding == 0
    assert pulls.tiers["normal"].last_activity == t0 + STALE_AFTER_S + 0.01


def test_new_windows_keep_what_is_on_its_way_add_and_drop_tiers():
    pulls = book(normal=8, guest=4)
    pulls.top_up("normal", 0, t0, True)
    pulls.set_windows({"normal": 16, "vip": 6}, t1)
    assert set(pulls.tiers) == {"normal", "vip"}
    assert (pulls.tiers["normal"].window, pulls.tiers["normal"].outstanding) == (16, 8)
    assert (pulls.tiers["vip"].window, pulls.tiers["vip"].outstanding) == (6, 0)
    assert pulls.top_up("vip", 0, t2, True) == [Pull("vip", 6, PULL_EXPIRES_S)]
    assert pulls.top_up("normal", 0, t2, True) == [Pull("normal", 8, PULL_EXPIRES_S)]
