"""DenialBook (dispatcher/core/denials.py) driven directly, answer by answer at named instants:
which 401/403 answers disable a key (the reason a person reads), which withdraw a strike and
enable the key again, and how long and how many jobs the book remembers. The scheduler tests
reach the book through whole dispatch rounds; these pin each rule at its boundary."""

from __future__ import annotations

import pytest

from ratefleet.dispatcher.core.denials import AUTH_JOBS, FORBIDDEN_JOBS, MAX_JOBS, MEMORY_S, DenialBook, Verdicts

t0, t1, t2, t3 = 0.0, 1.0, 2.0, 3.0


def test_the_thresholds_are_the_documented_ones():
    assert (AUTH_JOBS, FORBIDDEN_JOBS, MEMORY_S, MAX_JOBS) == (2, 3, 3600.0, 10_000)


def test_a_first_denial_is_remembered_for_the_job_and_judges_nothing():
    book = DenialBook()
    assert book.denied_keys("j1") == frozenset()
    assert book.on_denied("j1", "a", 403, False, t0) == Verdicts()
    assert book.denied_keys("j1") == frozenset({"a"})
    assert book.on_denied("j1", "b", 401, False, t1) == Verdicts()
    assert book.denied_keys("j1") == frozenset({"a", "b"})
    assert book.denied_keys("j2") == frozenset()


def test_401s_that_are_all_unjudged_never_disable_a_key():
    book = DenialBook()
    for n, at in enumerate((t0, t1, t2)):
        assert book.on_denied(f"j{n}", "a", 401, False, at) == Verdicts()


def test_a_final_401_no_other_key_could_judge_confirms_and_a_second_job_disables():
    book = DenialBook()
    assert book.on_denied("j1", "a", 401, True, t0) == Verdicts()  # one job: below AUTH_JOBS
    assert book.denied_keys("j1") == frozenset()  # the job ended: no record kept
    verdicts = book.on_denied("j2", "a", 401, False, t1)
    assert verdicts == Verdicts(disable=[("a", "401 on 2 different jobs at least (2 so far, "
                                               "1 of them not refused by any other key)")])


def test_a_final_403_alone_is_no_strike():
    book = DenialBook()
    assert book.on_denied("j1", "a", 403, True, t0) == Verdicts()
    assert book.on_denied("j2", "a", 401, True, t1) == Verdicts()  # only one 401 job so far
    assert book.on_denied("j3", "a", 403, True, t2) == Verdicts()
    assert book.on_denied("j4", "a", 401, False, t3).disable[0][0] == "a"


def test_a_job_that_succeeds_on_another_key_confirms_the_401_of_the_first():
    book = DenialBook()
    book.on_denied("j1", "a", 401, False, t0)
    book.on_denied("j2", "a", 401, False, t1)
    verdicts = book.on_ok("j1", "b", t2)
    assert verdicts == Verdicts(disable=[("a", "401 on 2 different jobs at least (2 so far, "
                                               "1 of them not refused by any other key)")])
    assert book.denied_keys("j1") == frozenset()


def test_a_success_on_the_key_itself_clears_its_401_record():
    book = DenialBook()
    book.on_denied("j1", "a", 401, False, t0)
    assert book.on_ok("j9", "a", t1) == Verdicts()  # authenticated fine: strikes gone
    book.on_denied("j2", "a", 401, False, t2)
    assert book.on_ok("j2", "b", t3) == Verdicts()  # one strike only after the clear


def test_a_success_on_the_key_that_refused_the_job_counts_no_strike_for_it():
    book = DenialBook()
    for n in range(FORBIDDEN_JOBS):
        book.on_denied(f"j{n}", "a", 403, False, t0)
        book.on_denied(f"j{n}", "b", 403, False, t0)
        # a refused it before, then took it: only b was at fault, and a's own entry is skipped
        verdicts = book.on_ok(f"j{n}", "a", t1)
        assert verdicts == (Verdicts(disable=[("b", "403 on 3 different jobs that succeeded on other keys")])
                            if n == FORBIDDEN_JOBS - 1 else Verdicts())


def test_a_401_confirmed_by_a_success_counts_pending_strikes_too():
    book = DenialBook()
    for n in range(3):
        book.on_denied(f"k{n}", "b", 401, False, t1)
    assert book.on_ok("k0", "a", t2).disable == [("b", "401 on 2 different jobs at least (3 so far, "
                                                         "1 of them not refused by any other key)")]


