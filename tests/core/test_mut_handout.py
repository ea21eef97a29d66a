"""The Assignment a worker gets for a dispatched job (dispatcher/core/handout.py): every field
taken from the held job, the key decision and the leadership; the job as its validated JSON
text (aliases, no nulls); the queue time from the JOBS message's timestamp to the hand-out,
never negative; compact UTF-8 JSON; and ids that skip the calls the fleet still tracks."""

from __future__ import annotations

import itertools
import json

import pytest

from ratefleet.dispatcher.core.delivery import Incoming
from ratefleet.dispatcher.core.handout import Held, LeaderSettings, assignment_id, assignment_payload, next_number
from ratefleet.dispatcher.core.types import Dispatch, PendingJob, Reservation
from ratefleet.schemas import Job
from ratefleet.schemas.internal import Assignment

SUBMITTED = 1_000.0  # epoch seconds of the JOBS message


def settings(leader_id: str = "d7") -> LeaderSettings:
    return LeaderSettings(leader_id, (3, 11), {"normal": 8}, {"normal": 5}, 1.0, 1.0, 1.0, 1.0, 1 << 20)


def incoming(submitted_at: float = SUBMITTED) -> Incoming:
    job = Job.model_validate({"id": "j9", "request": {"path": "/v1/x", "json": {"q": "été"}}, "cost": 2.0})
    return Incoming(job, "j9", "premium", "up1", "$JS.ACK.j9", "_INBOX.r9", 3, 7, submitted_at, 41,
                    rate_limited=2, max_rate_limited=9)


def decision(*, denial_final: bool = False, variant: str | None = "split") -> Dispatch:
    pending = PendingJob("j9", "premium", "up1", 2.0)
    reservation = Reservation(5, pending, "k4", "pool2", 2.0, 0, 10.0, False, denial_final=denial_final)
    return Dispatch(pending, "k4", "pool2", reservation, variant=variant)


def payload(held: Held, now: float, number: int = 12, silent_s: float = 0.4, **kw) -> tuple[str, dict]:
    new_id, raw = assignment_payload(settings(), held, decision(**kw), now, number, silent_s)
    return new_id, json.loads(raw)


def test_every_field_comes_from_the_held_job_the_decision_and_the_leadership():
    # taken in at monotonic 10.0 (epoch 1000.25, the message stamped 1000.0), handed out at 10.5
    held = Held(incoming(), touched=10.0, at=10.0, wall=SUBMITTED + 0.25)
    new_id, sent = payload(held, 10.5)
    job_json = sent.pop("job_json")
    assert new_id == "d7.12"
    assert sent.pop("queued_ms") == pytest.approx(750.0)
    assert sent == {
        "id": "d7.12", "job_id": "j9", "tier": "premium", "upstream": "up1", "key_id": "k4", "pool": "pool2",
        "ack": "$JS.ACK.j9", "reply_to": "_INBOX.r9", "attempt": 3, "max_attempts": 7,
        "submitted_at": SUBMITTED, "epoch": [3, 11], "seq": 41, "denial_final": False, "rate_limited": 2,
        "max_rate_limited": 9, "variant": "split", "silent_s": 0.4,
    }
    # the job's text as validated: its aliases ("json", not "json_body") and no nulls
    assert json.loads(job_json) == {"id": "j9", "request": {"method": "POST", "path": "/v1/x", "query": {},
                                                            "headers": {}, "json": {"q": "été"}},
                                    "cost": 2.0, "metadata": {}}
    assert "null" not in job_json and '"json":' in job_json and "json_body" not in job_json
    assert job_json == held.incoming.job.model_dump_json(by_alias=True, exclude_none=True)


def test_the_decisions_flags_are_carried_as_they_are():
    held = Held(incoming(), touched=10.0, at=10.0, wall=SUBMITTED)
    _, sent = payload(held, 10.0, denial_final=True, variant=None)
    assert sent["denial_final"] is True and sent["variant"] is None


def test_the_payload_validates_as_an_assignment_and_gives_back_the_job():
    held = Held(incoming(), touched=10.0, at=10.0, wall=SUBMITTED + 0.25)
    _, raw = assignment_payload(settings(), held, decision(), 10.5, 12)
    a = Assignment.model_validate_json(raw)
    assert a.job_model() == held.incoming.job and a.epoch == (3, 11) and a.queued_ms == pytest.approx(750.0)


@pytest.mark.parametrize(("wall", "at", "now", "queued_ms"), [
    (SUBMITTED, 10.0, 10.0, 0.0),  # handed out as it arrived
    (SUBMITTED + 2.0, 10.0, 13.0, 5000.0),  # 2 s on the way in, 3 s held
    (SUBMITTED, 10.0, 10.0004, 0.4),  # under a millisecond stays as it is
    (SUBMITTED - 5.0, 10.0, 11.0, 0.0),  # a message stamped ahead of the leader's clock: never negative
])
def test_the_queue_time_runs_from_the_jobs_timestamp_to_the_hand_out(wall, at, now, queued_ms):
    held = Held(incoming(), touched=at, at=at, wall=wall)
    _, sent = payload(held, now)
    assert sent["queued_ms"] == pytest.approx(queued_ms, abs=1e-6)


def test_the_json_is_compact_utf8():
    held = Held(incoming(), touched=10.0, at=10.0, wall=SUBMITTED)
    _, raw = assignment_payload(settings(), held, decision(), 10.0, 1)
    assert b'", "' not in raw and b'": ' not in raw and b'","' in raw and b'":' in raw
    assert "été".encode() in raw  # not \u00e9t\u00e9


@pytest.mark.parametrize("submitted_at, wall, silent_s", [
    (float("nan"), SUBMITTED, 0.0), (float("-inf"), SUBMITTED, 0.0), (SUBMITTED, float("inf"), 0.0),
    (SUBMITTED, SUBMITTED, float("inf")),
])
def test_a_nan_time_is_refused_rather_than_sent_as_invalid_json(submitted_at, wall, silent_s):
    """`NaN` and `Infinity` are not JSON (RFC 8259 section 6): an assignment with such a time
    (submitted_at, queued_ms, silent_s) must not go out as a message strict JSON parsers refuse."""
    held = Held(incoming(submitted_at=submitted_at), touched=10.0, at=10.0, wall=wall)
    with pytest.raises(ValueError, match="not a finite number"):
        assignment_payload(settings(), held, decision(), 10.0, 1, silent_s)


def test_assignment_ids_are_the_leader_id_and_the_number():
    assert assignment_id("d1", 1) == "d1.1"
    assert assignment_id("dispatcher-b", 305) == "dispatcher-b.305"


def test_next_number_skips_every_id_still_running():
    numbers = itertools.count(1)
    running = {"d1.1", "d1.2", "d1.4", "d2.3"}
    assert next_number(numbers, "d1", running) == 3  # d2.3 is another leader's
    assert next_number(numbers, "d1", running) == 5
    assert next_number(numbers, "d1", running) == 6
    assert next_number(iter([9]), "d1", ()) == 9


def test_silent_s_is_never_negative_and_rounded_to_milliseconds():
    held = Held(incoming(), touched=10.0, at=10.0, wall=SUBMITTED + 0.25)
    assert payload(held, 10.5, silent_s=1.23456)[1]["silent_s"] == 1.235
    assert payload(held, 10.5, silent_s=-0.2)[1]["silent_s"] == 0.0  # a heartbeat read after `now` was taken
