"""A 404 about the model from one key of a pool (an OpenAI project key restricted to some
models, an Azure resource without the deployment): the scheduler with the worker's own
classification and retry rule (signals.classify, outcome.is_retryable), over a fake clock.
Before, such a 404 was a bad request: the job ended after one call and the key stayed."""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable

import pytest
from core_helpers import job, key, make, pool

from ratefleet.dispatcher.core import Dispatch, Outcome, ProbePolicy
from ratefleet.dispatcher.core.scheduler import LACK_MEMORY_S
from ratefleet.schemas.outcome import is_retryable
from ratefleet.schemas.signals import classify, provider_code

OK = (200, {"choices": [{"message": {"content": "hi"}}]})
OPENAI_PROJECT = (403, {"error": {"message": "Project `proj_abc` does not have access to model `gpt-4o`",
                                  "type": "invalid_request_error", "param": None, "code": "model_not_found"}})
OPENAI_MODEL = (404, {"error": {"message": "The model `gpt-4o` does not exist or you do not have access to it.",
                                "type": "invalid_request_error", "param": None, "code": "model_not_found"}})
AZURE_DEPLOYMENT = (404, {"error": {"code": "DeploymentNotFound", "message": (
    "The API deployment for this resource does not exist. If you created the deployment within the last 5 minutes, "
    "please wait a moment and try again.")}})
ANTHROPIC_MODEL = (404, {"type": "error", "error": {"type": "not_found_error", "message": "model: claude-x"}})
GEMINI_MODEL = (404, {"error": {"code": 404, "status": "NOT_FOUND", "message": (
    "models/gemini-x is not found for API version v1beta, or is not supported for generateContent.")}})
WRONG_PATH = (404, {"error": {"message": "Invalid URL (POST /v1/chat/complete)", "type": "invalid_request_error",
                              "code": "unknown_url"}})

Answer = Callable[[str, str], tuple[int, dict]]  # (key id, job id) -> status, body


def three_keys():
    keys = (key(f"k{i}", rps=1000, burst=100) for i in (1, 2, 3))
    return make(pool("p", *keys), probe=ProbePolicy(base_s=60.0, max_s=3600.0))


def run(s, job_ids: list[str], answer: Answer, now: float = 0.0, max_attempts: int = 3, model: str | None = None):
    """Dispatch and answer every job as a worker would: classify the answer, requeue it while
    `is_retryable` (given the reservation's `denial_final`) and attempts are left.
    Returns each job's (last kind, last key, attempts) and the calls per key."""
    ended: dict[str, tuple[str, str, int]] = {}
    attempts: Counter[str] = Counter()
    calls: Counter[str] = Counter()
    for job_id in job_ids:
        s.add(job(job_id=job_id, model=model), now)
    while len(ended) < len(job_ids):
        decision = s.next(now)
        assert isinstance(decision, Dispatch), decision
        job_id, key_id = decision.job.job_id, decision.key_id
        status, body = answer(key_id, job_id)
        code = None if status < 300 else provider_code(body)
        kind = classify(status, None, code)
        s.complete(decision.reservation, Outcome(kind, status, code=code), now)
        calls[key_id] += 1
        attempts[job_id] += 1
        if is_retryable(kind, denial_final=decision.reservation.denial_final) and attempts[job_id] < max_attempts:
            s.add(job(job_id=job_id, model=model), now)
        else:
            ended[job_id] = (str(kind), key_id, attempts[job_id])
    return ended, calls


def test_a_key_without_the_model_passes_its_jobs_on_and_stays_in_for_its_other_models():
    s = three_keys()
    ended, calls = {}, Counter()
    for batch in range(10):  # 60 jobs, 6 at a time
        done, used = run(s, [f"j{batch}.{i}" for i in range(6)], lambda k, _: OPENAI_MODEL if k == "k1" else OK,
                         now=batch * 0.1)
        ended.update(done)
        calls.update(used)
    failed = {j: e for j, e in ended.items() if e[0] != "ok"}
    assert len(ended) == 60 and failed == {}  # before: 20 jobs ended bad_request after their one call on k1
    assert {e[1] for e in ended.values()} == {"k2", "k3"}
    assert 1 <= calls["k1"] <= 60  # at most one call per job before it goes elsewhere
    # no strike: k1 lacks this model only, so it is not disabled (three requests for a model only
    # some keys have would otherwise take healthy keys out for every model: a reviewer's finding)
    assert {s.snapshot(0.0)["keys"][k]["state"] for k in ("k1", "k2", "k3")} == {"enabled"}
    served, _ = run(s, [f"other{i}" for i in range(6)], lambda k, _: OK, now=2.0)
    assert "k1" in {e[1] for e in served.values()}  # its other models: served as before
    # a wrong path stays a bad request: one call, no other key tried
    ended, calls = run(s, ["path"], lambda k, _: WRONG_PATH, now=1.0)
    assert ended == {"path": ("bad_request", ended["path"][1], 1)} and sum(calls.values()) == 1