@pytest.mark.parametrize("status, reason", [
    (403, "403 on 3 different jobs that succeeded on other keys"),
    (None, "0 on 3 different jobs that succeeded on other keys"),
])
def test_403s_disable_on_the_third_confirmed_job(status, reason):
    book = DenialBook()
    for n in range(FORBIDDEN_JOBS - 1):
        book.on_denied(f"j{n}", "a", status, False, t0)
        assert book.on_ok(f"j{n}", "b", t1) == Verdicts()
    book.on_denied("j9", "a", status, False, t2)
    assert book.on_ok("j9", "b", t3) == Verdicts(disable=[("a", reason)])


def test_a_job_refused_on_two_keys_is_the_requests_fault_and_withdraws_its_strike():
    book = DenialBook()
    book.on_denied("j1", "a", 401, True, t0)  # confirmed: no other key could take it
    assert book.on_denied("j2", "a", 401, False, t1).disable[0][0] == "a"
    # j2 is then refused on b too: the request was at fault, a's strike for j2 is withdrawn
    assert book.on_denied("j2", "b", 401, True, t2) == Verdicts(enable=["a"])
    assert book.denied_keys("j2") == frozenset()
    # the key is not enabled twice, and a strike that is still enough keeps it out
    assert book.on_denied("j3", "c", 401, True, t2) == Verdicts()


def test_a_withdrawn_strike_does_not_enable_a_key_another_rule_disabled():
    book = DenialBook()
    book.on_denied("j1", "a", 401, False, t0)
    assert book.on_denied("j1", "b", 403, True, t1) == Verdicts()  # a never disabled by the book


def test_a_withdrawn_strike_keeps_a_key_out_while_enough_strikes_remain():
    book = DenialBook()
    book.on_denied("j1", "a", 401, True, t0)
    book.on_denied("j2", "a", 401, True, t0)
    assert book.on_denied("j3", "a", 401, False, t1).disable[0][0] == "a"
    assert book.on_denied("j3", "b", 401, True, t2) == Verdicts()  # j1, j2 still confirm it


def test_a_final_denial_on_the_same_key_again_is_not_two_keys():
    book = DenialBook()
    book.on_denied("j1", "a", 401, False, t0)
    book.on_denied("j2", "a", 401, True, t0)
    # j1 refused on a again as final: only a refused it, so it confirms a (not request-scoped)
    verdicts = book.on_denied("j1", "a", 401, True, t1)
    assert verdicts.disable and verdicts.disable[0][0] == "a" and verdicts.enable == []
    assert book.denied_keys("j1") == frozenset()  # the job ended: its record goes


def test_an_enabled_key_is_not_enabled_again_by_a_later_withdrawal():
    book = DenialBook()
    book.on_denied("j1", "a", 401, True, t0)
    book.on_denied("j2", "a", 401, False, t0)  # disabled
    assert book.on_denied("j2", "b", 401, True, t1) == Verdicts(enable=["a"])
    later = t0 + MEMORY_S + 1  # j1's strike is forgotten
    assert book.on_denied("j3", "a", 401, False, later) == Verdicts()
    assert book.on_denied("j3", "b", 401, True, later) == Verdicts()  # a is enabled already


def test_a_strike_confirmed_by_a_success_ages_from_the_success():
    book = DenialBook()
    book.on_denied("j1", "a", 401, False, t0)
    book.on_ok("j1", "b", t0 + MEMORY_S - 1)
    assert book.on_denied("j2", "a", 401, False, t0 + MEMORY_S + 10).disable[0][0] == "a"


