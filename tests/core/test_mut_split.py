"""The A/B split of a tier (dispatcher/core/split.py) at exact values: the point of an id
(pinned literals, so a changed byte order, slice, scale or encoding moves jobs to the other
side, which would break the promise that every leader and every replay agrees), the side at
the share boundary (a point equal to the share is control), and the range checks of a split."""

from __future__ import annotations

import math

import pytest

from ratefleet.dispatcher.core.split import SplitSpec, split_point, variant_of


@pytest.mark.parametrize("job_id, point", [
    ("job-1", 0.00944079313386926),
    ("", 0.8894159948913374),
    ("é", 0.2914021905164211),  # UTF-8, two bytes
    ("\ud800x", 0.4556868455527685),  # a lone surrogate (from JSON) is hashed, not refused
])
def test_the_point_of_an_id_is_fixed(job_id, point):
    assert split_point(job_id) == point


@pytest.mark.parametrize("job_id", ["job-1", "", "é"])
def test_a_point_equal_to_the_share_is_control_and_one_just_above_is_split(job_id):
    point = split_point(job_id)
    assert variant_of(job_id, SplitSpec(("alt",), point)) == "control"
    assert variant_of(job_id, SplitSpec(("alt",), math.nextafter(point, 1.0))) == "split"
    assert variant_of(job_id, SplitSpec(("alt",), math.nextafter(point, 0.0))) == "control"


def test_share_one_sends_every_job_to_the_split_and_share_zero_routes_as_without_a_split():
    assert variant_of("", SplitSpec(("alt",), 1.0)) == "split"  # the highest point above
    assert variant_of("job-1", SplitSpec(("alt",), 0.0)) is None  # below 0.01, still no variant
    assert variant_of("job-1", SplitSpec(("alt",), 5e-324)) == "control"
    assert variant_of("job-1", None) is None


@pytest.mark.parametrize("share", [0.0, 1.0, 0.5])
def test_a_share_within_zero_and_one_is_accepted(share):
    assert SplitSpec(("alt", "b"), share).share == share


@pytest.mark.parametrize("share", [-1e-9, 1.0 + 1e-9, -1.0, 2.0])
def test_a_share_outside_zero_and_one_is_refused_naming_it(share):
    with pytest.raises(ValueError, match=f"split share must be within \\[0, 1\\], got {share}"):
        SplitSpec(("alt",), share)


def test_a_split_without_pools_is_refused():
    with pytest.raises(ValueError, match=r"^a split needs at least one pool$"):
        SplitSpec((), 0.5)