@pytest.mark.parametrize("missing", [OPENAI_MODEL, AZURE_DEPLOYMENT, ANTHROPIC_MODEL, GEMINI_MODEL],
                         ids=["openai", "azure", "anthropic", "google"])
def test_a_model_no_key_has_ends_after_two_calls_and_blames_no_key(missing):
    s = three_keys()
    ended, calls = run(s, ["unknown"], lambda k, _: missing)
    kind, last_key, attempts = ended["unknown"]
    assert (kind, attempts) == ("denied", 2)  # final denial: request_denied (before: bad_request, 1 call)
    assert sum(calls.values()) == 2 and len(calls) == 2
    ended, _ = run(s, [f"good{i}" for i in range(9)], lambda k, _: OK, now=1.0)
    assert {e[0] for e in ended.values()} == {"ok"}
    assert {v["state"] for v in s.snapshot(1.0)["keys"].values()} == {"enabled"}


def test_on_the_only_key_of_its_pool_a_model_404_ends_the_job_at_once():
    s = make(pool("p", key("k1", rps=1000, burst=100)), probe=ProbePolicy(base_s=60.0, max_s=3600.0))
    ended, calls = run(s, ["j"], lambda k, _: AZURE_DEPLOYMENT)
    assert ended == {"j": ("denied", "k1", 1)} and calls == {"k1": 1}  # before: bad_request
    assert s.snapshot(0.0)["keys"]["k1"]["state"] == "enabled"


@pytest.mark.parametrize("missing", [OPENAI_MODEL, OPENAI_PROJECT, AZURE_DEPLOYMENT, ANTHROPIC_MODEL, GEMINI_MODEL],
                         ids=["openai", "openai-403", "azure", "anthropic", "google"])
def test_once_a_key_said_it_lacks_a_model_that_models_next_jobs_go_to_other_keys(missing):
    """Each job of the model paid a call on the key without it before going elsewhere: with
    one key of three lacking it, a third of a batch's jobs were called twice (and the lacking
    key's rate spent on 404s). Now the first such denial sends the model's next jobs to the
    other keys, for LACK_MEMORY_S, while they can take them; other models still use the key."""
    s = three_keys()
    lacks = lambda k, _: missing if k == "k1" else OK  # noqa: E731
    ended, calls = {}, Counter()
    for batch in range(10):  # 60 jobs, 6 at a time
        done, used = run(s, [f"j{batch}.{i}" for i in range(6)], lacks, now=batch * 0.1, model="gpt-4o")
        ended.update(done)
        calls.update(used)
    assert {e[0] for e in ended.values()} == {"ok"} and len(ended) == 60
    assert calls["k1"] == 1  # the first denial only (before: up to one per job, 20 of 60 here)
    other, used = run(s, [f"o{i}" for i in range(6)], lambda k, _: OK, now=1.0, model="gpt-4o-mini")
    assert used["k1"] > 0  # it still serves the models it has
    # the memory lapses: the key is asked again (it may have been given the model meanwhile)
    later, used = run(s, [f"l{i}" for i in range(6)], lambda k, _: OK, now=1.0 + LACK_MEMORY_S, model="gpt-4o")
    assert used["k1"] > 0 and {e[0] for e in later.values()} == {"ok"}
    # and a success there clears it at once: with no other key free it is used as before
    assert {v["state"] for v in s.snapshot(2.0)["keys"].values()} == {"enabled"}


def test_openais_403_for_a_model_outside_a_project_key_is_no_strike():
    """OpenAI answers a project key restricted to some models with a 403 `model_not_found`.
    Before, three such jobs that succeeded on other keys disabled the key for every model: any
    caller could take healthy keys out with three requests for a model only some keys have."""
    s = three_keys()
    refused = 0
    for i in range(6):  # one job at a time, each a model k1 was not yet known to lack
        ended, calls = run(s, [f"j{i}"], lambda k, _: OPENAI_PROJECT if k == "k1" else OK, now=float(i),
                           model=f"gpt-4o-{i}")
        assert ended[f"j{i}"][0] == "ok"
        refused += calls["k1"]
    assert refused >= 3  # (idle keys tie in configuration order: k1 is asked first)
    assert s.snapshot(6.0)["keys"]["k1"]["state"] == "enabled"


ANTHROPIC_FORBIDDEN = (403, {"type": "error", "error": {
    "type": "permission_error", "message": "Your API key does not have permission to use the specified resource."}})


