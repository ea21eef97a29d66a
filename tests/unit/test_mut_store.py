"""Storing a job (ratefleet/runtime/store.py `publish_job`), the intake of every producer:
the dedup id and reply header on the message, a duplicate reported as such, and each
refusal turned into the error a producer can act on (queue full, unknown tier, no
streams, NATS away: may or may not be stored). Over a fake JetStream context whose
publish answers as the server would. Deterministic, no server.
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest
from nats.js.errors import APIError, NoStreamResponseError, NotFoundError

from ratefleet.runtime.store import MSG_ID, REPLY_HEADER, interrupt_ack_waits, publish_job, publish_job_ack
from ratefleet.schemas import Subjects
from ratefleet.schemas.errors import QueueFull, SubmitError

pytestmark = pytest.mark.anyio
SUBJECTS = Subjects()


class FakeJetStream:
    """`answers`: what each publish does in turn (an exception to raise, or a bool: duplicate);
    the last one repeats. `stream`: what stream_info does (None: the stream exists)."""

    def __init__(self, *answers, stream: BaseException | None = None, tiers: tuple[str, ...] = ("vip", "normal")):
        self.answers, self.stream, self.published, self.infos = list(answers), stream, [], []
        self.tiers = tiers

    async def publish(self, subject, payload, headers=None, timeout=None):
        self.published.append((subject, payload, headers, timeout))
        answer = self.answers.pop(0) if len(self.answers) > 1 else self.answers[0]
        if isinstance(answer, BaseException):
            raise answer
        return SimpleNamespace(duplicate=answer, seq=len(self.published))

    async def stream_info(self, name):
        self.infos.append(name)
        if self.stream is not None:
            raise self.stream
        return SimpleNamespace(config=SimpleNamespace(subjects=[SUBJECTS.jobs(t) for t in self.tiers]))


async def test_a_job_is_published_with_its_id_for_dedup_and_the_reply_subject():
    js = FakeJetStream(False)
    assert await publish_job(js, SUBJECTS, "vip", "job-1", b"{}", reply_to="_INBOX.r") is True
    assert js.published == [(SUBJECTS.jobs("vip"), b"{}", {MSG_ID: "job-1", REPLY_HEADER: "_INBOX.r"}, 5.0)]
    await publish_job(js, SUBJECTS, "vip", "job-2", b"{}", timeout=2.5)
    assert js.published[1][2:] == ({MSG_ID: "job-2"}, 2.5)


async def test_a_duplicate_inside_the_dedup_window_is_reported():
    js = FakeJetStream(True)
    assert await publish_job(js, SUBJECTS, "normal", "job-1", b"{}") is False
    ack = await publish_job_ack(js, SUBJECTS, "normal", "job-1", b"{}")
    assert ack.duplicate is True and ack.seq == 2


@pytest.mark.parametrize("description", ["maximum messages exceeded", "Maximum Bytes exceeded"])
async def test_a_full_queue_is_queue_full_saying_the_job_was_not_stored(description):
    js = FakeJetStream(APIError(code=503, description=description, err_code=10077))
    with pytest.raises(QueueFull) as refused:
        await publish_job(js, SUBJECTS, "normal", "job-7", b"{}")
    text = str(refused.value)
    assert "job job-7 was NOT stored" in text and description in text and "jobs_max_msgs" in text
    assert len(js.published) == 1  # a refusal is not retried


async def test_another_refusal_is_a_submit_error_with_the_servers_reason():
    js = FakeJetStream(APIError(code=400, description="bad header", err_code=10999))
    with pytest.raises(SubmitError) as refused:
        await publish_job(js, SUBJECTS, "normal", "job-7", b"{}")
    assert not isinstance(refused.value, QueueFull)
    assert str(refused.value) == "job job-7 was not stored: bad header"
    js = FakeJetStream(APIError(code=400, description=None, err_code=10999))
    with pytest.raises(SubmitError) as refused:
        await publish_job(js, SUBJECTS, "normal", "job-8", b"{}")
    assert not isinstance(refused.value, QueueFull)


async def test_no_stream_for_the_tier_is_an_unknown_tier_at_once():
    js = FakeJetStream(NoStreamResponseError())
    with pytest.raises(SubmitError) as refused:
        await publish_job(js, SUBJECTS, "gold", "job-1", b"{}", retry_for=30.0)
    assert f"no stream takes {SUBJECTS.jobs('gold')}: unknown tier 'gold'" in str(refused.value)
    assert "[tiers]" in str(refused.value)
    assert js.infos == [SUBJECTS.jobs_stream] and len(js.published) == 1


async def test_a_known_tier_whose_stream_has_no_leader_for_a_moment_is_retried_and_stored():
    # a cluster server stopping (SIGTERM in a rolling restart) moves the JOBS stream's leader:
    # for a moment no stream answers a publish (503). A vip request then failed at once with
    # "no stream takes ratefleet.jobs.vip: unknown tier 'vip'"; the stream takes the tier, so retry
    js = FakeJetStream(NoStreamResponseError(), NoStreamResponseError(), False)
    assert await publish_job(js, SUBJECTS, "vip", "job-1", b"{}", retry_for=30.0) is True
    assert len(js.published) == 3 and {p[2][MSG_ID] for p in js.published} == {"job-1"}
    # under a wildcard too
    js = FakeJetStream(NoStreamResponseError(), False, tiers=("*",))
    assert await publish_job(js, SUBJECTS, "vip", "job-2", b"{}", retry_for=30.0) is True


def test_subject_matches_as_nats_does():
    from ratefleet.runtime.store import subject_matches

    assert subject_matches("a.b.c", "a.b.c") and not subject_matches("a.b.c", "a.b.d")
    assert subject_matches("a.*.c", "a.x.c") and not subject_matches("a.*", "a.x.c")
    assert subject_matches("a.>", "a.x.c") and not subject_matches("a.>", "a")
    assert not subject_matches("a.b", "a.b.c") and not subject_matches("a.b.c", "a.b")


async def test_no_jobs_stream_at_all_says_so_at_once():
    js = FakeJetStream(NoStreamResponseError(), stream=NotFoundError())
    with pytest.raises(SubmitError) as refused:
        await publish_job(js, SUBJECTS, "normal", "job-1", b"{}", retry_for=30.0)
    assert f"stream {SUBJECTS.jobs_stream} does not exist" in str(refused.value)
    assert len(js.published) == 1


async def test_jetstream_still_starting_is_retried_and_the_job_stored():
    js = FakeJetStream(NoStreamResponseError(), False, stream=RuntimeError("not ready"))
    assert await publish_job(js, SUBJECTS, "normal", "job-1", b"{}", retry_for=30.0) is True
    assert len(js.published) == 2 and js.published[0][2] == js.published[1][2] == {MSG_ID: "job-1"}


async def test_a_restart_is_ridden_out_with_the_same_id():
    js = FakeJetStream(TimeoutError(), False)
    assert await publish_job(js, SUBJECTS, "normal", "job-1", b"{}", retry_for=30.0) is True
    assert [p[2] for p in js.published] == [{MSG_ID: "job-1"}] * 2


async def test_nats_away_for_retry_for_is_a_submit_error_saying_resubmitting_is_safe():
    js = FakeJetStream(TimeoutError())
    with pytest.raises(SubmitError) as refused:
        await publish_job(js, SUBJECTS, "normal", "job-1", b"{}", retry_for=0.15)
    text = str(refused.value)
    assert "NATS did not confirm job job-1 for 0.15s (TimeoutError)" in text
    assert "Resubmitting with the same id is safe" in text
    assert len(js.published) >= 2


async def test_a_submit_whose_ack_is_lost_in_a_reconnect_is_sent_again_at_once():
    # a vip request submitted as its nats-server stopped (rolling restart) waited the whole
    # 5 s publish timeout for an ack that could not come, then was sent again: 5.2-5.3 s
    import asyncio
    import time

    class Connection:  # stands for a nats-py connection (weakly referenced, hashed by identity)
        pass

    nc = Connection()
    published = []

    class Lost:
        _nc = nc

        async def publish(self, subject, payload, headers=None, timeout=None):
            published.append(headers[MSG_ID])
            if len(published) == 1:
                await asyncio.sleep(0.1)
                asyncio.get_running_loop().call_soon(interrupt_ack_waits, nc)  # what connect()'s callback does
                await asyncio.sleep(timeout)
                raise TimeoutError
            return SimpleNamespace(duplicate=True, seq=1)  # the first send landed

    started = time.monotonic()
    assert await publish_job(Lost(), SUBJECTS, "vip", "job-1", b"{}", timeout=5.0) is False
    assert time.monotonic() - started < 2.0 and published == ["job-1", "job-1"]


async def test_only_a_reconnect_turns_an_ack_wait_into_a_resend_and_other_cancels_propagate():
    # the reconnect callback cancels the tasks waiting for an ack on that connection; a task
    # cancelled by anyone else (a drain, a timeout scope) must still end cancelled
    import asyncio

    from ratefleet.runtime.store import publish_or_reconnect

    class Connection:
        pass

    class Hanging:
        def __init__(self):
            self._nc = Connection()

        async def publish(self, subject, payload, headers=None, timeout=None):
            await asyncio.sleep(timeout)
            raise TimeoutError

    mine, other = Hanging(), Hanging()
    waiting = [asyncio.ensure_future(publish_or_reconnect(js, "s", b"x", headers={}, timeout=30))
               for js in (mine, mine, other)]
    await asyncio.sleep(0.05)
    assert interrupt_ack_waits(mine._nc) == 2
    await asyncio.sleep(0.05)
    for task in waiting[:2]:
        assert isinstance(task.exception(), TimeoutError)  # sent again by `retrying`
    assert not waiting[2].done()  # another connection's wait goes on
    waiting[2].cancel()
    await asyncio.sleep(0.05)
    assert waiting[2].cancelled()
    both = asyncio.ensure_future(publish_or_reconnect(mine, "s", b"x", headers={}, timeout=30))
    await asyncio.sleep(0.05)
    interrupt_ack_waits(mine._nc)
    both.cancel()  # cancelled by its owner too: stays cancelled
    await asyncio.sleep(0.05)
    assert both.cancelled()
