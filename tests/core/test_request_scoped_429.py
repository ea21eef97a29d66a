"""Request-scoped 429s: a 429 about one request (the key had room, or the request is larger
than the whole limit) neither cools the key down nor cuts its rate; key-scoped 429s still
do. The classification table first, then the scheduler over named instants."""

from __future__ import annotations

import pytest
from core_helpers import job, key, make, pool
from hypothesis import given, settings
from hypothesis import strategies as st

from ratefleet.dispatcher.core import CooldownPolicy, Dispatch, Outcome, RateLimitInfo
from ratefleet.schemas.ratelimit_scope import rate_limit_scope

t0, t1, t2, t3, t4, t5, t6, t7, t8, t9 = 0.0, 0.5, 1.0, 2.0, 3.0, 5.0, 10.0, 20.0, 30.0, 100.0
OK = Outcome("ok", 200)
ROOM = RateLimitInfo(remaining_requests=4, remaining_tokens=29000, limit_requests=500, limit_tokens=30000)
NO_ROOM = RateLimitInfo(remaining_requests=0, limit_requests=500, reset_requests_s=1.0)

# the shape OpenAI answers with (users quote it verbatim, e.g. Aider-AI/aider#1880)
TOO_LARGE = {"error": {
    "message": "Request too large for gpt-4o in organization org-abc on tokens per min (TPM): Limit 30000, "
               "Requested 50000. The input or output tokens must be reduced in order to run successfully. "
               "Visit https://platform.openai.com/account/rate-limits to learn more.",
    "type": "tokens", "param": None, "code": "rate_limit_exceeded"}}
REACHED = {"error": {
    "message": "Rate limit reached for gpt-4o in organization org-abc on tokens per min (TPM): Limit 30000, "
               "Used 29937, Requested 385. Please try again in 644ms.",
    "type": "tokens", "param": None, "code": "rate_limit_exceeded"}}
MOCK_BODY = {"error": {"message": "The mock upstream was told to answer 429.", "type": "requests",
                       "code": "rate_limit_exceeded"}}


# -- the verdict on one 429 ---------------------------------------------------------------


@pytest.mark.parametrize(
    "info, body, cost, scope, never_fits",
    [
        (ROOM, TOO_LARGE, 1.0, "request", True),  # OpenAI "Request too large": never fits
        (NO_ROOM, TOO_LARGE, 1.0, "request", True),  # the body outranks the headers
        (None, {"error": {"message": "Request too large for model m."}}, None, "request", True),
        (ROOM, REACHED, 1.0, "key", False),  # "Rate limit reached ... Used": the key is full for now
        (ROOM, {"error": {"message": "Rate limit reached for key k1 on tokens. Please try again in 1s."}},
         1.0, "key", False),  # the mock's own token limit: remaining tokens > 0 but fewer than a call needs
        (ROOM, {"type": "error", "error": {"type": "rate_limit_error", "message": "This request would exceed the "
                                           "rate limit for your organization of 50,000 input tokens per minute."}},
         1.0, "key", False),  # Anthropic
        # the providers' own words for a key out of room, whatever the headers' per-minute counts say
        (ROOM, {"error": {"code": "429", "message": "Requests to the ChatCompletions_Create Operation under Azure "
                          "OpenAI API version 2024-02-01 have exceeded call rate limit of your current OpenAI S0 "
                          "pricing tier. Please retry after 1 second."}}, 1.0, "key", False),  # Azure OpenAI
        (ROOM, {"error": {"message": "Requests to the Embeddings_Create Operation have exceeded token rate limit "
                          "of your current pricing tier."}}, 1.0, "key", False),  # Azure, tokens
        (ROOM, {"type": "error", "error": {"type": "rate_limit_error", "message": "Number of concurrent "
                                           "connections has exceeded your rate limit."}}, 1.0, "key", False),
        (ROOM, {"error": {"code": 429, "message": "Resource has been exhausted (e.g. check quota).",
                          "status": "RESOURCE_EXHAUSTED"}}, 1.0, "key", False),  # Google
        (None, {"error": {"code": 429, "message": "Quota exceeded for metric: generativelanguage.googleapis.com/"
                          "generate_content_free_tier_requests, limit: 15", "status": "RESOURCE_EXHAUSTED"}},
         1.0, "key", False),
        (ROOM, MOCK_BODY, 1.0, "request", False),  # the key's own headers showed room
        (RateLimitInfo(remaining_requests=4), None, None, "request", False),  # tokens absent
        (NO_ROOM, MOCK_BODY, 1.0, "key", False),  # remaining 0
        (RateLimitInfo(remaining_requests=4, remaining_tokens=0), None, 1.0, "key", False),
        (RateLimitInfo(remaining_requests=4, remaining_tokens=100), None, 500.0, "key", False),  # too few left
        (RateLimitInfo(remaining_requests=4, limit_tokens=30000), None, 50000.0, "request", True),  # cost > limit
        (None, None, 1.0, None, False),  # nothing says whose it is
        (RateLimitInfo(remaining_tokens=5000), "not json", 1.0, None, False),  # requests unknown
    ],
)
def test_scope_of_a_429(info, body, cost, scope, never_fits):
    verdict = rate_limit_scope(info, body, cost)
    assert (verdict.scope if verdict else None) == scope
    assert (verdict.never_fits if verdict else False) == never_fits


