"""The leader's key-health decisions (dispatcher/core/leader_keys.py) through the leader
machine, command for command: what an earlier leader's saved state becomes after a
failover (times aged by the wall clock between the save and now), what is logged and
persisted when a key changes, the operator's disable/enable answers, and keys taken out
because no worker holds their secret. Named instants, no clock."""

from __future__ import annotations

import pytest
from leader_helpers import T0, TIERS, beat, machine, spec

from ratefleet.dispatcher.core import Outcome
from ratefleet.dispatcher.core import commands as cmd
from ratefleet.dispatcher.core import events as ev
from ratefleet.dispatcher.core.leader_keys import MALFORMED, MAX_REASON_CHARS

WALL = 1_700_000_000.0  # epoch seconds at the new leader's start
INVALID_KEY = Outcome("key_error", 401, code="invalid_api_key")


def started(records: dict, wall: float = WALL, keys: int = 2):
    m = machine(keys=keys, start=False)
    out = m.handle(ev.SessionStarted(records, wall), T0)
    return m, [c for c in out if isinstance(c, cmd.Log)]


def handle(m, event: ev.Event, now: float) -> list[cmd.Command]:
    """The key-health commands of one step (logs, saves, answers; no announces or pulls)."""
    return [c for c in m.handle(event, now) if isinstance(c, cmd.Log | cmd.SaveKey | cmd.Respond)]


def key_view(m, key_id: str, now: float = T0) -> dict:
    return m.scheduler.snapshot(now)["keys"][key_id]


def restored_log(key_id: str, by: str, reason: str) -> cmd.Log:
    return cmd.Log("warning", "key disabled (state kept from an earlier leader)",
                   {"key_id": key_id, "by": by, "reason": reason})


# -- restore: a failover keeps disabled keys, aged by the time between save and start ----------

@pytest.mark.parametrize("saved_at, probe_in, disabled_for, want_probe_in, want_for", [
    (WALL - 10.0, 30.0, 5.0, 20.0, 15.0),  # 10 s passed: the probe is 10 s nearer, out 10 s longer
    (WALL - 45.0, 30.0, 5.0, 0.0, 50.0),  # the probe time passed while no leader ran: due now
    (WALL + 99.0, 30.0, 5.0, 30.0, 5.0),  # saved "in the future" (clock skew): no time passed
    (None, 30.0, 5.0, 30.0, 5.0),  # no saved_at: no time passed
    (0, 30.0, 5.0, 30.0, 5.0),  # a zero saved_at is no time either
    (WALL - 10.0, 30.0, None, 20.0, 10.0),  # no disabled_for_s: out since the save
    (WALL - 0.5, 30.0, 0.0, 29.5, 0.5),  # fractions kept
])
def test_a_provider_disabled_key_is_restored_with_its_times_aged(saved_at, probe_in, disabled_for, want_probe_in,
                                                                  want_for):
    record = {"by": "provider", "reason": "invalid_api_key (HTTP 401)", "probe_delay_s": 120.0,
              "probe_in_s": probe_in, "disabled_for_s": disabled_for}
    if saved_at is not None:
        record["saved_at"] = saved_at
    m, logs = started({"k1": record})
    assert logs == [restored_log("k1", "provider", "invalid_api_key (HTTP 401)")]
    view = key_view(m, "k1")
    assert view["disabled_reason"] == "invalid_api_key (HTTP 401)"
    assert (view["disabled_by"], view["probe_in_s"], view["probe_delay_s"]) == ("provider", want_probe_in, 120.0)
    assert view["disabled_for_s"] == want_for
    assert not key_view(m, "k2")["disabled"]


def test_an_operator_disabled_key_is_restored_without_a_probe():
    record = {"by": "operator", "reason": "leaked", "probe_delay_s": None, "probe_in_s": None,
              "disabled_for_s": 100.0, "saved_at": WALL - 20.0}
    m, logs = started({"k2": record})
    assert logs == [restored_log("k2", "operator", "leaked")]
    view = key_view(m, "k2")
    assert (view["disabled_by"], view["disabled_reason"], view["probe_in_s"]) == ("operator", "leaked", None)
    assert view["disabled_for_s"] == 120.0


