"""Fixtures for the scheduling-core tests."""

from __future__ import annotations

import pytest
from core_helpers import time_zone


@pytest.fixture(params=["Asia/Tokyo", "America/Los_Angeles"])
def non_utc(request):
    """Run the test with the process in a non-UTC time zone (aiobreaker mixes UTC/local)."""
    with time_zone(request.param) as name:
        yield name