def test_too_large_names_the_limit_and_the_requested_amount():
    verdict = rate_limit_scope(ROOM, TOO_LARGE, 1.0)
    assert (verdict.limit, verdict.requested, verdict.unit) == (30000, 50000, "tokens per min (TPM)")
    assert verdict.describe_too_large() == "requests 50000 tokens per min (TPM), more than the limit of 30000"


_json = st.recursive(st.none() | st.booleans() | st.floats() | st.integers() | st.text(max_size=60),
                     lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
                     max_leaves=12)
_messages = st.builds(lambda a, b, c: {"error": {"message": f"{a} Limit {b}, Requested {c}"}},
                      st.sampled_from(["Request too large", "Rate limit reached", "x"]),
                      st.text("0123456789,.", max_size=30), st.text("0123456789,.", max_size=30))
_maybe = st.none() | st.floats(allow_nan=False, allow_infinity=False, min_value=-1e12, max_value=1e12)


@settings(max_examples=300, deadline=None)
@given(body=_json | _messages, remaining=_maybe, tokens=_maybe, limit=_maybe, cost=_maybe)
def test_any_body_and_headers_give_a_verdict_or_none_never_an_error(body, remaining, tokens, limit, cost):
    info = RateLimitInfo(remaining_requests=remaining, remaining_tokens=tokens, limit_tokens=limit)
    verdict = rate_limit_scope(info, body, cost)
    assert verdict is None or verdict.scope in ("key", "request")
    if verdict is not None and verdict.never_fits:
        assert verdict.scope == "request" and verdict.describe_too_large()


# -- the scheduler ------------------------------------------------------------------------


def _two_keys():
    return make(pool("p", key("k1", rps=20, burst=5), key("k2", rps=20, burst=5)),
                cooldown=CooldownPolicy(base_s=1.0, max_s=45.0))


def _state(s, at):
    keys = s.snapshot(at)["keys"]
    return {kid: (k["effective_rps"], k["cooldown_s"]) for kid, k in keys.items()}


def _run(s, job_id, at, outcome):
    """Queue one job, dispatch it as soon as a key can take it (from `at` on) and complete it
    with `outcome` at once; returns (its key, when it ran)."""
    s.add(job(job_id=job_id), at)
    decision = s.next(at)
    while not isinstance(decision, Dispatch):
        at = decision.at
        decision = s.next(at)
    s.complete(decision.reservation, outcome, at)
    return decision.key_id, at