def test_a_403_that_does_not_say_why_sends_its_models_next_jobs_elsewhere_once_confirmed():
    """A provider trial: k1 refused only claude-opus (Anthropic's 403 permission_error, which names
    no model). Each opus job paid a call on k1 before going on, and with k1 used for opus only,
    its strikes disabled it for every model after three jobs. Now the first 403 confirmed by a
    success on another key sends that model's next jobs to other keys for LACK_MEMORY_S: one
    call on k1, no strike after it, and k1 still serves its other models."""
    s = three_keys()
    refuses_opus = lambda k, _: ANTHROPIC_FORBIDDEN if k == "k1" else OK  # noqa: E731
    ended, calls = {}, Counter()
    for batch in range(10):  # 60 opus jobs, 6 at a time
        done, used = run(s, [f"j{batch}.{i}" for i in range(6)], refuses_opus, now=batch * 0.1, model="claude-opus")
        ended.update(done)
        calls.update(used)
    assert {e[0] for e in ended.values()} == {"ok"} and len(ended) == 60
    assert calls["k1"] <= 2, calls  # those sent before the first 403 was confirmed (before: 4, and k1 disabled)
    assert s.snapshot(1.0)["keys"]["k1"]["state"] == "enabled"
    other, used = run(s, [f"o{i}" for i in range(6)], lambda k, _: OK, now=1.0, model="claude-sonnet")
    assert used["k1"] > 0 and {e[0] for e in other.values()} == {"ok"}


def test_a_403_on_jobs_without_a_model_still_strikes_the_key():
    """No model to route by: the 403 rule of denials.py alone (a key refusing every job that
    succeeds elsewhere, serving none, goes out after FORBIDDEN_JOBS of them)."""
    s = three_keys()
    for i in range(4):
        run(s, [f"j{i}"], lambda k, _: ANTHROPIC_FORBIDDEN if k == "k1" else OK, now=float(i))
    assert s.snapshot(4.0)["keys"]["k1"]["state"] == "disabled"


def test_a_403_sends_its_model_elsewhere_at_once_even_when_its_confirmation_queues_behind_a_backlog():
    """A re-run in a real fleet: 60 opus jobs queued at once, k1 refusing opus. The refused job's
    retry queued behind the fresh jobs, so the first confirmation came after k1's 30th 403, and k1
    was disabled for every model. Now the model goes elsewhere from the first 403."""
    s = three_keys()
    ended, calls = run(s, [f"j{i}" for i in range(60)], lambda k, _: ANTHROPIC_FORBIDDEN if k == "k1" else OK,
                       model="claude-opus")
    assert {e[0] for e in ended.values()} == {"ok"} and len(ended) == 60
    assert calls["k1"] == 1, calls
    assert s.snapshot(0.0)["keys"]["k1"]["state"] == "enabled"


def test_a_403_the_request_earned_lifts_the_routing_of_its_model():
    """A job refused on a second key too was at fault itself: its model may use k1 again."""
    s = three_keys()
    ended, calls = run(s, ["bad"], lambda k, _: ANTHROPIC_FORBIDDEN, model="claude-opus")
    assert ended["bad"][0] == "denied" and sum(calls.values()) == 2
    done, used = run(s, [f"g{i}" for i in range(6)], lambda k, _: OK, now=1.0, model="claude-opus")
    assert used["k1"] > 0


def test_a_job_is_never_sent_back_to_a_key_that_refused_it_when_every_key_lacks_its_model():
    """A reviewer: two 403s at once (one key refusing the model, the other a bad request) put both
    keys of a pool on the model's lack list; the lack routing then gave up, and with it the job's
    own refusals: the bad job went back to the key that had refused it."""
    s = make(pool("p", key("k1", rps=1000, burst=100), key("k2", rps=1000, burst=100)),
             probe=ProbePolicy(base_s=60.0, max_s=3600.0))
    s.add(job(job_id="bad", model="opus"), 0.0)  # first: to k1, the key idle keys tie to
    s.add(job(job_id="good", model="opus"), 0.0)
    first, second = s.next(0.0), s.next(0.0)
    assert isinstance(first, Dispatch) and isinstance(second, Dispatch)
    by_job = {first.job.job_id: first, second.job.job_id: second}
    assert {by_job["good"].key_id, by_job["bad"].key_id} == {"k1", "k2"}
    refused_bad = by_job["bad"].key_id
    for d in (first, second):  # both refused: good by a key without opus, bad by the other key
        s.complete(d.reservation, Outcome("denied", 403), 0.1)
    s.add(job(job_id="bad", model="opus"), 0.2)
    again = s.next(0.2)
    assert isinstance(again, Dispatch) and again.job.job_id in ("bad", "good")
    if again.job.job_id != "bad":
        again = s.next(0.2)
    assert isinstance(again, Dispatch) and again.key_id != refused_bad