@pytest.mark.parametrize("bad, error", [
    ({"by": "nobody", "reason": "x"}, "ValueError"),  # an unknown disabled_by
    ({"reason": "x"}, "KeyError"),  # no disabled_by
    ({"by": "operator"}, "KeyError"),  # no reason
    ({"by": "provider", "reason": "x", "probe_in_s": "soon"}, "ValueError"),
    ({"by": "provider", "reason": "x", "probe_in_s": 5.0, "saved_at": "yesterday"}, "ValueError"),
    ({"by": "provider", "reason": "x", "probe_in_s": [5.0]}, "TypeError"),
    ({"by": "operator", "reason": "x", "disabled_for_s": "long"}, "ValueError"),
    ({"by": "operator", "reason": "x", "disabled_for_s": [1]}, "TypeError"),
    (["by", "operator"], "ValueError"),  # not a mapping
])
def test_a_malformed_record_is_logged_and_skipped_and_the_next_one_still_restores(bad, error):
    good = {"by": "operator", "reason": "leaked", "saved_at": WALL}
    m, logs = started({"k1": bad, "k2": good})
    assert logs == [cmd.Log("warning", "persisted key state skipped", {"key_id": "k1", "error": error}),
                    restored_log("k2", "operator", "leaked")]
    assert not key_view(m, "k1")["disabled"] and key_view(m, "k2")["disabled_reason"] == "leaked"


def test_a_record_of_a_key_no_longer_configured_is_skipped():
    m, logs = started({"gone": {"by": "operator", "reason": "x"}})
    assert logs == [cmd.Log("warning", "persisted key state skipped", {"key_id": "gone", "error": "KeyError"})]


def test_restoring_is_not_news_nothing_is_saved_again():
    record = {"by": "operator", "reason": "leaked", "saved_at": WALL}
    m, _ = started({"k1": record})
    assert handle(m, ev.OutcomeReported("nobody-knows", "k2", Outcome("ok", 200)), T0 + 1) == []


def test_no_records_means_no_logs():
    assert started({})[1] == []


# -- flush: every change of a key's state is logged and saved ---------------------------------

def test_a_key_disabled_by_provider_evidence_is_logged_as_an_error_and_saved():
    m = machine(keys=2)
    out = handle(m, ev.OutcomeReported("unknown", "k1", INVALID_KEY), T0 + 2)
    assert out == [
        cmd.Log("error", "KEY DISABLED: the upstream refused its credentials or credit; a probe job follows",
                {"key_id": "k1", "reason": "invalid_api_key (HTTP 401)", "probe_in_s": 60.0}),
        cmd.SaveKey("k1", {"by": "provider", "reason": "invalid_api_key (HTTP 401)", "probe_delay_s": 60.0,
                           "probe_in_s": 60.0, "disabled_for_s": 0.0})]
    assert handle(m, ev.OutcomeReported("unknown", "k1", INVALID_KEY), T0 + 3) == []  # no change, no news


def test_an_outcome_that_changes_nothing_logs_and_saves_nothing():
    m = machine(keys=2)
    assert handle(m, ev.OutcomeReported("unknown", "k1", Outcome("ok", 200)), T0 + 2) == []


# -- operator commands ------------------------------------------------------------------------

def command(m, request, now: float = T0 + 5, error: str | None = None) -> list[cmd.Command]:
    return handle(m, ev.KeyCommand(request, "inbox", error), now)


def malformed(error: str) -> cmd.Respond:
    return cmd.Respond("inbox", {"ok": False, "error": f"malformed request ({error}); {MALFORMED}"})


def test_the_malformed_answer_shows_the_request_shape():
    assert MALFORMED == 'send {"action": "disable"|"enable", "key": ID, "reason": TEXT}'
    assert MAX_REASON_CHARS == 500