def test_forget_key_starts_its_strikes_over():
    book = DenialBook()
    for n in range(FORBIDDEN_JOBS - 1):
        book.on_denied(f"f{n}", "a", 403, False, t0)
        book.on_ok(f"f{n}", "b", t0)
    book.on_denied("j1", "a", 401, True, t0)
    book.forget_key("a")
    book.on_denied("f9", "a", 403, False, t1)
    assert book.on_ok("f9", "b", t1) == Verdicts()  # one 403 strike, not three
    assert book.on_denied("j2", "a", 401, False, t1) == Verdicts()  # the confirmed 401 is gone
    pending = DenialBook()
    pending.on_denied("j1", "a", 401, False, t0)
    pending.forget_key("a")
    assert pending.on_denied("j2", "a", 401, True, t1) == Verdicts()  # j1's pending strike is gone too
    # a key forgotten is no longer "disabled by the book": a withdrawn strike does not enable it
    book2 = DenialBook()
    book2.on_denied("j1", "a", 401, True, t0)
    book2.on_denied("j2", "a", 401, False, t0)
    book2.forget_key("a")
    book2.on_denied("j3", "a", 401, True, t0)
    assert book2.on_denied("j2", "b", 401, True, t1) == Verdicts()
    book3 = DenialBook()
    book3.on_denied("j1", "a", 401, True, t0)
    book3.on_denied("j2", "a", 401, False, t0)  # disabled by the book, then enabled by hand
    book3.forget_key("a")
    book3.on_denied("j3", "a", 401, False, t1)
    assert book3.on_denied("j3", "b", 401, True, t1) == Verdicts()


@pytest.mark.parametrize("age, remembered", [(MEMORY_S, True), (MEMORY_S + 0.5, False)])
def test_a_job_record_is_kept_for_memory_s(age, remembered):
    book = DenialBook()
    book.on_denied("j1", "a", 403, False, t0)
    book.on_denied("j2", "a", 403, False, t0 + age)  # prunes on each answer
    assert book.denied_keys("j1") == (frozenset({"a"}) if remembered else frozenset())


@pytest.mark.parametrize("age, disabled", [(MEMORY_S, True), (MEMORY_S + 0.5, False)])
def test_a_401_strike_is_kept_for_memory_s(age, disabled):
    book = DenialBook()
    book.on_denied("j1", "a", 401, True, t0)
    verdicts = book.on_denied("j2", "a", 401, False, t0 + age)
    assert bool(verdicts.disable) is disabled


@pytest.mark.parametrize("age, disabled", [(MEMORY_S, True), (MEMORY_S + 0.5, False)])
def test_a_403_strike_is_kept_for_memory_s(age, disabled):
    book = DenialBook()
    for n in range(FORBIDDEN_JOBS - 1):
        book.on_denied(f"j{n}", "a", 403, False, t0)
        book.on_ok(f"j{n}", "b", t0)
    book.on_denied("j9", "a", 403, False, t0 + age)
    assert bool(book.on_ok("j9", "b", t0 + age).disable) is disabled


def test_a_pruned_strike_no_longer_confirms():
    book = DenialBook()
    book.on_denied("j1", "a", 401, True, t0)  # confirmed, then forgotten
    book.on_denied("j2", "a", 401, False, t0 + MEMORY_S + 1)
    # two strikes again (j2, j3), none confirmed: the pruned j1 must not count
    assert book.on_denied("j3", "a", 401, False, t0 + MEMORY_S + 2) == Verdicts()


def test_at_most_max_jobs_are_remembered_oldest_first_out():
    book = DenialBook()
    for n in range(MAX_JOBS + 1):
        book.on_denied(f"j{n}", "a", 403, False, t0)
    assert book.denied_keys("j0") == frozenset()
    assert book.denied_keys("j1") == frozenset({"a"})
    assert book.denied_keys(f"j{MAX_JOBS}") == frozenset({"a"})


def test_strikes_are_pruned_also_while_a_younger_job_record_is_kept():
    book = DenialBook()
    book.on_denied("j1", "a", 401, True, t0)  # a confirmed strike, no job record left
    book.on_denied("j2", "b", 403, False, t0 + MEMORY_S)  # a job record younger than MEMORY_S
    assert book.on_denied("j3", "a", 401, False, t0 + MEMORY_S + 1) == Verdicts()  # j1 forgotten


def test_a_success_judges_every_key_that_refused_the_job():
    book = DenialBook()
    for n in range(FORBIDDEN_JOBS):
        book.on_denied(f"j{n}", "b", 403, False, t0)
        book.on_denied(f"j{n}", "a", 401, False, t0)
        verdicts = book.on_ok(f"j{n}", "c", t1)
    assert ("b", "403 on 3 different jobs that succeeded on other keys") in verdicts.disable
    assert ("a", "401 on 2 different jobs at least (3 so far, 3 of them not refused by any other key)") \
        in verdicts.disable


