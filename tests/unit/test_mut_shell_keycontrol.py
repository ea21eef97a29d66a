"""The keys bucket (dispatcher/shell/keycontrol.py) over a recording fake of nats-py's
JetStream KV: the bucket is opened once (created without a TTL when missing), every record is
loaded by key id, unreadable or vanished entries are skipped, a failure leaves the keys
enabled; a save stamps `saved_at`, None deletes, and a failed save says so, logs and reopens
the bucket next time. Log lines name the key and the error class, never its message."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Any

import pytest
from nats.js.errors import BucketNotFoundError, KeyDeletedError, KeyNotFoundError
from structlog.testing import capture_logs

from ratefleet.dispatcher.shell import keycontrol
from ratefleet.dispatcher.shell.keycontrol import KeyStore

pytestmark = pytest.mark.anyio
BUCKET = "ratefleet_keys"


class Away(ConnectionError):
    """NATS is away (the message must not reach a log line)."""


@dataclass
class Entry:
    value: bytes | None


@dataclass
class FakeKV:
    """`entries`: key id -> stored bytes, or an exception class `get` raises for it."""

    entries: dict[str, Any] = field(default_factory=dict)
    fail: BaseException | None = None
    puts: list[tuple[str, bytes]] = field(default_factory=list)
    deletes: list[str] = field(default_factory=list)

    async def keys(self) -> list[str]:
        raise AssertionError("kv.keys() misses keys written while it lists; the stream's subjects are read")

    async def get(self, key_id: str) -> Entry:
        found = self.entries[key_id]
        if isinstance(found, type):
            raise found()
        return Entry(found)

    async def put(self, key_id: str, value: bytes) -> int:
        if self.fail:
            raise self.fail
        self.puts.append((key_id, value))
        return len(self.puts)

    async def delete(self, key_id: str) -> bool:
        if self.fail:
            raise self.fail
        self.deletes.append(key_id)
        return True


@dataclass
class FakeJS:
    """`key_value` finds the bucket once it exists; `created` keeps create_key_value's arguments."""

    kv: FakeKV = field(default_factory=FakeKV)
    exists: bool = True
    opened: list[str] = field(default_factory=list)
    created: list[dict[str, Any]] = field(default_factory=list)

    async def key_value(self, bucket: str) -> FakeKV:
        self.opened.append(bucket)
        if not self.exists:
            raise BucketNotFoundError()
        return self.kv

    async def create_key_value(self, **config: Any) -> FakeKV:
        self.created.append(config)
        self.exists = True
        return self.kv

    async def stream_info(self, name: str, subjects_filter: str | None = None) -> SimpleNamespace:
        """The KV's stream, its subjects as the server lists them (`$KV.<bucket>.<key>`); without a
        filter (open_kv checking its settings) a bucket with no age limit, as the keys bucket is."""
        if self.kv.fail:
            raise self.kv.fail
        if subjects_filter is None and name == f"KV_{BUCKET}":
            return SimpleNamespace(config=SimpleNamespace(num_replicas=1, max_age=0, duplicate_window=120))
        assert (name, subjects_filter) == (f"KV_{BUCKET}", f"$KV.{BUCKET}.>")
        subjects = {f"$KV.{BUCKET}.{key}": 1 for key in self.kv.entries} or None  # None: the server omits it
        return SimpleNamespace(state=SimpleNamespace(subjects=subjects))


def store(js: FakeJS) -> KeyStore:
    return KeyStore(js, BUCKET)  # type: ignore[arg-type]


def warnings(logs: list[dict]) -> list[dict]:
    return [line for line in logs if line["log_level"] == "warning"]


async def test_load_returns_every_record_by_key_id_and_opens_the_bucket_once():
    js = FakeJS(FakeKV({"k1": b'{"by": "provider", "reason": "401"}', "k2": b'{"by": "operator"}'}))
    keys = store(js)
    assert await keys.load() == {"k1": {"by": "provider", "reason": "401"}, "k2": {"by": "operator"}}
    assert await keys.load() == {"k1": {"by": "provider", "reason": "401"}, "k2": {"by": "operator"}}
    assert js.opened == [BUCKET] and js.created == []


async def test_a_missing_bucket_is_created_without_a_ttl():
    js = FakeJS(exists=False)
    assert await store(js).load() == {}
    assert js.created == [{"bucket": BUCKET, "ttl": None, "history": 1, "replicas": 1}]


async def test_an_empty_bucket_loads_as_no_records_without_a_warning():
    with capture_logs() as logs:
        assert await store(FakeJS()).load() == {}
    assert warnings(logs) == []


async def test_vanished_and_unreadable_entries_are_skipped_and_the_rest_loaded():
    kv = FakeKV({"gone": KeyNotFoundError, "deleted": KeyDeletedError, "bad": b"{not json",
                 "empty": None, "k1": b'{"by": "operator"}'})
    with capture_logs() as logs:
        assert await store(FakeJS(kv)).load() == {"k1": {"by": "operator"}}
    assert warnings(logs) == [
        {"event": "persisted key state skipped", "log_level": "warning", "key_id": "bad", "error": "JSONDecodeError"},
        {"event": "persisted key state skipped", "log_level": "warning", "key_id": "empty", "error": "JSONDecodeError"},
    ]


async def test_an_unreachable_bucket_leaves_every_key_enabled_and_says_so():
    keys = store(FakeJS(FakeKV({"k1": b"{}"}, fail=Away("nats://user:pw@host"))))
    with capture_logs() as logs:
        assert await keys.load() == {}
    assert warnings(logs) == [{"event": "could not load persisted key states; keys start enabled",
                               "log_level": "warning", "error": "Away"}]


async def test_records_read_before_a_failure_are_kept():
    class Failing(FakeKV):
        async def get(self, key_id: str) -> Entry:
            if key_id == "k2":
                raise Away("lost")
            return await super().get(key_id)

    assert await store(FakeJS(Failing({"k1": b'{"by": "operator"}', "k2": b"{}"}))).load() == {"k1": {"by": "operator"}}


async def test_save_stamps_saved_at_and_keeps_the_record(monkeypatch):
    monkeypatch.setattr(keycontrol.time, "time", lambda: 1700000000.5)
    js = FakeJS()
    keys = store(js)
    assert await keys.save("k1", {"by": "operator", "reason": "rotated", "probe_delay_s": 30.0}) is True
    assert await keys.save("k2", {}) is True
    assert [(key, json.loads(value)) for key, value in js.kv.puts] == [
        ("k1", {"by": "operator", "reason": "rotated", "probe_delay_s": 30.0, "saved_at": 1700000000.5}),
        ("k2", {"saved_at": 1700000000.5})]
    assert js.kv.deletes == [] and js.opened == [BUCKET]


async def test_saving_none_deletes_the_entry():
    js = FakeJS()
    assert await store(js).save("k1", None) is True
    assert js.kv.deletes == ["k1"] and js.kv.puts == []


@pytest.mark.parametrize("record", [{"by": "operator"}, None])
async def test_a_failed_save_returns_false_logs_the_key_and_reopens_the_bucket_next_time(record):
    js = FakeJS(FakeKV(fail=Away("nats://user:pw@host")))
    keys = store(js)
    with capture_logs() as logs:
        assert await keys.save("k1", record) is False
    assert warnings(logs) == [{"event": "key state not persisted", "log_level": "warning", "key_id": "k1",
                               "error": "Away"}]
    js.kv.fail = None
    assert await keys.save("k1", record) is True
    assert js.opened == [BUCKET, BUCKET]  # the bucket is looked up again after the failure