def test_a_job_that_always_gets_request_scoped_429s_leaves_both_keys_alone():
    s = _two_keys()
    bad = Outcome("rate_limited", 429, retry_after_s=0.0, ratelimit=ROOM, scope="request")
    used, at = set(), t0
    for i in range(50):  # its whole 429 budget, with normal jobs in between
        used.add(_run(s, "bad", at, bad)[0])
        at = _run(s, f"ok{i}", at, Outcome("ok", 200, ratelimit=ROOM))[1] + 0.1
    assert used  # on whichever key it went, that key and the other are as configured
    assert _state(s, at) == {"k1": (20.0, 0.0), "k2": (20.0, 0.0)}
    s.add(job(job_id="vip", tier="vip"), at)
    assert isinstance(s.next(at), Dispatch)
    snap = s.snapshot(at)["keys"]
    assert snap["k1"]["rate_limited"] + snap["k2"]["rate_limited"] == 50


def test_key_scoped_429s_still_cool_down_with_backoff_and_drop_the_rate():
    s = make(pool("p", key("k1", rps=20, burst=5)), cooldown=CooldownPolicy(base_s=1.0, max_s=45.0))
    full = Outcome("rate_limited", 429, retry_after_s=0.0, ratelimit=RateLimitInfo(remaining_requests=0), scope="key")
    cooldowns, at = [], t0
    for _ in range(3):
        at = _run(s, "j", at, full)[1]
        cooldowns.append(s.snapshot(at)["keys"]["k1"]["cooldown_s"])
    assert cooldowns == [1.0, 2.0, 4.0]
    assert s.snapshot(at)["keys"]["k1"]["effective_rps"] < 20.0


def test_without_evidence_the_same_job_repeating_while_others_succeed_is_its_own():
    s = make(pool("p", key("k1", rps=20, burst=5)), cooldown=CooldownPolicy(base_s=1.0, max_s=45.0))
    bare = Outcome("rate_limited", 429)  # no headers, no body detail: no scope
    _run(s, "bad", t0, bare)  # the first one is the key's (nothing says otherwise)
    assert s.snapshot(t0)["keys"]["k1"]["cooldown_s"] == 1.0
    rate_after_first = s.snapshot(t0)["keys"]["k1"]["effective_rps"]
    at = t0
    for round_ in range(10):
        at = _run(s, f"good{round_}", at, OK)[1]
        at = _run(s, "bad", at, bare)[1]  # again, while the key serves others
        assert s.snapshot(at)["keys"]["k1"]["cooldown_s"] == 0.0, round_
    assert s.snapshot(at)["keys"]["k1"]["effective_rps"] >= rate_after_first
    assert s.snapshot(at)["keys"]["k1"]["rate_limited"] == 11


def test_without_evidence_429s_of_different_jobs_are_the_keys_until_the_key_served_others():
    s = make(pool("p", key("k1", rps=20, burst=5)), cooldown=CooldownPolicy(base_s=1.0, max_s=45.0))
    bare = Outcome("rate_limited", 429)
    _run(s, "a", t0, bare)
    at = _run(s, "good", t0, OK)[1]
    at = _run(s, "b", at, bare)[1]  # another job: the key is short of room again
    assert s.snapshot(at)["keys"]["k1"]["cooldown_s"] > 0.0
    at = _run(s, "a", at, bare)[1]  # a's repeat with no success since b's: still the key's
    assert s.snapshot(at)["keys"]["k1"]["cooldown_s"] > 0.0
    at = _run(s, "good2", at, OK)[1]
    at = _run(s, "a", at, bare)[1]  # again, after the key served another job since: a's own
    at = _run(s, "b", at, bare)[1]  # and b's (a's repeat just before is no sign against the key)
    assert s.snapshot(at)["keys"]["k1"]["cooldown_s"] == 0.0


