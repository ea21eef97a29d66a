"""Intake rules over a fake JetStream message (dispatcher/shell/intake.py `read_message`):
attempt counting from `num_delivered` less handbacks and 429s, the poison limit, the
attempts limit, the reply-subject check (`is_safe_reply`), a custom `auth_header`, and
deadlines (a past one expires, a future one is not expired early). No NATS needed.
"""

from __future__ import annotations

import json
import warnings
from datetime import UTC, datetime, timedelta, timezone
from types import SimpleNamespace

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ratefleet.dispatcher.shell.intake import Incoming, Refused, read_message
from ratefleet.schemas.config import parse_config
from ratefleet.schemas.subjects import is_safe_reply

ACK = "$JS.ACK.RATEFLEET_JOBS.d.1.9.9.0.1"


def config(**sections):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return parse_config({"upstreams": {"u": {"base_url": "https://api.example.test",
                                                 **sections.pop("upstream", {})}},
                             "pools": {"p": {"keys": [{"id": "k1", "secret": "env:K1", "rps": 10}]}}, **sections})


def message(job: dict | bytes | None = None, *, delivered: int = 1, headers: dict | None = None, seq: int = 9):
    data = job if isinstance(job, bytes) else json.dumps(job or {"id": "j1", "request": {"path": "/v1/x"}}).encode()
    meta = SimpleNamespace(num_delivered=delivered, sequence=SimpleNamespace(stream=seq, consumer=seq),
                           timestamp=datetime(2026, 11, 29, 9, 0, tzinfo=UTC))
    return SimpleNamespace(metadata=meta, headers=headers, data=data, reply=ACK)


def job(**fields) -> dict:
    return {"id": "j1", "request": {"path": "/v1/x", **fields.pop("request", {})}, **fields}


# -- attempt counting and the poison limit -----------------------------------------------------


@pytest.mark.parametrize("delivered, handbacks, rate_limited, attempt", [
    (1, 0, 0, 1), (2, 0, 0, 2), (5, 0, 0, 5),
    (4, 3, 0, 1),  # three deliveries handed back without a call: this is the first attempt
    (6, 2, 0, 4),
    (6, 0, 3, 3),  # three 429s are waits, not attempts
    (9, 2, 3, 4),
])
def test_the_attempt_is_deliveries_less_handbacks_and_429s(delivered, handbacks, rate_limited, attempt):
    got = read_message(message(delivered=delivered), "normal", config(), handbacks, rate_limited)
    assert isinstance(got, Incoming), got
    assert (got.attempt, got.max_attempts, got.ack, got.stream_seq, got.job_id) == (attempt, 5, ACK, 9, "j1")
    assert got.submitted_at == datetime(2026, 11, 29, 9, 0, tzinfo=UTC).timestamp()


def test_past_max_attempts_the_job_fails_attempts_exhausted():
    cfg = config()
    assert isinstance(read_message(message(delivered=5), "normal", cfg), Incoming)  # the 5th attempt runs
    got = read_message(message(delivered=6), "normal", cfg)
    assert isinstance(got, Refused)
    assert (got.status, got.code, got.attempt, got.job_id) == ("failed", "attempts_exhausted", 6, "j1")
    # the job's own max_attempts wins over the tier's
    assert isinstance(read_message(message(job(max_attempts=8), delivered=8), "normal", cfg), Incoming)
    assert read_message(message(job(max_attempts=2), delivered=3), "normal", cfg).code == "attempts_exhausted"
    # handbacks keep a redelivered job under its limit
    assert isinstance(read_message(message(delivered=7), "normal", cfg, handbacks=2), Incoming)


def test_a_tiers_max_attempts_applies_to_its_jobs():
    cfg = config(tiers={"gold": {"max_attempts": 2}, "lead": {"max_attempts": 9}})
    assert read_message(message(delivered=3), "gold", cfg).code == "attempts_exhausted"
    assert isinstance(read_message(message(delivered=3), "lead", cfg), Incoming)


def test_the_poison_limit_ends_a_job_delivered_max_deliver_times():
    cfg = config(streams={"max_deliver": 6}, tiers={"normal": {"max_attempts": 100}})
    handed_back = 10  # even a job whose deliveries were all handed back stops at the poison limit
    assert isinstance(read_message(message(delivered=5), "normal", cfg, handed_back), Incoming)
    got = read_message(message(delivered=6), "normal", cfg, handed_back)
    assert isinstance(got, Refused)
    assert (got.status, got.code) == ("failed", "poison_message") and "delivered 6 times" in got.message
    assert got.job is not None and got.raw == message().data


def test_429s_do_not_count_toward_the_poison_limit_but_have_their_own_budget():
    cfg = config(streams={"max_deliver": 6}, tiers={"normal": {"max_attempts": 100, "max_rate_limited": 10}})
    assert isinstance(read_message(message(delivered=14), "normal", cfg, 0, 9), Incoming)  # 5 non-429 deliveries
    assert read_message(message(delivered=15), "normal", cfg, 0, 9).code == "poison_message"  # 6 of them
    got = read_message(message(delivered=11), "normal", cfg, 0, 10)
    assert (got.status, got.code) == ("failed", "rate_limited")


# -- the reply subject ---------------------------------------------------------------------


