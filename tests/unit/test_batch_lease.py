"""The runner lease in a gateway batch record (ratefleet/gateway/batch_book.py: claim)."""

from ratefleet.gateway.batch_book import PRIVATE, claim, held_by_other, holder, new_batch


def record():
    return new_batch(caller="alice", tier="vip", upstream=None, input_file_id="file-1",
                     endpoint="/v1/chat/completions", completion_window="24h", metadata=None, now=1000.0)


def test_a_free_record_is_claimed_and_renewed_by_its_holder():
    r = claim(record(), "a", now=1000.0, lease_s=10.0)
    assert holder(r) == "a" and r[PRIVATE]["runner"]["until"] == 1010.0
    r = claim(r, "a", now=1005.0, lease_s=10.0)
    assert r[PRIVATE]["runner"]["until"] == 1015.0


def test_another_runner_waits_until_the_lease_lapses():
    r = claim(record(), "a", now=1000.0, lease_s=10.0)
    assert held_by_other(r, "b", 1009.9) and claim(r, "b", now=1009.9, lease_s=10.0) is None
    assert held_by_other(r, None, 1009.9)  # a sweep leaves a live lease alone
    assert not held_by_other(r, "b", 1010.0)
    taken = claim(r, "b", now=1010.0, lease_s=10.0)
    assert taken is not None and holder(taken) == "b"
    assert not held_by_other(record(), None, 0.0) and holder(record()) is None
