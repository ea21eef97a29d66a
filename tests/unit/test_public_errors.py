"""Every error of the tree the README draws (schemas/errors.py) can be imported from `ratefleet`,
as `from ratefleet import Client, Job, QueueFull` shows for one of them. Before: JobRejected,
SecretUnavailable, ResultNotStored, InvalidRequest and UpstreamUnavailable raised
AttributeError/ImportError there, so `except ratefleet.JobRejected` itself failed."""

from __future__ import annotations

import ratefleet
from ratefleet.schemas import errors


def test_every_error_of_the_tree_is_importable_from_ratefleet():
    for name in errors.__all__:
        assert getattr(ratefleet, name) is getattr(errors, name), name
        assert name in ratefleet.__all__, name
        assert issubclass(getattr(ratefleet, name), ratefleet.RatefleetError), name
