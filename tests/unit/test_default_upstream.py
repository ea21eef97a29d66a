"""`default_upstream`: where a job (or pool) that names no upstream goes when several are
configured, and the push that adds a second upstream without saying where such jobs go, refused.
A break-it trial: a push adding a second upstream ended about 100 of 200 queued jobs, and a
waiting request, `invalid` / `unknown_upstream` ("several are configured"), with only a note
printed. Real nats-server for the pushes; the dispatcher's intake on a real JetStream message."""

from __future__ import annotations

import anyio
import nats
import pytest
from structlog.testing import capture_logs
from typer.testing import CliRunner

from ratefleet.cli import app
from ratefleet.config_watch import push_file
from ratefleet.runtime.config_kv import UpstreamNoLongerImplicit, document_for, push_config, read_config
from ratefleet.schemas import Subjects
from ratefleet.schemas.config import parse_config
from ratefleet.schemas.errors import ConfigError

pytestmark = pytest.mark.anyio
ONE = """
[upstreams.openai]
base_url = "http://127.0.0.1:9"

[pools.p]
keys = [{ id = "k1", secret = "env:RF_UNUSED", rps = 5 }]
"""
TWO = ONE + """
[upstreams.other]
base_url = "http://127.0.0.1:10"
"""


def test_a_default_upstream_routes_jobs_and_pools_that_name_none():
    config = parse_config({"default_upstream": "openai", "upstreams": {"openai": {"base_url": "http://a"},
                                                                        "other": {"base_url": "http://b"}},
                           "pools": {"p": {"keys": [{"id": "k1", "secret": "env:X", "rps": 1}]}}})
    assert config.implicit_upstream() == "openai" and config.pool_upstream("p") == "openai"
    with pytest.raises(ConfigError, match=r"default_upstream: unknown upstream 'nope'; known: \['a'\]"):
        parse_config({"default_upstream": "nope", "upstreams": {"a": {"base_url": "http://a"}}})
    with pytest.raises(ConfigError, match="pools.p.upstream: required when more than one upstream is configured "
                                          "and none is the default_upstream"):
        parse_config({"default_upstream": "", "upstreams": {"a": {"base_url": "http://a"}, "b": {"base_url": "http://b"}},
                      "pools": {"p": {"keys": [{"id": "k1", "secret": "env:X", "rps": 1}]}}})


async def test_a_push_adding_an_upstream_without_a_default_is_refused_and_one_with_it_goes(nats_server, tmp_path):
    one, two = tmp_path / "one.toml", tmp_path / "two.toml"
    one.write_text(ONE)
    two.write_text(TWO.replace("[pools.p]", '[pools.p]\nupstream = "openai"'))
    nc = await nats.connect(nats_server.url)
    js, subjects = nc.jetstream(), Subjects()
    try:
        first, _ = await push_config(js, subjects, document_for(one))
        with pytest.raises(UpstreamNoLongerImplicit, match=r'refused: the running config sends the jobs that name no '
                           r"upstream to 'openai'.*Add `default_upstream = \"openai\"`"):
            await push_config(js, subjects, document_for(two))
        assert (await read_config(js, subjects))[0] == first  # nothing stored
        with capture_logs() as logs:  # `ratefleet up`'s file watch: an error, the running revision kept
            assert await push_file(js, subjects, two) is None
        assert any("would strand the jobs that name no upstream" in entry["event"] for entry in logs)
        run = await anyio.to_thread.run_sync(lambda: CliRunner().invoke(
            app, ["config", "push", str(two), "--nats", nats_server.url, "--wait-s", "0"]))
        assert run.exit_code == 2 and "default_upstream" in run.output, run.output
        for setting in ('default_upstream = "openai"\n', 'default_upstream = ""\n'):
            two.write_text(setting + TWO.replace("[pools.p]", '[pools.p]\nupstream = "openai"'))
            revision, changed = await push_config(js, subjects, document_for(two))
            assert changed and revision > first
            await push_config(js, subjects, document_for(one))  # back to one upstream: no question
    finally:
        await nc.close()


def test_the_leader_runs_a_pushed_default_upstream_and_intake_routes_by_it():
    from ratefleet.dispatcher.shell.intake import validate_job
    from ratefleet.schemas.config_store import fleet_view

    local = parse_config({"upstreams": {"openai": {"base_url": "http://a"}},
                          "pools": {"p": {"keys": [{"id": "k1", "secret": "env:X", "rps": 1}]}}})
    pushed = parse_config({"default_upstream": "openai",
                           "upstreams": {"openai": {"base_url": "http://a"}, "other": {"base_url": "http://b"}},
                           "pools": {"p": {"upstream": "openai", "keys": [{"id": "k1", "secret": "env:X", "rps": 1}]}}})
    live = fleet_view(local, pushed)
    assert live.default_upstream == "openai" and live.implicit_upstream() == "openai"
    raw = b'{"id": "j1", "request": {"path": "/v1/chat/completions", "json": {}}}'
    assert validate_job(raw, live).upstream is None  # valid: it goes to the default
    from ratefleet.schemas import JobRejected
    with pytest.raises(JobRejected, match="none is the default_upstream"):
        validate_job(raw, live.model_copy(update={"default_upstream": None}))