def test_a_401_confirmed_after_the_key_authenticated_elsewhere_is_one_strike():
    book = DenialBook()
    book.on_denied("j1", "a", 401, False, t0)
    assert book.on_ok("j2", "a", t0) == Verdicts()  # a authenticated fine: its record is cleared
    assert book.on_ok("j1", "b", t1) == Verdicts()  # j1's 401 on a is confirmed: one strike
    assert book.on_denied("j3", "a", 401, False, t1).disable[0][0] == "a"


def test_an_expired_job_record_takes_no_younger_one_with_it():
    book = DenialBook()
    book.on_denied("j1", "a", 403, False, t0)
    book.on_denied("j2", "a", 403, False, t0 + MEMORY_S)
    book.on_denied("j3", "b", 403, False, t0 + MEMORY_S + 1)  # j1 expires
    assert [book.denied_keys(j) for j in ("j1", "j2", "j3")] == [frozenset(), {"a"}, {"b"}]


def test_a_confirmation_is_forgotten_with_its_strike():
    """The pruned confirmation of a job must not confirm a later, unjudged 401 of a job with the
    same id (before the fix `_prune` left `_confirmed` as it was: `jobs &= dict.keys()` rebinds
    the loop variable to a new set, so confirmations were never dropped)."""
    book = DenialBook()
    book.on_denied("j1", "a", 401, True, t0)  # confirmed
    later = t0 + MEMORY_S + 1
    assert book.on_denied("j1", "a", 401, False, later) == Verdicts()  # j1 again, unjudged
    assert book.on_denied("j2", "a", 401, False, later) == Verdicts()  # two unjudged strikes


def test_a_success_judges_the_keys_after_a_401_too():
    book = DenialBook()
    for n in range(FORBIDDEN_JOBS):
        book.on_denied(f"j{n}", "a", 401, False, t0)
        book.on_denied(f"j{n}", "b", 403, False, t0)
        verdicts = book.on_ok(f"j{n}", "c", t1)
    assert ("b", "403 on 3 different jobs that succeeded on other keys") in verdicts.disable


def test_a_key_that_serves_other_jobs_between_its_403s_is_not_disabled():
    """A provider trial: k1 refused only claude-opus (Anthropic's 403 permission_error) and
    served claude-haiku; after 3 opus jobs that succeeded on k2 it was disabled for every model."""
    book = DenialBook()
    for n in range(2 * FORBIDDEN_JOBS):
        book.on_denied(f"opus{n}", "k1", 403, False, t0)
        assert book.on_ok(f"opus{n}", "k2", t1) == Verdicts()
        assert book.on_ok(f"haiku{n}", "k1", t1) == Verdicts()  # k1 works: its 403s were the requests'
    # the order a real fleet has (a re-run of the trial): k1 refuses 3 opus jobs, serves haiku, and only
    # then do the opus jobs succeed on k2 (they wait for another key): k1 had served since each refusal
    for n in range(FORBIDDEN_JOBS):
        book.on_denied(f"late{n}", "k1", 403, False, t1)
    for n in range(FORBIDDEN_JOBS):
        assert book.on_ok(f"haiku-late{n}", "k1", t2) == Verdicts()
    for n in range(FORBIDDEN_JOBS):
        assert book.on_ok(f"late{n}", "k2", t3) == Verdicts()
    for n in range(FORBIDDEN_JOBS):  # with no success of its own in between, the rule stands
        book.on_denied(f"only{n}", "k1", 403, False, t2)
        verdicts = book.on_ok(f"only{n}", "k2", t3)
    assert verdicts.disable == [("k1", "403 on 3 different jobs that succeeded on other keys")]


def test_a_confirmed_403_names_the_key_whose_model_to_avoid_and_a_401_or_a_lacking_key_does_not():
    """`Verdicts.refused_model`: keys whose 403 of this job was confirmed by its success here;
    the scheduler then sends the job's model elsewhere for a while (scheduler.py `_remember_lack`).
    A 401 is about the key (its own rule), a denial saying the key lacks the model already did so."""
    book = DenialBook()
    book.on_denied("j1", "a", 403, False, t0)
    book.on_denied("j1", "b", 401, False, t0)
    book.on_denied("j1", "c", 404, False, t0, lacks_model=True)
    assert book.on_ok("j1", "d", t1).refused_model == ["a"]
    book.on_denied("j2", "a", 403, False, t1)
    book.on_ok("other", "a", t2)  # it served another job since: no strike, and still the model's refusal
    assert book.on_ok("j2", "d", t3).refused_model == ["a"]
    assert book.on_ok("j3", "d", t3).refused_model == []