@pytest.mark.parametrize("subject, safe", [
    ("_INBOX.abc.1", True),
    ("replies.for.me", True),
    ("ratefleetx.ok", True),  # only the prefix token itself is reserved
    (None, False), ("", False),
    ("$JS.API.STREAM.DELETE.RATEFLEET_JOBS", False), ("$KV.ratefleet_leader.lease", False), ("$SYS.REQ", False),
    ("ratefleet", False), ("ratefleet.results._.j1", False), ("ratefleet.internal.assign.w1", False),
    ("_INBOX.*", False), ("_INBOX.>", False), ("a..b", False), ("a.b.", False), (".a", False),
    ("a b", False), ("a\tb", False), ("_INBOX." + "x" * 600, False),
])
def test_is_safe_reply(subject, safe):
    assert is_safe_reply(subject) is safe


def _per_token_rule(subject: str) -> bool:
    """The rule is_safe_reply's one regex scan stands for, token by token (after the length,
    `$` and prefix checks): no empty token, no wildcard, no whitespace as str.isspace sees it."""
    return all(t and "*" not in t and ">" not in t and not any(c.isspace() for c in t) for t in subject.split("."))


# every character str.isspace calls whitespace (Unicode: NBSP, U+2028, U+3000, the ASCII
# separators U+001C-U+001F, ...), so the regex's \s is held to exactly that set
_SPACES = "".join(chr(c) for c in range(0x110000) if chr(c).isspace())


@settings(max_examples=2000, deadline=None)
@given(st.text(alphabet=st.sampled_from("ab_-.*>9\u00e9" + _SPACES), min_size=1, max_size=40))
def test_is_safe_reply_is_the_per_token_rule(subject):
    assert is_safe_reply(subject) is _per_token_rule(subject)  # (never `$...` nor the prefix here)
    assert is_safe_reply("_INBOX." + subject) is _per_token_rule("_INBOX." + subject)


@pytest.mark.parametrize("space", list(_SPACES))
def test_every_kind_of_whitespace_is_refused(space):
    assert not is_safe_reply(f"_INBOX.a{space}b")


def test_a_custom_prefix_is_reserved_too():
    assert not is_safe_reply("acme.results._.j1", "acme") and is_safe_reply("ratefleet.x", "acme")


def test_a_job_asking_for_its_result_on_a_system_subject_is_refused_and_gets_no_reply():
    got = read_message(message(headers={"Ratefleet-Reply-To": "$JS.API.STREAM.PURGE.RATEFLEET_JOBS",
                                        "Nats-Msg-Id": "j1"}), "normal", config())
    assert isinstance(got, Refused)
    assert (got.status, got.code, got.reply_to) == ("invalid", "forbidden_target", None)
    ok = read_message(message(headers={"Ratefleet-Reply-To": "_INBOX.caller.7"}), "normal", config())
    assert isinstance(ok, Incoming) and ok.reply_to == "_INBOX.caller.7"


# -- a custom auth header ------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["X-Acme-Token", "x-acme-token", "X-ACME-TOKEN"])
def test_a_job_setting_the_upstreams_custom_auth_header_is_refused(name):
    # a header name the job schema does not know as auth-like: only the config makes it one
    cfg = config(upstream={"auth_header": "X-Acme-Token", "auth_scheme": ""})
    got = read_message(message(job(request={"headers": {name: "sk-mine"}})), "normal", cfg)
    assert isinstance(got, Refused)
    assert (got.status, got.code) == ("invalid", "forbidden_target") and "'X-Acme-Token' is set by ratefleet" in got.message
    assert isinstance(read_message(message(job(request={"headers": {name: "x"}})), "normal", config()), Incoming)


def test_with_a_custom_auth_header_an_authorization_header_is_still_refused_by_the_job_schema():
    cfg = config(upstream={"auth_header": "X-Acme-Token"})
    got = read_message(message(job(request={"headers": {"Authorization": "Bearer sk-mine"}})), "normal", cfg)
    assert isinstance(got, Refused) and got.status == "invalid"


def test_an_ordinary_header_passes_with_a_custom_auth_header():
    cfg = config(upstream={"auth_header": "X-Acme-Token"})
    assert isinstance(read_message(message(job(request={"headers": {"X-Title": "t"}})), "normal", cfg), Incoming)


# -- deadlines -----------------------------------------------------------------------------------


def at(seconds: float) -> str:
    return (datetime.now(UTC) + timedelta(seconds=seconds)).isoformat()


def test_a_job_past_its_deadline_is_expired_at_intake():
    got = read_message(message(job(deadline=at(-1))), "normal", config())
    assert isinstance(got, Refused) and (got.status, got.code) == ("expired", "deadline_exceeded")


@pytest.mark.parametrize("seconds", [5, 3600, 30 * 86400])
def test_a_job_with_a_future_deadline_is_not_expired_early(seconds):
    got = read_message(message(job(deadline=at(seconds))), "normal", config())
    assert isinstance(got, Incoming), got
    assert got.job.deadline is not None


def test_a_deadline_in_another_time_zone_is_compared_as_an_instant():
    later = (datetime.now(timezone(timedelta(hours=-8))) + timedelta(minutes=10)).isoformat()  # 10 min ahead, UTC-8
    earlier = (datetime.now(timezone(timedelta(hours=9))) - timedelta(minutes=10)).isoformat()  # 10 min ago, UTC+9
    assert isinstance(read_message(message(job(deadline=later)), "normal", config()), Incoming)
    assert read_message(message(job(deadline=earlier)), "normal", config()).status == "expired"
