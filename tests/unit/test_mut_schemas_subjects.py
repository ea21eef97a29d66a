"""Subject names of the public contract (schemas/subjects.py): which producer-given reply
subjects a worker may publish a Result to, the job-id/batch token rule, and the subjects
a producer subscribes to. Deterministic, no server."""

from __future__ import annotations

import pytest

from ratefleet.schemas.subjects import Subjects, is_safe_reply, is_token


@pytest.mark.parametrize("value, ok", [
    ("job-1_A", True), ("a" * 128, True), ("a" * 129, False), ("", False),
    ("a.b", False), ("a b", False), ("a*", False), ("a>", False), ("é", False),
])
def test_token_rule_for_ids_batches_and_tiers(value, ok):
    assert is_token(value) is ok


@pytest.mark.parametrize("subject", [
    "_INBOX.abc.def", "replies.client-7", "a" * 512, "x", "app.results",
])
def test_plain_reply_subjects_are_accepted(subject):
    assert is_safe_reply(subject) is True


@pytest.mark.parametrize("subject, why", [
    (None, "no subject"), ("", "empty"), ("a" * 513, "longer than 512 characters"),
    ("$JS.API.STREAM.DELETE.RATEFLEET_JOBS", "JetStream API"), ("$KV.ratefleet_keys.k1", "KV bucket"),
    ("$SYS.REQ.SERVER.PING", "system account"),
    ("ratefleet", "the prefix itself"), ("ratefleet.jobs.default", "the fleet's own subjects"),
    ("ratefleet.internal.assign.w1", "the fleet's internal protocol"),
    ("replies.*", "a wildcard token"), ("replies.a*", "a wildcard inside a token"),
    ("replies.>", "a full wildcard"), ("replies.a>", "'>' inside a token"),
    ("replies..x", "an empty token"), ("replies.", "an empty last token"), (".replies", "an empty first token"),
    ("replies.a b", "a space"), ("replies.a\tb", "a tab"), ("replies\n", "a line break"),
])
def test_unsafe_reply_subjects_are_refused(subject, why):
    assert is_safe_reply(subject) is False, why


def test_reply_subject_rules_follow_the_configured_prefix():
    assert is_safe_reply("acme.results.b.j", prefix="acme") is False
    assert is_safe_reply("acme", prefix="acme") is False
    assert is_safe_reply("ratefleet.results.b.j", prefix="acme") is True
    assert is_safe_reply("acmex.results", prefix="acme") is True  # only the prefix's own tokens are reserved
    assert is_safe_reply("ratefleetx.a") is True


def test_result_subjects_a_producer_subscribes_to():
    subjects = Subjects()
    assert subjects.results() == "ratefleet.results.*.*"
    assert subjects.results("b1", "j1") == "ratefleet.results.b1.j1"
    assert subjects.results(None, "j1") == "ratefleet.results._.j1"
    assert subjects.results("") == "ratefleet.results._.*"
    assert subjects.batch_results("b1") == "ratefleet.results.b1.*"
    assert subjects.batch_results(None) == "ratefleet.results._.*"


def test_tier_subjects_and_their_wildcards():
    subjects = Subjects("acme")
    assert (subjects.jobs(), subjects.rpc(), subjects.dead()) == ("acme.jobs.*", "acme.rpc.*", "acme.dead.*")
    assert (subjects.jobs("vip"), subjects.rpc("vip"), subjects.dead("vip")) == ("acme.jobs.vip", "acme.rpc.vip",
                                                                                   "acme.dead.vip")


@pytest.mark.parametrize("subject, tier", [
    ("ratefleet.jobs.vip", "vip"), ("ratefleet.rpc.default", "default"), ("a.b.c.jobs.bulk-1", "bulk-1"),
])
def test_tier_of_a_job_subject(subject, tier):
    assert Subjects().tier_of(subject) == tier
