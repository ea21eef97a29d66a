"""The gateway's file and batch lookups tell "no such object" from "NATS did not answer".

Before, every failed lookup was "none": a gateway starting while NATS was slow failed the
batches it resumed for good ("input_unavailable: the input file is gone"), and a caller got
404 for a file or batch that exists (the gateway answers 503 + Retry-After for NATS away)."""

from __future__ import annotations

import types
from pathlib import Path

import nats.errors
import pytest
from nats.js.errors import InvalidKeyError, KeyNotFoundError, ObjectNotFoundError

from ratefleet.gateway.batch_book import PRIVATE, BatchBook
from ratefleet.gateway.batch_runner import BatchRunner
from ratefleet.gateway.files import FileStore

pytestmark = pytest.mark.anyio


class Answers:
    """A KV / object store whose reads do `answer` (an exception is raised)."""

    def __init__(self, answer) -> None:
        self.answer = answer

    async def _do(self, *args, **kwargs):
        if isinstance(self.answer, BaseException):
            raise self.answer
        return self.answer

    get = get_info = _do


def files(answer) -> FileStore:
    store = FileStore.__new__(FileStore)
    store._store = Answers(answer)
    return store


def book(answer) -> BatchBook:
    made = BatchBook.__new__(BatchBook)
    made._kv = Answers(answer)
    return made


@pytest.mark.parametrize("absent", [ObjectNotFoundError(), UnicodeEncodeError("utf-8", "\ud800", 0, 1, "surrogate")])
async def test_a_file_that_is_not_there_is_none(absent):
    assert await files(absent).info("alice", "file-x") is None


async def test_a_file_lookup_nats_does_not_answer_raises():
    with pytest.raises(nats.errors.TimeoutError):
        await files(nats.errors.TimeoutError()).info("alice", "file-x")


@pytest.mark.parametrize("absent", [KeyNotFoundError(), InvalidKeyError()])
async def test_a_batch_that_is_not_there_is_none(absent):
    assert await book(absent).get("batch_x") is None


async def test_a_batch_lookup_nats_does_not_answer_raises():
    with pytest.raises(nats.errors.TimeoutError):
        await book(nats.errors.TimeoutError()).get("batch_x")


async def test_a_resumed_batch_whose_input_file_cannot_be_read_is_left_for_the_next_sweep(tmp_path: Path):
    failed: list[str] = []
    record = {"id": "batch_1", "status": "in_progress", "input_file_id": "file-1", PRIVATE: {"caller": "alice"}}
    runner = BatchRunner.__new__(BatchRunner)
    runner.book = types.SimpleNamespace(get=Answers(record)._do)
    runner.callers = types.SimpleNamespace(get=lambda name: types.SimpleNamespace(name=name))
    runner.files = files(nats.errors.TimeoutError())

    async def fail(batch_id, errors):
        failed.append(batch_id)

    runner._fail = fail
    with pytest.raises(nats.errors.TimeoutError):
        await runner._run("batch_1", tmp_path)
    assert failed == []  # not failed as "the input file is gone": BatchRunner.run leaves it to a sweep