@pytest.mark.parametrize("request_, error, answer_error", [
    (None, "JSONDecodeError", "JSONDecodeError"),  # the shell could not parse it
    ({"action": "disable", "key": "k1"}, "UnicodeDecodeError", "UnicodeDecodeError"),  # error wins
    (["disable", "k1"], None, "AttributeError"),  # JSON, but not an object
    ("disable k1", None, "AttributeError"),
])
def test_a_malformed_request_is_answered_with_the_shape_and_changes_nothing(request_, error, answer_error):
    m = machine(keys=2)
    assert command(m, request_, error=error) == [malformed(answer_error)]
    assert not key_view(m, "k1")["disabled"]


@pytest.mark.parametrize("key_id", ["k3", None, 1])
def test_an_unknown_key_is_refused_with_the_configured_ones(key_id):
    m = machine(keys=2)
    assert command(m, {"action": "disable", "key": key_id}) == [
        cmd.Respond("inbox", {"ok": False, "error": f"unknown key {key_id!r}; configured: k1, k2"})]


@pytest.mark.parametrize("action", ["pause", None, "DISABLE"])
def test_an_unknown_action_is_refused_and_changes_nothing(action):
    m = machine(keys=2)
    assert command(m, {"action": action, "key": "k1"}) == [
        cmd.Respond("inbox", {"ok": False, "error": f"unknown action {action!r}; use disable or enable"})]
    assert not key_view(m, "k1")["disabled"]


def disabled_answer(m, key_id: str, now: float, changed: bool, saves: tuple = ()) -> cmd.Respond:
    return cmd.Respond("inbox", {"ok": True, "key": key_id, "changed": changed, "persisted": True,
                                 "state": key_view(m, key_id, now)}, saves)


@pytest.mark.parametrize("reason, kept", [
    ("rotating", "rotating"),
    (None, "disabled by an operator"),
    ("", "disabled by an operator"),
    (42, "42"),
    ("x" * 600, "x" * 500),  # capped
    ("y" * 500, "y" * 500),
])
def test_disable_answers_with_the_new_state_and_saves_it(reason, kept):
    m = machine(keys=2)
    now = T0 + 5
    request = {"action": "disable", "key": "k2"}
    if reason is not None:
        request["reason"] = reason
    out = command(m, request, now)
    save = cmd.SaveKey("k2", {"by": "operator", "reason": kept, "probe_delay_s": 60.0, "probe_in_s": None,
                              "disabled_for_s": 0.0})
    assert out == [cmd.Log("warning", "key disabled by an operator", {"key_id": "k2", "reason": kept}),
                   disabled_answer(m, "k2", now, True, (save,))]
    assert key_view(m, "k2", now)["disabled_reason"] == kept and not key_view(m, "k1", now)["disabled"]
    # the same decision again changes nothing: no log, no save, changed False
    assert command(m, request, now + 1) == [disabled_answer(m, "k2", now + 1, False)]


def test_enable_brings_the_key_back_and_deletes_its_record():
    m = machine(keys=2)
    command(m, {"action": "disable", "key": "k1", "reason": "leaked"}, T0 + 1)
    out = command(m, {"action": "enable", "key": "k1"}, T0 + 7)
    state = key_view(m, "k1", T0 + 7)
    assert state["state"] == "enabled" and not state["disabled"]
    assert out == [cmd.Log("warning", "key enabled again", {"key_id": "k1"}),
                   disabled_answer(m, "k1", T0 + 7, True, (cmd.SaveKey("k1", None),))]
    assert command(m, {"action": "enable", "key": "k1"}, T0 + 8) == [disabled_answer(m, "k1", T0 + 8, False)]


def test_a_command_also_reports_other_keys_that_changed_before_it():
    m = machine(keys=2)
    m.scheduler.complete_unknown("k1", INVALID_KEY, T0 + 1)  # not flushed yet
    out = command(m, {"action": "disable", "key": "k2", "reason": "r"}, T0 + 5)
    assert [type(c).__name__ for c in out] == ["Log", "Log", "Respond"]
    assert out[0].fields == {"key_id": "k1", "reason": "invalid_api_key (HTTP 401)", "probe_in_s": 56.0}
    respond = out[2]
    assert isinstance(respond, cmd.Respond) and respond.answer["changed"]
    assert [s.key_id for s in respond.saves] == ["k1", "k2"]
    assert respond.saves[0].record["probe_in_s"] == 56.0 and respond.saves[0].record["disabled_for_s"] == 4.0