@pytest.mark.parametrize("bad_jobs", [2, 4])
def test_a_few_jobs_that_always_get_429_leave_a_shared_pool_at_its_rate(bad_jobs):
    """The kind the helper found: N top-tier jobs refused 429 on every call (no headers) among
    a backlog of good ones. After each bad job's first 429 the keys serve the backlog at
    their configured rate, however the bad jobs' retries interleave (before: both keys at
    about 1 % of their rate, ~450x slower, for as long as the bad jobs lived)."""
    s = _two_keys()
    bare = Outcome("rate_limited", 429)
    at = t0
    for i in range(bad_jobs):
        at = _run(s, f"bad{i}", at, bare)[1]  # first 429s: the keys' (back to back, nothing confirms room)
    rates = []
    for round_ in range(30):  # each bad job again after 10 good jobs
        for i in range(10):
            at = _run(s, f"good{round_}-{i}", at, OK)[1]
        for i in range(bad_jobs):
            at = _run(s, f"bad{i}", at, bare)[1]
        rates.append(sum(rps for rps, _ in _state(s, at).values()))
        assert all(cooldown == 0.0 for _, cooldown in _state(s, at).values()), (round_, _state(s, at))
    assert sum(k["rate_limited"] for k in s.snapshot(at)["keys"].values()) == 31 * bad_jobs
    assert rates == sorted(rates) and rates[-1] > rates[0]  # never pulled down again: climbing back


def test_an_unconfirmed_retry_after_waits_at_most_the_cooldown_max_then_a_second_job_confirms_it():
    """One job's 429 naming Retry-After: 3600 on a key that serves others: the key cools for
    cooldown max_s (45 s here), not an hour; another job's 429 right after confirms it."""
    s = make(pool("p", key("k1", rps=20, burst=5)), cooldown=CooldownPolicy(base_s=1.0, max_s=45.0))
    long_wait = Outcome("rate_limited", 429, retry_after_s=3600.0)
    at = _run(s, "good", t0, OK)[1]
    at = _run(s, "a", at, long_wait)[1]
    assert s.snapshot(at)["keys"]["k1"]["cooldown_s"] == 45.0
    at = _run(s, "b", at, long_wait)[1]  # nothing succeeded since a's: everyone is refused
    assert s.snapshot(at)["keys"]["k1"]["cooldown_s"] == 3600.0
    fresh = make(pool("p", key("k1", rps=20, burst=5)), cooldown=CooldownPolicy(base_s=1.0, max_s=45.0))
    _run(fresh, "a", t0, long_wait)  # nothing ever served on it: nothing shows the key works
    assert fresh.snapshot(t0)["keys"]["k1"]["cooldown_s"] == 3600.0
    told = make(pool("p", key("k1", rps=20, burst=5)), cooldown=CooldownPolicy(base_s=1.0, max_s=45.0))
    at = _run(told, "good", t0, OK)[1]
    at = _run(told, "a", at, Outcome("rate_limited", 429, retry_after_s=3600.0, scope="key"))[1]
    assert told.snapshot(at)["keys"]["k1"]["cooldown_s"] == 3600.0  # its headers said: out of room


def test_headers_showing_room_do_not_hide_a_key_that_refuses_everyone():
    s = make(pool("p", key("k1", rps=20, burst=5)), cooldown=CooldownPolicy(base_s=1.0, max_s=45.0))
    roomy = Outcome("rate_limited", 429, ratelimit=ROOM, scope="request")
    at = _run(s, "a", t0, roomy)[1]
    assert s.snapshot(at)["keys"]["k1"]["cooldown_s"] == 0.0  # one job: its own
    at = _run(s, "b", at, roomy)[1]  # another job refused right after, nothing succeeded between
    assert s.snapshot(at)["keys"]["k1"]["cooldown_s"] == 1.0
    assert s.snapshot(at)["keys"]["k1"]["effective_rps"] < 20.0
