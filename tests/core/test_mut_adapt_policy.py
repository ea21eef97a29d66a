"""The argument checks of `AdaptPolicy` (dispatcher/core/adaptive.py) at their boundaries:
the core refuses a policy that would raise a key above its configured rate or never bring
it back, even when built without the config schema in front of it."""

from __future__ import annotations

import pytest

from ratefleet.dispatcher.core.adaptive import AdaptPolicy


@pytest.mark.parametrize("field, value", [
    ("decrease", 0.5), ("decrease", 0.999),
    ("target_fraction", 1.0), ("target_fraction", 0.01),
    ("floor_fraction", 1.0), ("floor_fraction", 0.01),
    ("recover_s", 0.001), ("probe_per_s", 0.0), ("increase_per_s", 0.001),
    ("first_burst", 1.0), ("first_burst", None),
])
def test_a_policy_at_the_edge_of_its_range_is_accepted(field, value):
    assert getattr(AdaptPolicy(**{field: value}), field) == value


@pytest.mark.parametrize("field, value", [
    ("decrease", 0.0), ("decrease", 1.0), ("decrease", -0.5),
    ("target_fraction", 0.0), ("target_fraction", 1.01),
    ("floor_fraction", 0.0), ("floor_fraction", 1.01),
    ("recover_s", 0.0), ("recover_s", -1.0), ("probe_per_s", -0.001),
    ("increase_per_s", 0.0), ("first_burst", 0.99), ("first_burst", 0.0),
])
def test_a_policy_out_of_range_is_refused_naming_the_field(field, value):
    with pytest.raises(ValueError, match=field):
        AdaptPolicy(**{field: value})