def test_the_answer_says_unchanged_when_only_another_key_changed():
    m = machine(keys=2)
    command(m, {"action": "disable", "key": "k2", "reason": "r"}, T0 + 1)
    m.scheduler.complete_unknown("k1", INVALID_KEY, T0 + 2)
    out = command(m, {"action": "disable", "key": "k2", "reason": "r"}, T0 + 5)
    respond = out[-1]
    assert isinstance(respond, cmd.Respond) and respond.answer["changed"] is False
    assert [s.key_id for s in respond.saves] == ["k1"]


# -- secrets: a key no live worker can call is out of rotation until one can --------------------

def test_a_key_whose_secret_no_worker_holds_is_out_until_a_worker_has_it():
    m = machine(keys=2)

    def heartbeat(worker: str, unusable: dict, now: float) -> list[cmd.Log]:
        b = beat(worker)
        b.beat.unusable_keys = unusable
        return [c for c in m.handle(b, now) if isinstance(c, cmd.Log) and "secret" in c.message]

    assert heartbeat("w1", {"k1": "LOCAL_KEY_1 not set"}, T0 + 1) == [
        cmd.Log("error", "no worker has this key's secret; key out of rotation",
                {"key_id": "k1", "problem": "LOCAL_KEY_1 not set"})]
    view = key_view(m, "k1", T0 + 1)
    assert view["disabled_by"] == "secret" and view["secret_missing"] == "LOCAL_KEY_1 not set"
    assert heartbeat("w1", {"k1": "LOCAL_KEY_1 not set"}, T0 + 2) == []  # said once
    assert heartbeat("w1", {"k1": "LOCAL_KEY_1 empty", "k2": "LOCAL_KEY_2 not set"}, T0 + 3) == [
        cmd.Log("error", "no worker has this key's secret; key out of rotation",
                {"key_id": "k1", "problem": "LOCAL_KEY_1 empty"}),
        cmd.Log("error", "no worker has this key's secret; key out of rotation",
                {"key_id": "k2", "problem": "LOCAL_KEY_2 not set"})]
    assert key_view(m, "k1", T0 + 3)["secret_missing"] == "LOCAL_KEY_1 empty"
    # a second worker holds k2 but not k1: k2 comes back, k1 stays out (its reason unchanged)
    assert heartbeat("w2", {"k1": "LOCAL_KEY_1 empty"}, T0 + 4) == [
        cmd.Log("info", "a worker has this key's secret again", {"key_id": "k2"})]
    assert key_view(m, "k2", T0 + 4)["secret_missing"] is None
    assert key_view(m, "k1", T0 + 4)["secret_missing"] == "LOCAL_KEY_1 empty"
    assert heartbeat("w1", {}, T0 + 5) == [  # now w1 holds k1
        cmd.Log("info", "a worker has this key's secret again", {"key_id": "k1"})]
    assert key_view(m, "k1", T0 + 5)["secret_missing"] is None


def test_a_reason_that_cannot_be_made_text_is_a_malformed_request():
    m = machine(keys=2)
    too_long = 10 ** 5000  # str() refuses ints over 4300 digits (ValueError)
    assert command(m, {"action": "disable", "key": "k1", "reason": too_long}) == [malformed("ValueError")]
    assert not key_view(m, "k1")["disabled"]


def test_removing_a_key_whose_secret_was_missing_does_not_claim_a_worker_has_it():
    m = machine(keys=3)
    b = beat("w1")
    b.beat.unusable_keys = {"k2": "LOCAL_KEY_2 not set", "k3": "LOCAL_KEY_3 not set"}
    m.handle(b, T0 + 1)
    out = handle(m, ev.ConfigChanged(2, spec(keys=1), {t: 8 for t in TIERS}, {t: 5 for t in TIERS}), T0 + 2)
    assert [c for c in out if isinstance(c, cmd.Log) and "secret" in c.message] == []  # k2, k3 gone, not fixed
    assert m.keys.key_ids == ["k1"]
